"""The Broker contract: the same cases against the memory broker and the Redis broker.

A "node" here is a broker with a fake handler that records what other
nodes asked of it and answers what the test sets.  The Redis cases run
several brokers (several nodes) against one real redis-server in this
process; the memory broker is a cluster of one, so each case has its
one-node answer (nobody else: 0, {}, only the local values) and must give
it at once, never as a Deferred.  tests/reactor_helper.py says how the
reactor runs.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Collection, Iterator
from typing import Any

import pytest
from reactor_helper import (
    FlushedRedis,
    ReactorTestCase,
    module_redis,  # noqa: F401 (the fixture FlushedRedis uses)
    quiet,
    start_redis,
    until,
)
from redis_server import RedisServer
from twisted.internet import defer
from twisted.python.failure import Failure

from pushsvc.broker.memory import MemoryBroker
from pushsvc.broker.redis import RedisBroker
from pushsvc.errors import Unavailable
from pushsvc.results import deferred, is_later

TIMEOUT = 0.5  # the brokers' --redis-timeout


class FakeHandler:
    """A node as its broker sees it: records what other nodes ask, answers what a test sets."""

    def __init__(self, acted: int = 0, counts: dict[str, int] | None = None) -> None:
        self.uids: set[str] = set()
        self.acted = acted
        self.counts = counts or {"uids": 0, "connections": 0, "pending": 0, "groups": 0}
        self.delivered: list[tuple[str, bytes, tuple[str, int, str] | None]] = []
        self.acts: list[tuple[str, dict[str, Any]]] = []
        self.memberships: list[tuple[str, list[str], list[str]]] = []
        self.adopted: list[dict[str, set[str]]] = []

    def deliver_uid(self, uid: str, payload: bytes, position: tuple[str, int, str] | None) -> int:
        self.delivered.append((uid, payload, position))
        return 1

    def act(self, kind: str, fields: dict[str, Any]) -> int:
        self.acts.append((kind, fields))
        return self.acted

    def membership(self, kind: str, uids: list[str], groups: list[str]) -> None:
        self.memberships.append((kind, uids, groups))

    def adopt_memberships(self, groups: dict[str, set[str]]) -> None:
        self.adopted.append(groups)

    def local_uids(self) -> Collection[str]:
        return self.uids

    def local_counts(self) -> dict[str, int]:
        return self.counts


class Peer:
    """One node of a test: its broker and the fake handler the broker calls."""

    def __init__(self, broker: Any, handler: FakeHandler) -> None:
        self.broker = broker
        self.handler = handler

    def hold(self, uid: str) -> Any:
        """The node gets a first connection of ``uid`` (what the hub's on_first does)."""
        self.handler.uids.add(uid)
        self.broker.subscribe(uid)
        return self.broker.subscribed(uid)


class BrokerContract:
    """The cases, for any broker; subclasses make nodes and say what a cluster of one answers."""

    cluster: bool  # several nodes really share users
    # A new node (a started broker with ``handler`` or a fresh one).
    peer: Callable[..., defer.Deferred[Peer]]
    # The broker's answer as a Deferred, once checked it came the way this broker answers.
    answer: Callable[[Any], defer.Deferred[Any]]

    def received(self, predicate: Any) -> defer.Deferred[None]:
        """Waits (bounded) for a message between nodes; nothing to wait for in a cluster of one."""
        return until(predicate) if self.cluster else defer.succeed(None)

    @defer.inlineCallbacks
    def test_subscribed_fires_once_the_node_receives_the_uid(self) -> Any:
        a = yield self.peer()
        ready = a.hold("sub-1")
        if self.cluster:
            assert isinstance(ready, defer.Deferred)
            assert (yield ready) is None
        # Once subscribed, there is nothing to wait for.
        assert a.broker.subscribed("sub-1") is None

    @defer.inlineCallbacks
    def test_publish_reaches_the_node_that_holds_the_uid(self) -> Any:
        a, b = yield defer.gatherResults([self.peer(), self.peer()])
        yield a.hold("pub-1")
        reached = yield self.answer(b.broker.publish(["pub-1"], b"plain text"))
        stored = yield self.answer(b.broker.publish(["pub-1"], b"kept", ("u:pub-1", 7, "epoch")))
        if self.cluster:
            assert (reached, stored) == (1, 1)
            yield until(lambda: len(a.handler.delivered) == 2)
            assert a.handler.delivered == [
                ("pub-1", b"plain text", None),
                ("pub-1", b"kept", ("u:pub-1", 7, "epoch")),
            ]
        else:
            assert (reached, stored) == (0, 0)
            assert a.handler.delivered == []
        assert b.handler.delivered == []

    @defer.inlineCallbacks
    def test_publish_to_a_uid_nobody_holds_reaches_nobody(self) -> Any:
        a, b = yield defer.gatherResults([self.peer(), self.peer()])
        yield a.hold("held-2")
        assert (yield self.answer(b.broker.publish(["nobody-2"], b"x"))) == 0
        assert a.handler.delivered == []

    @defer.inlineCallbacks
    def test_a_nodes_own_subscription_is_not_counted(self) -> Any:
        a, b = yield defer.gatherResults([self.peer(), self.peer()])
        yield b.hold("own-3")
        assert (yield self.answer(b.broker.publish(["own-3"], b"x"))) == 0
        yield a.hold("own-3")
        expected = 1 if self.cluster else 0
        assert (yield self.answer(b.broker.publish(["own-3"], b"y"))) == expected
        yield self.received(lambda: a.handler.delivered)
        assert b.handler.delivered == []  # a node never hears its own publish

    @defer.inlineCallbacks
    def test_fan_out_is_acted_on_by_every_other_node_and_the_counts_summed(self) -> Any:
        a, b, c = yield defer.gatherResults(
            [self.peer(FakeHandler(acted=2)), self.peer(), self.peer(FakeHandler(acted=3))]
        )
        fields = {"data": "hello", "exclude": ["u-x"]}
        started = time.monotonic()
        total = yield self.answer(b.broker.fan_out("broadcast", fields))
        if self.cluster:
            assert total == 2 + 3
            # Answered once both nodes replied, not when the timeout gave up on them.
            assert time.monotonic() - started < TIMEOUT / 2
            for peer in (a, c):
                [(kind, got)] = peer.handler.acts
                assert kind == "broadcast"
                assert (got["data"], got["exclude"]) == ("hello", ["u-x"])
        else:
            assert total == 0
            assert a.handler.acts == c.handler.acts == []
        assert b.handler.acts == []  # the asking node acts on its own connections itself

    @defer.inlineCallbacks
    def test_fan_out_with_no_other_node_answers_zero(self) -> Any:
        a = yield self.peer(FakeHandler(acted=5))
        started = time.monotonic()
        assert (yield self.answer(a.broker.fan_out("disconnect", {"uids": ["z"]}))) == 0
        assert time.monotonic() - started < TIMEOUT / 2  # nobody to wait for
        assert a.handler.acts == []

    @defer.inlineCallbacks
    def test_memberships_reach_every_node_and_outlive_them(self) -> Any:
        a, b = yield defer.gatherResults([self.peer(), self.peer()])
        result = yield self.answer(b.broker.membership("join", ["m1", "m2"], ["room", "hall"]))
        assert result is None
        yield self.received(lambda: a.handler.memberships)
        if self.cluster:
            assert a.handler.memberships == [("join", ["m1", "m2"], ["room", "hall"])]
        else:
            assert a.handler.memberships == []
        assert b.handler.memberships == []  # its own note is not for it
        yield self.answer(b.broker.membership("leave", ["m1"], ["room"]))
        yield self.received(lambda: len(a.handler.memberships) == 2)
        if self.cluster:
            assert a.handler.memberships[1] == ("leave", ["m1"], ["room"])
        # A node that starts now adopts what is stored.
        late = yield self.peer()
        yield self.received(lambda: late.handler.adopted)
        if self.cluster:
            assert late.handler.adopted[-1] == {"room": {"m2"}, "hall": {"m1", "m2"}}
        else:
            assert late.handler.adopted == []

    @defer.inlineCallbacks
    def test_online_says_who_holds_a_connection_elsewhere(self) -> Any:
        a, b = yield defer.gatherResults([self.peer(), self.peer()])
        yield a.hold("on-4")
        online = yield self.answer(b.broker.online(["on-4", "off-4"]))
        if self.cluster:
            assert online == {"on-4": True, "off-4": False}
        else:
            assert online == {}

    @defer.inlineCallbacks
    def test_counts_add_the_other_nodes_records(self) -> Any:
        a_counts = {"uids": 1, "connections": 3, "pending": 1, "groups": 9}
        a, b = yield defer.gatherResults([self.peer(FakeHandler(counts=a_counts)), self.peer()])
        yield a.hold("count-a")
        local = {"uids": 1, "connections": 2, "pending": 0, "groups": 4}
        counts = yield self.answer(b.broker.counts(local, {"count-b"}))
        if self.cluster:
            assert counts == {"uids": 2, "connections": 5, "pending": 1, "groups": 4, "nodes": 2}
        else:
            assert counts == local

    @defer.inlineCallbacks
    def test_list_online_adds_the_other_nodes_uids(self) -> Any:
        a, b = yield defer.gatherResults([self.peer(), self.peer()])
        yield a.hold("list-a")
        listed = yield self.answer(b.broker.list_online({"list-b"}))
        assert set(listed) == ({"list-a", "list-b"} if self.cluster else {"list-b"})


class TestMemoryBroker(BrokerContract, ReactorTestCase):
    cluster = False

    def peer(self, handler: FakeHandler | None = None) -> defer.Deferred[Peer]:
        broker = MemoryBroker()
        handler = handler or FakeHandler()
        broker.start(handler)
        self.addCleanup(broker.stop)
        return defer.succeed(Peer(broker, handler))

    def answer(self, value: Any) -> defer.Deferred[Any]:
        assert not isinstance(value, defer.Deferred), "the memory broker answers at once"
        return defer.succeed(value)


class RedisCase(FlushedRedis, ReactorTestCase):
    """Nodes with Redis brokers on this module's redis-server, emptied before each test."""

    redis: RedisServer

    def setUp(self) -> None:
        # Registered first, run last: nothing a broker scheduled outlives the test.
        self.addCleanup(quiet)

    @defer.inlineCallbacks
    def peer(self, handler: FakeHandler | None = None) -> Any:
        handler = handler or FakeHandler()
        broker = RedisBroker([self.redis.url], timeout=TIMEOUT, heartbeat=5.0)
        broker.start(handler)
        self.addCleanup(broker.stop)
        yield until(lambda: broker.home.up)
        return Peer(broker, handler)

    def answer(self, value: Any) -> defer.Deferred[Any]:
        assert is_later(value), "the Redis broker answers later"
        return deferred(value)


class TestRedisBroker(BrokerContract, RedisCase):
    cluster = True

    def subscribers(self, uid: str) -> int:
        """Subscriptions to the uid's channel, straight from Redis (a blocking local round trip)."""
        reply = self.redis.command("PUBSUB", "NUMSUB", "pushsvc:u:" + uid)
        return int(reply.split(b"\r\n")[-2].lstrip(b":"))

    @defer.inlineCallbacks
    def test_unsubscribed_uids_are_not_received_any_more(self) -> Any:
        a, b = yield defer.gatherResults([self.peer(), self.peer()])
        yield a.hold("gone-5")
        assert self.subscribers("gone-5") == 1
        a.handler.uids.discard("gone-5")
        a.broker.unsubscribe("gone-5")
        # Nothing confirms an UNSUBSCRIBE: ask Redis until it has none for the uid.
        yield until(lambda: self.subscribers("gone-5") == 0)
        assert (yield deferred(b.broker.publish(["gone-5"], b"x"))) == 0


class TestRedisDown(RedisCase):
    """Redis unreachable: every cluster-wide answer fails with Unavailable, and soon."""

    @pytest.fixture(autouse=True)
    def _redis(self, tmp_path: Any) -> Iterator[None]:  # type: ignore[override]
        # Its own server: these tests kill or freeze it.
        self.redis = start_redis(tmp_path)
        yield
        self.redis.kill()

    def cluster_calls(self, peer: Peer) -> dict[str, defer.Deferred[Any]]:
        broker = peer.broker
        local = {"uids": 0, "connections": 0, "pending": 0, "groups": 0}
        return {
            "publish": deferred(broker.publish(["down-1"], b"x")),
            "fan_out": broker.fan_out("broadcast", {"data": "x", "exclude": []}),
            "membership": broker.membership("join", ["down-1"], ["g"]),
            "online": broker.online(["down-1"]),
            "counts": broker.counts(local, ()),
            "list_online": broker.list_online(()),
        }

    @defer.inlineCallbacks
    def assert_unavailable(self, peer: Peer, within: float) -> Any:
        """Every cluster call fails with Unavailable, each within ``within`` seconds."""
        started = time.monotonic()
        calls = self.cluster_calls(peer)
        timed = [d.addBoth(lambda r: (r, time.monotonic() - started)) for d in calls.values()]
        outcomes = yield defer.gatherResults(timed)
        wrong = [
            f"{name} answered {result!r} after {elapsed:.2f} s"
            for name, (result, elapsed) in zip(calls, outcomes, strict=True)
            if not (isinstance(result, Failure) and result.check(Unavailable) and elapsed < within)
        ]
        assert not wrong, f"expected Unavailable within {within} s: {wrong}"

    @defer.inlineCallbacks
    def test_a_stopped_redis_fails_every_call_at_once(self) -> Any:
        a, b = yield defer.gatherResults([self.peer(), self.peer()])
        yield a.hold("down-1")
        self.redis.kill()
        yield until(lambda: not b.broker.home.up)
        yield self.assert_unavailable(b, within=TIMEOUT / 2)

    @defer.inlineCallbacks
    def test_a_frozen_redis_fails_every_call_after_the_timeout(self) -> Any:
        """Redis alive but not answering: nothing may pass a guess (fan_out's 0) for an answer."""
        a, b = yield defer.gatherResults([self.peer(), self.peer()])
        yield a.hold("down-1")
        assert self.redis.proc is not None
        self.redis.proc.send_signal(signal.SIGSTOP)
        self.addCleanup(self.redis.proc.send_signal, signal.SIGCONT)
        yield self.assert_unavailable(b, within=TIMEOUT * 3)
