"""The HistoryStore interface and its two implementations: memory (one node) and Redis.

``append`` returns the stored message's position; ``read`` returns what a
client missed since a position, or why it cannot have it.  Both answer at
once in memory and with a Deferred in Redis.
"""

from __future__ import annotations

import random
import string
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.task import LoopingCall

MAX_TTL = 604800  # a week
DEFAULT_SIZE = 100
IDLE = 3600.0  # seconds an emptied stream is kept (its epoch with it) before it is dropped
SWEEP_INTERVAL = 60.0
REDIS_KEY = "pushsvc:h:"

Position = tuple[int, "str | None"]  # (offset, epoch) within one channel
Entry = tuple[int, float, bytes, tuple[str, ...]]  # offset, expires at, payload, excluded uids


def new_epoch() -> str:
    """Letters only: no Redis client can take an epoch for a number."""
    return "".join(random.choices(string.ascii_lowercase, k=10))


def envelope(channel: str, offset: int, epoch: str, payload: bytes) -> bytes:
    """The frame of a stored push for clients that asked for positions."""
    return orjson.dumps(
        {"pushsvc": "msg", "ch": channel, "off": offset, "ep": epoch, "data": payload.decode()}
    )


@dataclass
class Recovery:
    """What a client missed on one channel, or why it cannot have it."""

    channel: str
    recovered: bool
    offset: int | None  # the stream's current offset (None: history unreachable)
    epoch: str | None
    entries: list[tuple[int, bytes, tuple[str, ...]]] = field(default_factory=list)

    def status(self) -> bytes:
        return orjson.dumps(
            {
                "pushsvc": "recovery",
                "ch": self.channel,
                "recovered": self.recovered,
                "off": self.offset,
                "ep": self.epoch,
            }
        )


def judge(
    channel: str,
    since: Position,
    current: int,
    epoch: str | None,
    entries: Iterable[Entry],
    now: float,
) -> Recovery:
    """All of (since, current] or nothing: a gap, an expiry or a new epoch fails the recovery.

    ``since``'s epoch may be None: a client that never saw one asks for everything kept.
    """
    offset, seen_epoch = since
    failed = Recovery(channel, False, current, epoch)
    if (seen_epoch is not None and seen_epoch != epoch) or offset > current:
        return failed
    missed = [e for e in entries if e[0] > offset]
    if len(missed) != current - offset or (missed and missed[0][0] != offset + 1):
        return failed
    if any(expires <= now for _, expires, _, _ in missed):
        return failed
    kept = [(off, payload, excluded) for off, _, payload, excluded in missed]
    return Recovery(channel, True, current, epoch, kept)


class HistoryStore(Protocol):
    """Where streams live."""

    def append(
        self, channel: str, payload: bytes, ttl: int, excluded: tuple[str, ...] = ()
    ) -> tuple[int, str] | defer.Deferred[tuple[int, str]]:
        """Store one message; its (offset, epoch)."""

    def read(self, channel: str, since: Position) -> Recovery | defer.Deferred[Recovery]:
        """What a client missed on ``channel`` since ``since``."""


class _Stream:
    __slots__ = ("epoch", "offset", "entries", "until")

    def __init__(self, size: int) -> None:
        self.epoch = new_epoch()
        self.offset = 0
        self.entries: deque[Entry] = deque(maxlen=size)
        self.until = 0.0  # when the longest-lived entry expires


