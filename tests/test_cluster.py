"""Two twistd nodes sharing their users through a real redis-server."""

from __future__ import annotations

import json
import signal
import time

import pytest
from conftest import PushServer
from redis_server import RedisServer, require_redis
from websockets.exceptions import ConnectionClosed

pytestmark = pytest.mark.usefixtures("redis_available")


@pytest.fixture
def redis_available() -> None:
    require_redis()


@pytest.fixture
def redis(tmp_path) -> RedisServer:
    server = RedisServer(tmp_path)
    yield server
    server.kill()


def connected(node: PushServer, redis: RedisServer, times: int = 1, timeout: float = 20) -> None:
    needle = f"Redis 127.0.0.1:{redis.port} connected"
    deadline = time.monotonic() + timeout
    while node.log().count(needle) < times:
        assert time.monotonic() < deadline, node.log()[-3000:]
        time.sleep(0.05)


def node(start_server, redis: RedisServer, *extra: str) -> PushServer:
    n = start_server(
        f"--redis={redis.url}", "--cluster-heartbeat=0.3", "--redis-timeout=0.5", *extra
    )
    connected(n, redis)
    return n


def call(node: PushServer, request: dict) -> dict:
    with node.backend() as b:
        return b.json(json.dumps({"id": 1, **request}))


def until(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.05)


def subscribed(redis: RedisServer, uid: str) -> bool:
    return f"pushsvc:u:{uid}".encode() in redis.command("PUBSUB", "CHANNELS", "pushsvc:u:*")


def test_push_reaches_a_uid_on_the_other_node(start_server, redis) -> None:
    a, b = node(start_server, redis), node(start_server, redis)
    ws = a.ws("alice")
    until(lambda: subscribed(redis, "alice"))
    with b.backend() as backend:
        assert backend.request('{"uid":"alice","percent":"88%"}') == b"ok"
        assert backend.request('{"uid":"nobody","percent":"88%"}') == b"fail"
    with a.backend() as backend:
        assert backend.request('{"uid":"alice","data":"local"}') == b"ok"
        assert backend.request('{"uid":"nobody","data":"x"}') == b"fail"
    # Both arrive; B answered ok once Redis counted A as a receiver, before A
    # delivered, so their order across the nodes is not promised (docs/cluster.md).
    assert sorted([ws.recv(timeout=5), ws.recv(timeout=5)]) == ["88%", "local"]
    # Tabs on both nodes: a push through either reaches both, once each.
    ws_b = b.ws("alice")
    b.wait_for(lambda s: s["pending"] == 0)
    assert call(a, {"uid": "alice", "data": "both"})["ok"] is True
    assert ws.recv(timeout=5) == "both" and ws_b.recv(timeout=5) == "both"
    # Once each: a marker through the other node comes through Redis after
    # any copy of "both" would have, so it must be each tab's next frame.
    # (ws_b got "both" through Redis, so A's PUBLISH of it is done by now.)
    assert call(b, {"uid": "alice", "data": "m1"})["ok"] is True
    assert ws.recv(timeout=5) == "m1" and ws_b.recv(timeout=5) == "m1"
    assert call(a, {"uid": "alice", "data": "m2"})["ok"] is True
    assert ws_b.recv(timeout=5) == "m2" and ws.recv(timeout=5) == "m2"
    ws.close()
    ws_b.close()
    until(lambda: not subscribed(redis, "alice"))
    assert call(b, {"uid": "alice", "data": "gone"}) == {"id": 1, "ok": False, "delivered": 0}


