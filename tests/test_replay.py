"""Recovery's hold and release in-process: the Replay gate, and Node.recover end to end.

A fake connection stands for the WebSocket protocol: it routes delivered
frames through its gate as pushsvc.websocket does, and records what goes
out.  The Replay runs on a Clock; the node runs with the memory broker and
store, and (in cluster mode) with two Redis brokers on a real redis-server.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from reactor_helper import (
    FlushedRedis,
    ReactorTestCase,
    module_redis,  # noqa: F401 (the fixture FlushedRedis uses)
    quiet,
    until,
)
from twisted.internet import defer
from twisted.internet.task import Clock

from pushsvc.broker.memory import MemoryBroker
from pushsvc.broker.redis import RedisBroker
from pushsvc.history.replay import Replay
from pushsvc.history.store import MemoryStore, Recovery, RedisStore, envelope
from pushsvc.hub import Frame
from pushsvc.node import Node, stored_frame
from pushsvc.results import deferred

MSG = b'{"pushsvc":"msg"}'  # a plain push that looks like the start of an envelope


class FakeConn:
    """A recovering connection: frames go through its gate, as in pushsvc.websocket."""

    def __init__(self) -> None:
        self.sent: list[Frame] = []
        self.gates: list[Replay | None] = []
        self.closes: list[tuple[int, str]] = []

    @property
    def gate(self) -> Replay | None:
        return self.gates[-1] if self.gates else None

    @property
    def texts(self) -> list[bytes]:
        return [frame.payload for frame in self.sent]

    def messages(self) -> list[dict[str, Any]]:
        return [orjson.loads(text) for text in self.texts]

    def deliver(self, frame: Frame) -> bool:
        gate = self.gate
        if gate is None:
            self.send_frame(frame)
        else:
            gate.offer(frame)
        return True

    def send_frame(self, frame: Frame) -> None:
        self.sent.append(frame)

    def set_gate(self, gate: Replay | None) -> None:
        self.gates.append(gate)

    def close(self, code: int, reason: str) -> None:
        self.closes.append((code, reason))

    def go_away(self) -> None:
        self.closes.append((1001, "going away"))


def live(channel: str, offset: int, payload: bytes = b"live") -> Frame:
    """A stored push as it arrives live: an envelope that carries its position."""
    return stored_frame(channel, offset, "ep", payload)


def status(channel: str, recovered: bool, offset: int | None, epoch: str | None) -> bytes:
    return Recovery(channel, recovered, offset, epoch).status()


# -- the gate --------------------------------------------------------------------------


def test_frames_offered_before_release_are_held() -> None:
    conn = FakeConn()
    replay = Replay(conn, "ann", 0, Clock())
    assert conn.gates == [replay]
    conn.deliver(live("u:ann", 3))
    conn.deliver(Frame(b"plain"))
    assert conn.sent == []


def test_release_sends_replay_then_status_then_held_frames_not_covered() -> None:
    conn = FakeConn()
    replay = Replay(conn, "ann", 0, Clock())
    covered, fresh, plain, other = live("u:ann", 3), live("u:ann", 4), Frame(MSG), live("g:x", 1)
    for frame in (covered, fresh, plain, other):
        conn.deliver(frame)
    recoveries = [
        Recovery("u:ann", True, 3, "ep", [(2, b"two", ()), (3, b"three", ())]),
        # A group push that excluded ann is not hers to replay.
        Recovery("g:room", True, 8, "gp", [(7, b"not for ann", ("ann", "bob")), (8, b"8", ())]),
    ]
    frames, size = replay.release(recoveries)
    expected = [
        envelope("u:ann", 2, "ep", b"two"),
        envelope("u:ann", 3, "ep", b"three"),
        status("u:ann", True, 3, "ep"),
        envelope("g:room", 8, "gp", b"8"),
        status("g:room", True, 8, "gp"),
        fresh.payload,
        MSG,
        other.payload,
    ]
    assert conn.texts == expected
    assert (frames, size) == (3, sum(len(t) for t in expected[:2] + expected[3:4]))
    # Replayed frames carry their position like live ones.
    assert [(f.channel, f.offset) for f in conn.sent[:2]] == [("u:ann", 2), ("u:ann", 3)]
    assert conn.gate is None  # no late window: straight out from now on


def test_covered_frames_are_dropped_until_the_late_window_passes() -> None:
    clock = Clock()
    conn = FakeConn()
    replay = Replay(conn, "ann", 30.0, clock)
    replay.release([Recovery("u:ann", True, 5, "ep", [(5, b"five", ())])])
    assert conn.gate is replay
    before = len(conn.sent)
    # Stored before the read, still on its way from another node: already replayed.
    conn.deliver(live("u:ann", 5))
    conn.deliver(live("u:ann", 4))
    conn.deliver(live("u:ann", 6))
    conn.deliver(Frame(MSG))
    assert conn.texts[before:] == [live("u:ann", 6).payload, MSG]
    clock.advance(29.9)
    assert conn.gate is replay
    clock.advance(0.1)
    assert conn.gates == [replay, None]
    conn.deliver(live("u:ann", 5))  # past the window it is the sender's business again
    assert conn.texts[-1] == live("u:ann", 5).payload


def test_a_recovery_without_an_offset_covers_nothing() -> None:
    conn = FakeConn()
    replay = Replay(conn, "ann", 0, Clock())
    conn.deliver(live("u:ann", 1))
    replay.release([Recovery("u:ann", False, None, None)])  # history unreachable
    assert conn.texts == [status("u:ann", False, None, None), live("u:ann", 1).payload]


def test_a_failed_recovery_sends_its_status_and_no_entries() -> None:
    conn = FakeConn()
    replay = Replay(conn, "ann", 0, Clock())
    assert replay.release([Recovery("u:ann", False, 9, "ep")]) == (0, 0)
    assert conn.messages() == [
        {"pushsvc": "recovery", "ch": "u:ann", "recovered": False, "off": 9, "ep": "ep"}
    ]


# -- Node.recover with the memory broker and store ---------------------------------------


@pytest.fixture
def node() -> Node:
    return Node(MemoryBroker(), MemoryStore(size=10), clock=Clock())


def connect(node: Node, uid: str, groups: tuple[str, ...] = ()) -> FakeConn:
    conn = FakeConn()
    node.attach(conn)
    assert node.identify(conn, uid, groups)
    return conn


def test_node_replays_what_a_connection_missed_at_once(node: Node) -> None:
    [(reached, channel, (offset, epoch), why)] = node.push_stored(["ann"], b"one", 60)
    assert (reached, channel, offset, why) == (0, "u:ann", 1, None)
    node.push_stored(["ann"], b"two", 60)
    conn = connect(node, "ann")
    node.recover(conn, "ann", (), {"u:ann": (0, epoch)})
    assert conn.texts == [
        envelope("u:ann", 1, epoch, b"one"),
        envelope("u:ann", 2, epoch, b"two"),
        status("u:ann", True, 2, epoch),
    ]
    assert conn.gate is None  # one node: no late window


def test_a_plain_push_right_after_a_recovery_arrives_as_its_text(node: Node) -> None:
    """The text of an envelope's start is still plain text (the old code parsed frames)."""
    [(_, _, (_, epoch), _)] = node.push_stored(["ann"], b"one", 60)
    conn = connect(node, "ann")
    node.recover(conn, "ann", (), {"u:ann": (0, epoch)})
    assert node.push(["ann"], MSG) == 1
    assert conn.texts[-1] == MSG


