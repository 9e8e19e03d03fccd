"""Message history: pushes with a ``ttl`` are kept so a client that reconnects can catch up.

Each uid and each group is a *channel* (``u:<uid>``, ``g:<group>``) with a
stream: a random *epoch*, an integer *offset* that grows by one per stored
message, and the last ``--history-size`` messages, each until its ttl.  A
client tells us the last (offset, epoch) it saw; we replay what it missed, or
tell it that we cannot (trimmed, expired, epoch changed), never a partial
replay.  One node keeps streams in memory; a cluster keeps them in Redis so
any node can replay (docs/history.md).
"""

from __future__ import annotations

import random
import string
import time
from collections import deque
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson
from autobahn.websocket.protocol import PreparedMessage
from twisted.application.service import Service
from twisted.internet import defer, reactor
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from pushsvc.auth import CLOSE_BAD_REQUEST, AuthError
from pushsvc.cluster import STALE_AFTER, ClusterUnavailable
from pushsvc.registry import NOBODY, frame

if TYPE_CHECKING:
    from pushsvc.cluster import Cluster
    from pushsvc.registry import Connection, Registry

log = Logger()

MAX_TTL = 604800  # a week
DEFAULT_SIZE = 100
IDLE = 3600.0  # seconds an emptied stream is kept (its epoch with it) before it is dropped
SWEEP_INTERVAL = 60.0
ENVELOPE = b'{"pushsvc":"msg"'  # every envelope starts so (orjson keeps key order)
REDIS_KEY = "pushsvc:h:"

Position = tuple[int, "str | None"]
Entry = tuple[int, float, bytes, tuple[str, ...]]  # offset, expires at, payload, excluded uids


def new_epoch() -> str:
    """Letters only: txredisapi would turn a reply that looks like a number into one."""
    return "".join(random.choices(string.ascii_lowercase, k=10))


def envelope(channel: str, offset: int, epoch: str, payload: bytes) -> bytes:
    """The frame of a stored push: its position, and the text a plain push would send."""
    return orjson.dumps(
        {"pushsvc": "msg", "ch": channel, "off": offset, "ep": epoch, "data": payload.decode()}
    )


def position_of(prepared: PreparedMessage) -> tuple[str, int] | None:
    """The channel and offset of a framed envelope (None for a plain push)."""
    payload = getattr(prepared, "payload", b"")
    if not payload.startswith(ENVELOPE):
        return None
    message = orjson.loads(payload)
    return message["ch"], message["off"]


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


class Stream:
    __slots__ = ("epoch", "offset", "entries", "until")

    def __init__(self, size: int) -> None:
        self.epoch = new_epoch()
        self.offset = 0
        self.entries: deque[Entry] = deque(maxlen=size)
        self.until = 0.0  # when the longest-lived entry expires


class MemoryStore:
    """Streams in this process: one node, no Redis."""

    def __init__(self, size: int = DEFAULT_SIZE, idle: float = IDLE, clock=time.time) -> None:
        self.size = size
        self.idle = idle
        self.clock = clock
        self.streams: dict[str, Stream] = {}

    def append(
        self, channel: str, payload: bytes, ttl: float, excluded: tuple[str, ...] = ()
    ) -> tuple[int, str]:
        """Store one message; its (offset, epoch)."""
        now = self.clock()
        stream = self.streams.get(channel)
        if stream is None:
            stream = self.streams[channel] = Stream(self.size)
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


class RedisStore:
    """Streams in Redis (cluster mode): any node appends and any node replays."""

    def __init__(self, cluster: Cluster, size: int = DEFAULT_SIZE, idle: float = IDLE) -> None:
        self.cluster = cluster
        self.size = size
        self.idle = idle

    def _keys(self, channel: str) -> tuple[Any, str, str]:
        key = REDIS_KEY + channel
        return self.cluster.shard_of(channel), key + ":m", key

    def append(
        self, channel: str, payload: bytes, ttl: int, excluded: tuple[str, ...] = ()
    ) -> defer.Deferred[tuple[int, str]]:
        shard, meta, entries = self._keys(channel)
        expires_ms = int((time.time() + ttl) * 1000)
        tail = orjson.dumps([expires_ms, payload.decode(), list(excluded)])[1:].decode()
        keep = ttl + int(self.idle)  # the epoch outlives the entries
        d = shard.call("EVAL", APPEND, 2, meta, entries, new_epoch(), tail, self.size, ttl, keep)
        return d.addCallback(lambda reply: (int(reply[0]), reply[1]))

    def read(self, channel: str, since: Position) -> defer.Deferred[Recovery]:
        shard, meta, entries = self._keys(channel)

        def judged(reply: list) -> Recovery:
            current, epoch, raw = int(reply[0]), reply[1], reply[2]
            parsed: list[Entry] = []
            for item in raw:
                off, expires_ms, text, excluded = orjson.loads(item)
                parsed.append((off, expires_ms / 1000, text.encode(), tuple(excluded)))
            return judge(channel, since, current, epoch, parsed, time.time())

        return shard.call("EVAL", READ, 2, meta, entries, since[0]).addCallback(judged)