def test_broadcast_groups_presence_and_disconnect_across_nodes(start_server, redis) -> None:
    a, b = node(start_server, redis), node(start_server, redis)
    on_a = [a.ws("u1"), a.ws("u2")]
    on_b = [b.ws("u3")]
    until(lambda: all(subscribed(redis, u) for u in ("u1", "u2", "u3")))

    assert call(b, {"cmd": "broadcast", "data": "all"}) == {"id": 1, "ok": True, "delivered": 3}
    assert [c.recv(timeout=5) for c in on_a + on_b] == ["all"] * 3

    assert call(a, {"cmd": "join", "uid": ["u1", "u3"], "group": "room"}) == {"id": 1, "ok": True}
    assert call(b, {"group": "room", "data": "g"}) == {"id": 1, "ok": True, "delivered": 2}
    assert on_a[0].recv(timeout=5) == "g" and on_b[0].recv(timeout=5) == "g"
    members = call(b, {"cmd": "members", "group": "room"})
    assert members["uids"] == ["u1", "u3"] and members["online"] == 2
    # A node started later learns the memberships from Redis.
    c = node(start_server, redis)
    until(lambda: call(c, {"cmd": "members", "group": "room"})["uids"] == ["u1", "u3"])

    assert call(b, {"cmd": "online", "uid": ["u1", "u3", "zz"]})["online"] == {
        "u1": True,
        "u3": True,
        "zz": False,
    }
    until(lambda: call(b, {"cmd": "stats"})["connections"] == 3)
    stats = call(b, {"cmd": "stats"})
    assert (stats["uids"], stats["nodes"]) == (3, 3)
    listing = call(b, {"cmd": "list"})
    assert listing["uids"] == ["u1", "u2", "u3"] and listing["total"] == 3

    assert call(b, {"cmd": "disconnect", "uid": "u2"}) == {"id": 1, "ok": True, "closed": 1}
    with pytest.raises(ConnectionClosed) as info:
        on_a[1].recv(timeout=5)
    assert info.value.rcvd.code == 4009
    until(lambda: not subscribed(redis, "u2"))


def test_redis_outage_keeps_local_delivery_and_never_says_ok_falsely(start_server, redis) -> None:
    a, b = node(start_server, redis), node(start_server, redis)
    local = a.ws("here")
    remote = b.ws("there")
    until(lambda: subscribed(redis, "here") and subscribed(redis, "there"))
    redis.kill()
    until(lambda: "unreachable" in a.log())
    with a.backend() as backend:
        started = time.monotonic()
        assert backend.request('{"uid":"here","data":"during"}') == b"ok"
        reply = backend.request('{"uid":"there","data":"lost"}')
        assert reply != b"ok" and reply.startswith((b"fail", b"error"))
        assert time.monotonic() - started < 3
    assert local.recv(timeout=5) == "during"
    # The outage is logged once, not per message.
    assert a.log().count("unreachable") == 1

    redis.start()
    connected(a, redis, times=2)
    connected(b, redis, times=2)
    until(lambda: subscribed(redis, "there") and subscribed(redis, "here"))
    with a.backend() as backend:
        assert backend.request('{"uid":"there","data":"after"}') == b"ok"
    # Its first frame: the push refused during the outage never shows up (had it
    # been queued, it would have been PUBLISHed through A's connection before this one).
    assert remote.recv(timeout=5) == "after"


def test_a_dead_node_is_forgotten(start_server, redis) -> None:
    a, b = node(start_server, redis), node(start_server, redis)
    a.ws("victim")
    until(lambda: subscribed(redis, "victim"))
    until(lambda: call(b, {"cmd": "stats"})["connections"] == 1)
    a.stop(signal.SIGKILL)
    started = time.monotonic()
    until(lambda: call(b, {"cmd": "online", "uid": "victim"})["online"] == {"victim": False})
    until(lambda: call(b, {"cmd": "stats"})["connections"] == 0, timeout=5)
    assert time.monotonic() - started < 3 * 0.3 + 2
    assert call(b, {"uid": "victim", "data": "x"})["ok"] is False


def test_several_redis_servers_share_the_uids(start_server, tmp_path) -> None:
    redises = []
    for i in range(2):
        d = tmp_path / f"r{i}"
        d.mkdir()
        redises.append(RedisServer(d))
    try:
        urls = [f"--redis={r.url}" for r in redises]
        a = start_server(*urls, "--cluster-heartbeat=0.3")
        b = start_server(*urls, "--cluster-heartbeat=0.3")
        for n in (a, b):
            for r in redises:
                connected(n, r)
        uids = [f"s{i}" for i in range(20)]
        clients = [a.ws(u) for u in uids]

        def spread() -> list[int]:
            return [
                r.command("PUBSUB", "CHANNELS", "pushsvc:u:*").count(b"pushsvc:u:s")
                for r in redises
            ]

        until(lambda: sum(spread()) == 20)
        assert all(spread()), spread()  # both servers carry some of them
        for u, c in zip(uids, clients, strict=True):
            assert call(b, {"uid": u, "data": u}) == {"id": 1, "ok": True, "delivered": 1}
            assert c.recv(timeout=5) == u
    finally:
        for r in redises:
            r.kill()
