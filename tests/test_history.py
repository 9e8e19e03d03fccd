"""Pushes with a ttl: kept, then replayed on reconnect with no loss and no duplicates."""

from __future__ import annotations

import json
import random
import threading
import time
import urllib.request

import pytest
from conftest import PushServer, cluster_node, new_uid


def hello(user: str, since: dict | None = None) -> str:
    return json.dumps({"uid": user, "since": since or {}})


def replay(ws) -> list[dict]:
    """The frames of a replay, decoded, up to and including its recovery status.

    The status is the last frame of a channel's replay (docs/protocol.md).
    """
    got = []
    while not got or got[-1].get("pushsvc") != "recovery":
        got.append(json.loads(ws.recv(timeout=5)))
    return got


def nothing_before_marker(server: PushServer, ws, user: str) -> None:
    """Nothing was sent to ``ws`` (``user``'s only connection) before a marker pushed now."""
    server.push_until_delivered(user, "marker")
    assert ws.recv(timeout=5) == "marker"


def test_offline_uid_catches_up_in_order(server: PushServer, ws_clients) -> None:
    user = new_uid("h")
    ch = "u:" + user
    with server.backend() as b:
        replies = [b.request(json.dumps({"uid": user, "data": d, "ttl": 60})) for d in "abc"]
        assert replies == [b"queued"] * 3
        reply = b.json(json.dumps({"id": 7, "uid": user, "data": {"n": 4}, "ttl": 60}))
    epoch = reply.pop("ep")
    assert reply == {"id": 7, "ok": True, "delivered": 0, "queued": True, "off": 4}
    # A hello without "since": authenticated, nothing replayed (checked below).
    plain = server.ws(json.dumps({"uid": user}))
    ws_clients.append(plain)
    server.wait_for(lambda s: s["pending"] == 0)
    # [0, null]: a client that never saw this channel asks for everything kept.
    ws = server.ws(hello(user, {ch: [0, None]}))
    ws_clients.append(ws)
    got = replay(ws)
    assert [(f["off"], f["ep"], f["data"]) for f in got[:-1]] == [
        (1, epoch, "a"),
        (2, epoch, "b"),
        (3, epoch, "c"),
        (4, epoch, '{"n":4}'),
    ]
    assert got[-1] == {"pushsvc": "recovery", "ch": ch, "recovered": True, "off": 4, "ep": epoch}
    # Live pushes with a ttl carry their position; the plain connection gets them too.
    assert server.call({"uid": user, "data": "live", "ttl": 60})["delivered"] == 2
    live = json.loads(ws.recv(timeout=5))
    assert (live["ch"], live["off"], live["ep"], live["data"]) == (ch, 5, epoch, "live")
    assert json.loads(plain.recv(timeout=5))["off"] == 5  # its first frame: nothing replayed
    # Without a ttl the frame is the text, as always.
    with server.backend() as b:
        assert b.request(json.dumps({"uid": user, "data": "plain"})) == b"ok"
    assert ws.recv(timeout=5) == "plain"
    # Another uid's channel is not ours to read: ignored.
    stranger = new_uid("h")
    other = server.ws(hello(stranger, {ch: [0, None]}))
    ws_clients.append(other)
    nothing_before_marker(server, other, stranger)


def test_overflow_is_reported_not_replayed(start_server, ws_clients) -> None:
    """(Expiry, reported the same way, is tested with a clock in test_history_unit.py.)"""
    server = start_server("--history-size=3")
    full = new_uid("h")
    for i in range(5):
        epoch = server.call({"uid": full, "data": str(i), "ttl": 60})["ep"]
    ws = server.ws(hello(full, {f"u:{full}": [1, None]}))
    ws_clients.append(ws)
    assert replay(ws) == [
        {"pushsvc": "recovery", "ch": f"u:{full}", "recovered": False, "off": 5, "ep": epoch}
    ]


def test_groups_keep_history_and_respect_exclude(server: PushServer, ws_clients) -> None:
    ann, bob, room = new_uid("h"), new_uid("h"), "room-" + new_uid("h")
    server.call({"cmd": "join", "uid": [ann, bob], "group": room})
    assert server.call({"group": room, "data": "from ann", "exclude": ann, "ttl": 60})["queued"]
    assert server.call({"group": room, "data": "to all", "ttl": 60})["off"] == 2
    since = {f"g:{room}": [0, None]}
    got = {}
    for user in (ann, bob):
        ws = server.ws(hello(user, since))
        ws_clients.append(ws)
        got[user] = replay(ws)
    assert [f.get("data") for f in got[bob]] == ["from ann", "to all", None]
    assert [f.get("data") for f in got[ann]] == ["to all", None]  # not what ann sent herself
    assert got[ann][-1]["recovered"] and got[ann][-1]["off"] == 2
    # A group the uid is not in is not replayed.
    stranger = new_uid("h")
    ws = server.ws(hello(stranger, since))
    ws_clients.append(ws)
    nothing_before_marker(server, ws, stranger)


