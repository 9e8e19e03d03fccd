"""The HistoryStore contract: the same cases against MemoryStore and RedisStore's Lua scripts.

RedisStore runs its APPEND and READ scripts on a real redis-server through
a Shard (the call the Redis broker gives it).  Time is a fake clock for
both stores: MemoryStore takes it as its clock, RedisStore reads
``time.time()`` of its module, which the Redis cases replace.  The key
expiry the scripts set is checked with Redis's TTL command instead of
waiting for it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

from reactor_helper import (
    FlushedRedis,
    ReactorTestCase,
    module_redis,  # noqa: F401 (the fixture FlushedRedis uses)
    quiet,
    until,
)
from twisted.internet import defer

import pushsvc.history.store as store_module
from pushsvc.broker.shard import Shard
from pushsvc.history.store import REDIS_KEY, MemoryStore, Recovery, RedisStore

IDLE = 100


class Now:
    """A settable clock, in seconds since the epoch."""

    def __init__(self) -> None:
        self.t = time.time()

    def __call__(self) -> float:
        return self.t


def missed(recovery: Recovery) -> list[tuple[int, bytes]]:
    return [(off, payload) for off, payload, _ in recovery.entries]


class StoreContract:
    """The cases, for any store; subclasses build one and say how it answers."""

    now: Now
    # A store keeping ``size`` messages a stream (its epoch ``IDLE`` seconds past the last).
    make: Callable[[int], Any]
    # The store's answer as a Deferred, once checked it came the way this store answers.
    answer: Callable[[Any], defer.Deferred[Any]]

    @defer.inlineCallbacks
    def append(self, store: Any, channel: str, payloads: list[bytes], ttl: int = 60) -> Any:
        positions = []
        for payload in payloads:
            positions.append((yield self.answer(store.append(channel, payload, ttl))))
        return positions

    @defer.inlineCallbacks
    def test_offsets_grow_by_one_within_a_stable_epoch(self) -> Any:
        store = self.make(10)
        positions = yield self.append(store, "u:a", [b"1", b"2", b"3"])
        epoch = positions[0][1]
        assert positions == [(1, epoch), (2, epoch), (3, epoch)]
        assert isinstance(epoch, str) and epoch.isalpha()
        [(offset, other)] = yield self.append(store, "u:b", [b"x"])
        assert offset == 1 and other != epoch  # every channel is a stream of its own

    @defer.inlineCallbacks
    def test_read_returns_what_was_missed_with_its_exclusions(self) -> Any:
        store = self.make(10)
        [(_, epoch)] = yield self.append(store, "g:room", [b"one"])
        yield self.answer(store.append("g:room", "d\u00e9j\u00e0".encode(), 60, ("ann", "bob")))
        yield self.answer(store.append("g:room", b"three", 60))
        got = yield self.answer(store.read("g:room", (1, epoch)))
        assert (got.channel, got.recovered, got.offset, got.epoch) == ("g:room", True, 3, epoch)
        assert got.entries == [(2, "d\u00e9j\u00e0".encode(), ("ann", "bob")), (3, b"three", ())]
        up_to_date = yield self.answer(store.read("g:room", (3, epoch)))
        assert (up_to_date.recovered, up_to_date.entries) == (True, [])

    @defer.inlineCallbacks
    def test_a_client_without_an_epoch_gets_everything_kept(self) -> Any:
        store = self.make(10)
        yield self.append(store, "u:a", [b"1", b"2"])
        got = yield self.answer(store.read("u:a", (0, None)))
        assert got.recovered and missed(got) == [(1, b"1"), (2, b"2")]

    @defer.inlineCallbacks
    def test_trimmed_history_fails_never_a_partial_replay(self) -> Any:
        store = self.make(3)
        positions = yield self.append(store, "u:a", [b"1", b"2", b"3", b"4", b"5"])
        epoch = positions[-1][1]
        for since in (0, 1):
            got = yield self.answer(store.read("u:a", (since, epoch)))
            assert (got.recovered, got.entries, got.offset) == (False, [], 5), since
        got = yield self.answer(store.read("u:a", (2, epoch)))
        assert got.recovered and missed(got) == [(3, b"3"), (4, b"4"), (5, b"5")]

    @defer.inlineCallbacks
    def test_an_unknown_channel_has_nothing_to_miss(self) -> Any:
        store = self.make(10)
        got = yield self.answer(store.read("u:nobody", (0, None)))
        assert (got.recovered, got.offset, got.epoch, got.entries) == (True, 0, None, [])
        # A client that saw a stream that is gone cannot have recovered it.
        got = yield self.answer(store.read("u:nobody", (3, "gone")))
        assert (got.recovered, got.offset, got.epoch) == (False, 0, None)

    @defer.inlineCallbacks
    def test_another_epoch_or_a_future_offset_fails(self) -> Any:
        store = self.make(10)
        [(_, epoch), _] = yield self.append(store, "u:a", [b"1", b"2"])
        got = yield self.answer(store.read("u:a", (1, "another")))
        assert (got.recovered, got.offset, got.epoch, got.entries) == (False, 2, epoch, [])
        got = yield self.answer(store.read("u:a", (3, epoch)))
        assert not got.recovered

    @defer.inlineCallbacks
    def test_an_expired_message_fails_the_recovery_that_needs_it(self) -> Any:
        store = self.make(10)
        [(_, epoch)] = yield self.append(store, "u:a", [b"short"], ttl=10)
        yield self.append(store, "u:a", [b"long"], ttl=60)
        self.now.t += 11
        got = yield self.answer(store.read("u:a", (0, epoch)))
        assert (got.recovered, got.entries) == (False, [])
        got = yield self.answer(store.read("u:a", (1, epoch)))
        assert got.recovered and missed(got) == [(2, b"long")]
        self.now.t += 50
        got = yield self.answer(store.read("u:a", (1, epoch)))
        assert not got.recovered


class TestMemoryStore(StoreContract, ReactorTestCase):
    def setUp(self) -> None:
        self.now = Now()

    def make(self, size: int) -> MemoryStore:
        return MemoryStore(size=size, idle=IDLE, clock=self.now)

    def answer(self, value: Any) -> defer.Deferred[Any]:
        assert not isinstance(value, defer.Deferred), "the memory store answers at once"
        return defer.succeed(value)


def _nothing(*args: object) -> None:
    """A shard owner that wants no channel and ignores messages: only commands here."""


class TestRedisStore(StoreContract, FlushedRedis, ReactorTestCase):
    @defer.inlineCallbacks
    def setUp(self) -> Any:
        self.addCleanup(quiet)
        self.now = Now()
        # RedisStore stamps and judges entries with its module's time.time().
        self.patch(store_module, "time", SimpleNamespace(time=self.now))
        self.shard = Shard(self.redis.url, 1.0, lambda shard: [], _nothing, _nothing)
        self.shard.start()
        self.addCleanup(self.shard.stop)
        yield until(lambda: self.shard.up)

    def call(self, key: str, *args: Any) -> defer.Deferred[Any]:
        return self.shard.call(*args)

    def make(self, size: int) -> RedisStore:
        return RedisStore(self.call, size=size, idle=IDLE)

    def answer(self, value: Any) -> defer.Deferred[Any]:
        assert isinstance(value, defer.Deferred), "the Redis store answers later"
        return value

    @defer.inlineCallbacks
    def ttls(self, channel: str) -> Any:
        """Seconds until Redis drops the channel's entries and its offset and epoch."""
        entries = yield self.shard.call("TTL", REDIS_KEY + channel)
        meta = yield self.shard.call("TTL", REDIS_KEY + channel + ":m")
        return entries, meta

    @defer.inlineCallbacks
    def test_redis_keeps_entries_for_the_longest_ttl_and_the_epoch_idle_seconds_more(self) -> Any:
        store = self.make(10)
        yield store.append("u:a", b"1", 60)
        entries, meta = yield self.ttls("u:a")
        assert 58 <= entries <= 60 and 58 + IDLE <= meta <= 60 + IDLE, (entries, meta)
        yield store.append("u:a", b"2", 10)  # a shorter ttl never shortens what is kept
        entries, meta = yield self.ttls("u:a")
        assert 58 <= entries <= 60 and 58 + IDLE <= meta <= 60 + IDLE, (entries, meta)
        yield store.append("u:a", b"3", 120)
        entries, meta = yield self.ttls("u:a")
        assert 118 <= entries <= 120 and 118 + IDLE <= meta <= 120 + IDLE, (entries, meta)

    @defer.inlineCallbacks
    def test_entries_gone_from_redis_fail_but_an_up_to_date_client_recovers(self) -> Any:
        store = self.make(10)
        [_, (_, epoch)] = yield self.append(store, "u:a", [b"1", b"2"])
        yield self.shard.call("DEL", REDIS_KEY + "u:a")  # the entries' key expired first
        got = yield store.read("u:a", (0, epoch))
        assert (got.recovered, got.offset, got.epoch) == (False, 2, epoch)
        got = yield store.read("u:a", (2, epoch))
        assert (got.recovered, got.entries) == (True, [])

    @defer.inlineCallbacks
    def test_a_stream_that_expired_starts_again_with_a_new_epoch(self) -> Any:
        store = self.make(10)
        [(_, epoch)] = yield self.append(store, "u:a", [b"1"])
        yield self.shard.call("DEL", REDIS_KEY + "u:a", REDIS_KEY + "u:a:m")
        [(offset, new_epoch)] = yield self.append(store, "u:a", [b"again"])
        assert offset == 1 and new_epoch != epoch
        got = yield store.read("u:a", (1, epoch))
        assert not got.recovered