def test_live_pushes_after_a_recovery_carry_their_positions(node: Node) -> None:
    [(_, _, (_, epoch), _)] = node.push_stored(["ann"], b"one", 60)
    conn = connect(node, "ann")
    node.recover(conn, "ann", (), {"u:ann": (1, epoch)})
    assert conn.messages() == [
        {"pushsvc": "recovery", "ch": "u:ann", "recovered": True, "off": 1, "ep": epoch}
    ]
    [(reached, _, (offset, _), _)] = node.push_stored(["ann"], b"two", 60)
    assert (reached, offset) == (1, 2)
    assert conn.texts[-1] == envelope("u:ann", 2, epoch, b"two")


def test_only_a_connections_own_channels_are_replayed(node: Node) -> None:
    for uid in ("ann", "bob"):
        node.push_stored([uid], b"private", 60)
    node.push_groups_stored(["room", "vip", "hall"], b"group", (), 60)
    node.join(["ann"], ["hall"])
    conn = connect(node, "ann", groups=("vip",))
    since = {ch: (0, None) for ch in ("u:bob", "g:room", "x:other")}
    node.recover(conn, "ann", ("vip",), since)
    assert conn.sent == [] and conn.gates == []  # nothing of hers asked: no gate at all
    node.recover(conn, "ann", ("vip",), {**since, "g:vip": (0, None), "g:hall": (0, None)})
    assert sorted((m["pushsvc"], m["ch"]) for m in conn.messages()) == [
        ("msg", "g:hall"),
        ("msg", "g:vip"),
        ("recovery", "g:hall"),
        ("recovery", "g:vip"),
    ]