def parse_hello(text: str) -> tuple[str, dict[str, Position] | None]:
    """The credential and positions of a first frame.

    A JSON object with a ``uid`` or ``token`` key is a hello; any other text
    is the credential itself, as before.
    """
    try:
        hello = orjson.loads(text)
    except orjson.JSONDecodeError:
        return text, None
    if not isinstance(hello, dict) or not ("uid" in hello or "token" in hello):
        return text, None
    credential = hello.get("token", hello.get("uid"))
    if not isinstance(credential, str):
        raise AuthError(CLOSE_BAD_REQUEST, "uid and token must be strings")
    since = hello.get("since")
    if since is None:
        return credential, None
    if not isinstance(since, dict):
        raise AuthError(CLOSE_BAD_REQUEST, "since must be an object")
    positions: dict[str, Position] = {}
    for channel, pos in since.items():
        if (
            not isinstance(pos, list)
            or len(pos) != 2
            or not isinstance(pos[0], int)
            or isinstance(pos[0], bool)
            or pos[0] < 0
            or not (pos[1] is None or isinstance(pos[1], str))
        ):
            raise AuthError(CLOSE_BAD_REQUEST, "since values must be [offset, epoch]")
        positions[channel] = (pos[0], pos[1] or None)
    return credential, positions


class History(Service):
    """Stored pushes and recovery; the registry reaches it as ``registry.history``."""

    def __init__(
        self, registry: Registry, size: int = DEFAULT_SIZE, default_ttl: int = 0, idle: float = IDLE
    ) -> None:
        self.registry = registry
        self.size = size
        self.default_ttl = default_ttl
        self.idle = idle
        self.memory = MemoryStore(size, idle)
        self._redis: RedisStore | None = None
        self._sweeper = LoopingCall(self.memory.sweep)
        registry.history = self

    def startService(self) -> None:
        super().startService()
        if self.registry.cluster is None:
            self._sweeper.start(SWEEP_INTERVAL, now=False)

    def stopService(self) -> None:
        super().stopService()
        if self._sweeper.running:
            self._sweeper.stop()

    @property
    def redis(self) -> RedisStore:
        if self._redis is None:
            assert self.registry.cluster is not None
            self._redis = RedisStore(self.registry.cluster, self.size, self.idle)
        return self._redis

    # -- stored pushes (commands.push with a ttl) -----------------------------

    def push(self, uids: list[str], payload: bytes, ttl: int) -> Any:
        """Store for each uid, deliver with positions; a result dict (or a Deferred of one)."""
        registry = self.registry
        targets = [
            ("u:" + uid, lambda data, uid=uid: registry.local_push([uid], data), [uid])
            for uid in uids
        ]
        if registry.cluster is None:
            return self._stored(targets, payload, ttl, ())
        routed = [
            (ch, local, lambda data, uid=uid: registry.push([uid], data))
            for (ch, local, _), uid in zip(targets, uids, strict=True)
        ]
        return self._routed(routed, payload, ttl, ())

    def push_groups(
        self, groups: list[str], payload: bytes, exclude: Collection[str], ttl: int
    ) -> Any:
        """Store for each group; a connection in several of them gets one frame per group."""
        registry = self.registry
        excluded = tuple(sorted(exclude))
        skip = frozenset(exclude) or NOBODY
        targets = [
            ("g:" + g, lambda data, g=g: registry.local_push_groups([g], data, skip), None)
            for g in groups
        ]
        if registry.cluster is None:
            return self._stored(targets, payload, ttl, excluded)
        routed = [
            (ch, local, lambda data, g=g: registry.push_groups([g], data, skip))
            for (ch, local, _), g in zip(targets, groups, strict=True)
        ]
        return self._routed(routed, payload, ttl, excluded)

    def _stored(self, targets: list, payload: bytes, ttl: int, excluded: tuple[str, ...]) -> Any:
        delivered = 0
        positions: dict[str, Position] = {}
        for channel, local, _ in targets:
            off, ep = self.memory.append(channel, payload, ttl, excluded)
            delivered += local(envelope(channel, off, ep, payload))
            positions[channel] = (off, ep)
        return stored_result(delivered, positions, len(targets))

    def _routed(self, targets: list, payload: bytes, ttl: int, excluded: tuple[str, ...]) -> Any:
        """Cluster mode: append in Redis first (the envelope needs the offset), then route.

        If Redis cannot store it, this node's connections still get the plain
        text; the answer says it was not queued, or is an error if nobody got it.
        """
        calls = []
        for channel, local, routed in targets:

            def stored(pos: tuple[int, str], channel: str = channel, routed: Callable = routed):
                d = defer.maybeDeferred(routed, envelope(channel, pos[0], pos[1], payload))
                # Stored but not delivered now (Redis failed in between): still queued.
                d.addErrback(lambda f: f.trap(ClusterUnavailable) and 0)
                return d.addCallback(lambda n: (n, channel, pos, None))

            def unstored(failure: Any, local: Callable = local, channel: str = channel):
                failure.trap(ClusterUnavailable)
                return (local(payload), channel, None, failure.value.reason)

            d = self.redis.append(channel, payload, ttl, excluded)
            calls.append(d.addCallbacks(stored, unstored))

        def combine(results: list) -> dict[str, Any]:
            delivered = sum(r[0] for r in results)
            positions = {r[1]: r[2] for r in results if r[2] is not None}
            if not positions and not delivered:
                reason = next(r[3] for r in results if r[3])
                raise ClusterUnavailable(f"history unavailable: {reason}")
            return stored_result(delivered, positions, len(targets))

        d = defer.gatherResults(calls, consumeErrors=True)
        d.addErrback(lambda f: f.value.subFailure if f.check(defer.FirstError) else f)
        return d.addCallback(combine)

    # -- recovery (the WebSocket frontend, right after identify) --------------

    def allowed(self, uid: str, groups: Collection[str], channel: str) -> bool:
        """Only a connection's own channels can be replayed to it."""
        if channel.startswith("u:"):
            return channel[2:] == uid
        if channel.startswith("g:"):
            group = channel[2:]
            return group in groups or self.registry.in_group(uid, group)
        return False

    def recover(
        self, conn: Connection, uid: str, groups: Collection[str], since: dict[str, Position]
    ) -> None:
        """Replay what the connection missed, then let live frames through, with no gap.

        One node: the read is synchronous, so identify and replay happen in the
        same reactor turn and nothing can come in between.  Cluster: live
        frames for this connection are held while Redis is read (an instance
        attribute shadows ``sendPreparedMessage``: no cost on anyone's hot
        path), then the replay is sent, then the held frames it does not cover.
        """
        wanted = [(ch, pos) for ch, pos in since.items() if self.allowed(uid, groups, ch)]
        if not wanted:
            return
        cluster = self.registry.cluster
        if cluster is None:
            for channel, pos in wanted:
                self._send(conn, uid, self.memory.read(channel, pos))
            return
        held: list[PreparedMessage] = []
        conn.sendPreparedMessage = held.append  # type: ignore[method-assign]

        def read(_: object) -> defer.Deferred[list]:
            calls = []
            for channel, pos in wanted:
                d = self.redis.read(channel, pos)
                d.addErrback(lambda f, channel=channel: Recovery(channel, False, None, None))
                calls.append(d)
            return defer.gatherResults(calls)

        def fresh(prepared: PreparedMessage, covered: dict[str, int]) -> bool:
            pos = position_of(prepared)
            return pos is None or pos[1] > covered.get(pos[0], -1)

        def finish(recoveries: list[Recovery]) -> None:
            del conn.sendPreparedMessage  # type: ignore[attr-defined]
            covered = {}
            for recovery in recoveries:
                self._send(conn, uid, recovery)
                if recovery.offset is not None:
                    covered[recovery.channel] = recovery.offset
            for prepared in held:
                if fresh(prepared, covered):
                    conn.sendPreparedMessage(prepared)
            # A message the replay covered may still be on its way from the
            # node that stored it (stored first, then PUBLISHed): keep dropping
            # covered offsets until such a message would be dropped as stale.
            send = conn.sendPreparedMessage

            def filtered(prepared: PreparedMessage) -> None:
                if fresh(prepared, covered):
                    send(prepared)

            conn.sendPreparedMessage = filtered  # type: ignore[method-assign]
            reactor.callLater(STALE_AFTER, conn.__dict__.pop, "sendPreparedMessage", None)

        d = cluster.subscribed(uid)
        d.addErrback(lambda _: None)  # not subscribed in time: the reads will say so
        d.addCallback(read).addCallback(finish)
        d.addErrback(lambda f: log.failure("recovery failed", f))

    def _send(self, conn: Connection, uid: str, recovery: Recovery) -> None:
        metrics = self.registry.metrics
        for off, payload, excluded in recovery.entries:
            if uid not in excluded:
                data = envelope(recovery.channel, off, recovery.epoch or "", payload)
                conn.sendPreparedMessage(frame(data))
                metrics.frames_sent += 1
                metrics.bytes_sent += len(data)
        conn.sendPreparedMessage(frame(recovery.status()))


def stored_result(delivered: int, positions: dict[str, Position], channels: int) -> dict[str, Any]:
    """A push-with-ttl's answer: delivered now, and whether every channel stored it."""
    result: dict[str, Any] = {
        "ok": delivered > 0 or bool(positions),
        "delivered": delivered,
        "queued": len(positions) == channels,
    }
    if channels == 1 and positions:
        ((off, ep),) = positions.values()
        result["off"], result["ep"] = off, ep
    elif channels > 1:
        result["positions"] = {ch: list(pos) for ch, pos in positions.items()}
    return result
