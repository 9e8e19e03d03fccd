"""Redis Sentinel: nodes find the master through the sentinels and follow a failover.

Real processes: a master, a replica and a sentinel (``redis-server CONFIG
--sentinel``) on free ports, two ``twistd push`` nodes on
``redis+sentinel://``.  A backend pushes through node B to a user on node A
while SENTINEL FAILOVER moves the master: no push is answered ``ok`` and
lost, and afterwards both nodes work on the new master (uids subscribed
again, group memberships reloaded).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import new_uid, until
from redis_server import RedisServer, SentinelServer, require_redis

MASTER = "pushmaster"


@pytest.fixture
def sentinel_setup(tmp_path: Path) -> Iterator[tuple[RedisServer, RedisServer, SentinelServer]]:
    require_redis()
    dirs = [tmp_path / name for name in ("master", "replica", "sentinel")]
    for d in dirs:
        d.mkdir()
    master = RedisServer(dirs[0])
    replica = RedisServer(dirs[1], "--replicaof", "127.0.0.1", str(master.port))
    sentinel = SentinelServer(dirs[2], master, MASTER)
    # Replication is asynchronous: what the master took before the replica synced is lost
    # in a failover (docs/cluster.md says so).  The test starts from a synced replica.
    until(
        lambda: b"master_link_status:up" in replica.command("INFO", "replication"),
        20,
        "the replica in sync",
    )
    yield master, replica, sentinel
    for server in (sentinel, replica, master):
        server.kill()


def failover(sentinel: SentinelServer, to: RedisServer) -> None:
    """SENTINEL FAILOVER (retried until the sentinel has seen the replica), then wait for it."""
    until(
        lambda: sentinel.command("SENTINEL", "failover", MASTER).startswith(b"+OK"),
        20,
        "SENTINEL FAILOVER accepted",
    )
    until(
        lambda: (
            str(to.port).encode() in sentinel.command("SENTINEL", "get-master-addr-by-name", MASTER)
        ),
        20,
        "the sentinel names the new master",
    )


def switched(node) -> bool:
    """The node has connected to Redis again since the start (to the new master)."""
    return node.log().count(f"Redis sentinel:{MASTER} connected") >= 2


def test_nodes_follow_a_failover_with_no_false_ok(start_server, sentinel_setup) -> None:
    master, replica, sentinel = sentinel_setup
    url = f"redis+sentinel://127.0.0.1:{sentinel.port}/{MASTER}"
    a = start_server(f"--redis={url}", "--cluster-heartbeat=0.3", "--redis-timeout=0.5")
    b = start_server(f"--redis={url}", "--cluster-heartbeat=0.3", "--redis-timeout=0.5")
    for node in (a, b):
        until(lambda node=node: f"Redis sentinel:{MASTER} connected" in node.log(), 20, "up")
    uid = new_uid("sent")
    ws = a.ws(uid)
    with b.backend() as backend:
        b.wait_for(lambda stats: stats["uids"] == 1)
        assert backend.request(f'{{"uid":"{uid}","percent":"0"}}') == b"ok"
        # A membership stored before the failover (replicated to the replica).
        assert a.call({"cmd": "join", "uid": [uid], "group": "room"}) == {"id": 1, "ok": True}
        replies = {0: b"ok"}
        failover(sentinel, to=replica)
        # Keep pushing through the switch until pushes are answered ok again.
        deadline = time.monotonic() + 30
        for i in range(1, 100000):
            replies[i] = backend.request(f'{{"uid":"{uid}","percent":"{i}"}}')
            if replies[i] == replies[i - 1] == b"ok" and switched(a) and switched(b):
                break
            assert time.monotonic() < deadline, f"no ok after the failover: {replies}"
            time.sleep(0.05)
    # The membership survived on the new master: a group push through B reaches A's user.
    assert b.call({"group": "room", "data": "g"}) == {"id": 1, "ok": True, "delivered": 1}
    received = ["0"]
    while True:
        try:
            received.append(ws.recv(timeout=2))
        except TimeoutError:
            break
    answered_ok = [str(i) for i, reply in replies.items() if reply == b"ok"]
    lost = [p for p in answered_ok if p not in received]
    assert received[-1] == "g"
    assert not lost, f"answered ok but never delivered: {lost}"
    assert set(replies.values()) <= {b"ok", b"fail", b"error Redis is unreachable"}, replies
    assert b"master" in replica.command("ROLE")
    ws.close()