class MemoryStore(Service):
    """Streams in this process (one node); a service that sweeps expired ones."""

    def __init__(
        self, size: int = DEFAULT_SIZE, idle: float = IDLE, clock: Callable[[], float] = time.time
    ) -> None:
        self.size = size
        self.idle = idle
        self.clock = clock
        self.streams: dict[str, _Stream] = {}
        self._sweeper = LoopingCall(self.sweep)

    def startService(self) -> None:
        super().startService()
        self._sweeper.start(SWEEP_INTERVAL, now=False)

    def stopService(self) -> None:
        super().stopService()
        if self._sweeper.running:
            self._sweeper.stop()

    def append(
        self, channel: str, payload: bytes, ttl: float, excluded: tuple[str, ...] = ()
    ) -> tuple[int, str]:
        now = self.clock()
        stream = self.streams.get(channel)
        if stream is None:
            stream = self.streams[channel] = _Stream(self.size)
        entries = stream.entries
        while entries and entries[0][1] <= now:
            entries.popleft()  # lazily: the deque's maxlen trims the rest
        stream.offset += 1
        expires = now + ttl
        entries.append((stream.offset, expires, payload, excluded))
        stream.until = max(stream.until, expires)
        return stream.offset, stream.epoch

    def read(self, channel: str, since: Position) -> Recovery:
        stream = self.streams.get(channel)
        if stream is None:
            return judge(channel, since, 0, None, (), self.clock())
        return judge(channel, since, stream.offset, stream.epoch, stream.entries, self.clock())

    def sweep(self) -> None:
        """Drop expired entries, and streams empty for ``idle`` seconds (their epoch ends)."""
        now = self.clock()
        for channel, stream in list(self.streams.items()):
            entries = stream.entries
            while entries and entries[0][1] <= now:
                entries.popleft()
            if not entries and stream.until + self.idle <= now:
                del self.streams[channel]


# KEYS: meta hash (o: offset, e: epoch), entry list.
# ARGV: a new epoch, the entry's JSON after its offset, size, list ttl, meta ttl.
APPEND = """
redis.call('HSETNX', KEYS[1], 'e', ARGV[1])
local off = redis.call('HINCRBY', KEYS[1], 'o', 1)
redis.call('RPUSH', KEYS[2], '[' .. off .. ',' .. ARGV[2])
redis.call('LTRIM', KEYS[2], -tonumber(ARGV[3]), -1)
if redis.call('TTL', KEYS[2]) < tonumber(ARGV[4]) then redis.call('EXPIRE', KEYS[2], ARGV[4]) end
if redis.call('TTL', KEYS[1]) < tonumber(ARGV[5]) then redis.call('EXPIRE', KEYS[1], ARGV[5]) end
return {off, redis.call('HGET', KEYS[1], 'e')}
"""

# ARGV: the client's offset.  Returns the current offset, the epoch and the
# entries after the client's offset (none if more are missing than are kept).
READ = """
local meta = redis.call('HMGET', KEYS[1], 'o', 'e')
if not meta[1] then return {0, false, {}} end
local cur = tonumber(meta[1])
local want = cur - tonumber(ARGV[1])
if want <= 0 or want > redis.call('LLEN', KEYS[2]) then return {cur, meta[2], {}} end
return {cur, meta[2], redis.call('LRANGE', KEYS[2], -want, -1)}
"""

RedisCall = Callable[..., "defer.Deferred[Any]"]


class RedisStore(Service):
    """Streams in Redis (a cluster): any node appends and any node replays.

    ``call(key, *command)`` runs a command on the Redis server that holds
    ``key`` (the Redis broker's ``call``); Redis expires what is old, so
    there is nothing to sweep.
    """

    def __init__(self, call: RedisCall, size: int = DEFAULT_SIZE, idle: float = IDLE) -> None:
        self._call = call
        self.size = size
        self.idle = idle

    def append(
        self, channel: str, payload: bytes, ttl: int, excluded: tuple[str, ...] = ()
    ) -> defer.Deferred[tuple[int, str]]:
        key = REDIS_KEY + channel
        expires_ms = int((time.time() + ttl) * 1000)
        tail = orjson.dumps([expires_ms, payload.decode(), list(excluded)])[1:].decode()
        keep = ttl + int(self.idle)  # the epoch outlives the entries
        d = self._call(
            channel, "EVAL", APPEND, 2, key + ":m", key, new_epoch(), tail, self.size, ttl, keep
        )
        return d.addCallback(lambda reply: (int(reply[0]), reply[1]))

    def read(self, channel: str, since: Position) -> defer.Deferred[Recovery]:
        key = REDIS_KEY + channel

        def judged(reply: list) -> Recovery:
            current, epoch, raw = int(reply[0]), reply[1], reply[2]
            parsed: list[Entry] = []
            for item in raw:
                off, expires_ms, text, excluded = orjson.loads(item)
                parsed.append((off, expires_ms / 1000, text.encode(), tuple(excluded)))
            return judge(channel, since, current, epoch, parsed, time.time())

        d = self._call(channel, "EVAL", READ, 2, key + ":m", key, since[0])
        return d.addCallback(judged)