def test_a_group_push_that_excluded_the_uid_is_not_replayed_to_it(node: Node) -> None:
    node.push_groups_stored(["room"], b"not for ann", {"ann"}, 60)
    node.push_groups_stored(["room"], b"for all", (), 60)
    node.join(["ann"], ["room"])
    conn = connect(node, "ann")
    node.recover(conn, "ann", (), {"g:room": (0, None)})
    assert [m.get("data") for m in conn.messages()] == ["for all", None]


# -- in cluster mode: two nodes on Redis ---------------------------------------------------


class TestClusterRecovery(FlushedRedis, ReactorTestCase):
    """Recovery on one node while another pushes: Redis broker and store, a real redis-server."""

    def setUp(self) -> None:
        self.addCleanup(quiet)

    @defer.inlineCallbacks
    def node(self) -> Any:
        """A started node on Redis; its late window runs on a Clock of its own."""
        broker = RedisBroker([self.redis.url], timeout=0.5, heartbeat=5.0)
        node = Node(broker, RedisStore(broker.call), clock=Clock())
        node.startService()
        self.addCleanup(node.stopService)
        yield until(lambda: broker.home.up)
        return node

    @defer.inlineCallbacks
    def test_a_plain_push_from_another_node_right_after_a_recovery(self) -> Any:
        a, b = yield defer.gatherResults([self.node(), self.node()])
        [(reached, _, (offset, epoch), why)] = yield b.push_stored(["ann"], b"one", 60)
        assert (reached, offset, why) == (0, 1, None)
        conn = connect(a, "ann")
        a.recover(conn, "ann", (), {"u:ann": (0, None)})
        yield until(lambda: len(conn.sent) == 2)
        assert conn.texts == [envelope("u:ann", 1, epoch, b"one"), status("u:ann", True, 1, epoch)]
        replay = conn.gate
        assert replay is not None  # a cluster keeps the gate for the late window
        assert (yield deferred(b.push(["ann"], MSG))) == 1
        yield until(lambda: len(conn.sent) == 3)
        assert conn.texts[2] == MSG
        # A stored push that the replay did not cover goes through too, with its position.
        [(reached, _, (offset, _), _)] = yield b.push_stored(["ann"], b"two", 60)
        assert (reached, offset) == (1, 2)
        yield until(lambda: len(conn.sent) == 4)
        assert conn.texts[3] == envelope("u:ann", 2, epoch, b"two")
        a.clock.advance(a.broker.max_delay)
        assert conn.gates == [replay, None]