def test_ttl_validation_and_the_http_api(server: PushServer) -> None:
    with server.backend() as b:
        assert b.request('{"uid":"x","data":"d","ttl":604801}') == (
            b"error ttl must be an integer from 0 to 604800"
        )
        assert b.request('{"uid":"x","data":"d","ttl":"60"}').startswith(b"error ttl")
        assert b.request('{"uid":"x","data":"d","ttl":0}') == b"fail"  # 0: not kept
        assert b.request('{"cmd":"broadcast","data":"d","ttl":5}').startswith(b"error broadcast")
    req = urllib.request.Request(
        server.http_url + "/api/push",
        data=json.dumps({"uid": new_uid("h"), "data": "x", "ttl": 30}).encode(),
        method="POST",
    )
    with urllib.request.urlopen(req, timeout=5) as resp:
        body = json.loads(resp.read())
    assert body["ok"] and body["queued"] and body["delivered"] == 0 and body["off"] == 1


def test_a_bad_hello_is_refused(server: PushServer) -> None:
    ws = server.ws('{"uid":"u","since":{"u:u":"17"}}')
    with pytest.raises(Exception) as info:
        ws.recv(timeout=5)
    assert info.value.rcvd.code == 4000


def race(nodes: list[PushServer], pusher: PushServer, n: int = 150) -> None:
    """Push n messages with a ttl while a client keeps dropping and coming back.

    Every reconnect sends the last position seen; the offsets received must be
    exactly 1..n, whatever the pushes did meanwhile.
    """
    user = new_uid("h")
    ch = "u:" + user
    done = threading.Event()

    def backend() -> None:
        with pusher.backend() as b:
            for i in range(1, n + 1):
                assert b.request(json.dumps({"uid": user, "data": f"m{i}", "ttl": 60})) in (
                    b"ok",
                    b"queued",
                )
                time.sleep(0.003)
        done.set()

    thread = threading.Thread(target=backend, daemon=True)
    position: list = [0, None]
    offsets: list[int] = []
    statuses: list[bool] = []
    rng = random.Random(7)
    thread.start()
    connections = 0
    while not (done.is_set() and position[0] == n):
        node = nodes[connections % len(nodes)]
        connections += 1
        ws = node.ws(hello(user, {ch: position}))
        until = time.monotonic() + rng.uniform(0.02, 0.12)
        while time.monotonic() < until or (done.is_set() and position[0] < n):
            try:
                frame = json.loads(ws.recv(timeout=0.5))
            except TimeoutError:
                break
            if frame["pushsvc"] == "recovery":
                statuses.append(frame["recovered"])
                continue
            assert frame["data"] == f"m{frame['off']}"
            offsets.append(frame["off"])
            position = [frame["off"], frame["ep"]]
        if rng.random() < 0.5:
            ws.socket.close()  # abrupt: a network that vanished
        else:
            ws.close()
        assert connections < 200
    thread.join(5)
    assert offsets == list(range(1, n + 1))
    assert connections >= 4 and all(statuses)


def test_reconnects_racing_pushes_lose_and_duplicate_nothing(server: PushServer) -> None:
    race([server], server)


def test_reconnects_racing_pushes_with_redis(start_server, redis) -> None:
    node = cluster_node(start_server, redis)
    race([node], node)


def test_two_nodes_share_the_history(start_server, redis, ws_clients) -> None:
    a, b = cluster_node(start_server, redis), cluster_node(start_server, redis)
    user = new_uid("h")
    first = b.call({"uid": user, "data": "while offline", "ttl": 60})
    assert first["queued"] and first["delivered"] == 0 and first["off"] == 1
    ws = a.ws(hello(user, {f"u:{user}": [0, None]}))
    ws_clients.append(ws)
    got = replay(ws)
    assert [f.get("data") for f in got] == ["while offline", None] and got[-1]["recovered"]
    assert got[-1]["ep"] == first["ep"]
    # Pushed through b, delivered by a, in envelopes; reconnecting to either node recovers.
    race([a, b], b, n=80)


def test_redis_down_stores_nothing_and_says_so(start_server, redis, ws_clients) -> None:
    node = cluster_node(start_server, redis)
    here = new_uid("h")
    ws = node.ws(here)
    ws_clients.append(ws)
    node.wait_for(lambda s: s["pending"] == 0)
    redis.kill()
    deadline = time.monotonic() + 10
    while "unreachable" not in node.log():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    # Delivered here in plain text (no position: it is not stored), and not queued.
    assert node.call({"uid": here, "data": "now", "ttl": 60}) == {
        "id": 1,
        "ok": True,
        "delivered": 1,
        "queued": False,
    }
    assert ws.recv(timeout=5) == "now"
    with node.backend() as b:
        reply = b.request(json.dumps({"uid": new_uid("h"), "data": "lost", "ttl": 60}))
    assert reply.startswith(b"error history unavailable")
    # A recovery that cannot read Redis says so instead of hanging.
    late = node.ws(hello(here, {f"u:{here}": [3, "abc"]}))
    ws_clients.append(late)
    status = json.loads(late.recv(timeout=5))
    assert (status["recovered"], status["off"]) == (False, None)
