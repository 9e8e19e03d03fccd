"""The cluster broker: nodes share their users through Redis pub/sub.

Routing follows Centrifugo's design: a node SUBSCRIBEs to ``pushsvc:u:<uid>``
while it holds a connection of that uid, so a push PUBLISHes to the uid's
channel and only nodes with that user receive it; PUBLISH's receiver count is
the cluster-wide answer.  Broadcasts, group pushes and disconnects go to
every node over ``pushsvc:all``; each node acts on its own connections and
answers the asking node on its reply channel with what it did, so the
backend still gets an exact count.  Group memberships are kept in Redis sets
(for nodes that start later) and replayed to every node.

Every message carries the time it was sent; a node drops one older than
STALE_AFTER (a progress bar should not jump back to 10 % a minute after it
showed 100 %), counts it and logs it once a minute.
"""

from __future__ import annotations

import itertools
import os
import socket
import time
import uuid
from collections.abc import Collection, Iterable
from functools import partial
from typing import Any

import orjson
from twisted.internet import defer, reactor
from twisted.internet.task import LoopingCall
from twisted.logger import Logger, LogLevel

from pushsvc.broker.base import BrokerHandler
from pushsvc.broker.connection import ignore_reply, publish_command
from pushsvc.broker.ring import hash_ring
from pushsvc.broker.shard import Shard
from pushsvc.errors import Unavailable
from pushsvc.ratelog import RateLimitedLog
from pushsvc.results import Later, first_failure

PREFIX = "pushsvc:"
ALL = PREFIX + "all"
UID = PREFIX + "u:"
GROUP = PREFIX + "g:"
NODE = PREFIX + "node:"
REPLY = PREFIX + "r:"
UID_BYTES = UID.encode()
UID_LEN = len(UID_BYTES)
# Seconds after which a message from another node is dropped instead of
# delivered.  Not --redis-timeout: the sender answered ``ok`` as soon as
# Redis counted a receiver, so a message that is merely slow to be read here
# (an overloaded node) must still be delivered.
STALE_AFTER = 30.0
STALE_AFTER_MS = STALE_AFTER * 1000

log = Logger()


def unreachable(failure: Any) -> Any:
    """Turn any failure of a scatter/gather into the one error a backend sees."""
    failure = first_failure(failure)
    failure.trap(Unavailable)
    raise Unavailable("Redis is unreachable")


def _one_reply(answer: Later, mine: int, count: Any) -> None:
    """A one-uid push's PUBLISH reply; ``mine`` is 1 if our own subscription is counted in it."""
    if isinstance(count, Exception):
        answer.fail(Unavailable("Redis is unreachable"))
    else:
        answer.resolve(max(0, count - mine))


class _Gathering:
    """The answers to one fan-out: acks may arrive before PUBLISH's own reply."""

    __slots__ = ("id", "total", "answer", "expected", "acks", "failed", "timer")

    def __init__(self, gathering_id: int) -> None:
        self.id = gathering_id
        self.total = 0
        self.answer: defer.Deferred[int] = defer.Deferred()
        self.expected: int | None = None  # other nodes that got it, once PUBLISH says
        self.acks = 0
        self.failed = False
        self.timer: Any = None

    def acked(self, count: int) -> None:
        self.acks += 1
        self.total += count

    @property
    def complete(self) -> bool:
        return self.expected is not None and self.acks >= self.expected


class _Sum:
    """The summed receiver counts of one push's PUBLISHes: one answer, not one per uid."""

    __slots__ = ("answer", "left", "total", "error", "closed")

    def __init__(self) -> None:
        self.answer = Later()
        self.left = 0
        self.total = 0
        self.error: Exception | None = None
        self.closed = False

    def reply(self, mine: int, count: Any) -> None:
        """One PUBLISH's reply; ``mine`` is 1 if this node's own subscription is counted in it."""
        self.left -= 1
        if isinstance(count, Exception):
            self.error = self.error or count
        else:
            self.total += max(0, count - mine)
        self._done()

    def close(self) -> Later:
        self.closed = True
        self._done()
        return self.answer

    def _done(self) -> None:
        if self.left or not self.closed:
            return
        if self.error is None:
            self.answer.resolve(self.total)
        else:
            self.answer.fail(Unavailable("Redis is unreachable"))


class RedisBroker:
    """A node's link to the other nodes through one or more Redis servers (``--redis``)."""

    max_delay = STALE_AFTER

    def __init__(
        self,
        urls: list[str],
        timeout: float = 1.0,
        heartbeat: float = 2.0,
    ) -> None:
        self.node = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self._node_bytes = self.node.encode()
        self._head = self._node_bytes + b"\x00"  # a message: origin, sent, offset, epoch, payload
        self.timeout = timeout
        self.heartbeat = heartbeat
        self.shards = [
            Shard(url, timeout, self._channels_for, self._received, self._shard_up) for url in urls
        ]
        self._ring = hash_ring([(shard.name, shard) for shard in self.shards])
        self.home = self.shards[0]  # global channels and keys live on the first Redis
        self._single = self.home if len(self.shards) == 1 else None
        self.reply_channel = REPLY + self.node
        self._reply_bytes = self.reply_channel.encode()
        self.stale_messages = 0
        self._stale_log = RateLimitedLog(log, level=LogLevel.warn)
        self._ids = itertools.count(1)
        self._waiting: dict[int, _Gathering] = {}
        self._heartbeat = LoopingCall(self._beat)
        self.handler: BrokerHandler | None = None

    # -- lifecycle --------------------------------------------------------------

    def start(self, handler: BrokerHandler) -> None:
        self.handler = handler
        for shard in self.shards:
            shard.start()
        self._heartbeat.start(self.heartbeat, now=False)

    def stop(self) -> defer.Deferred[Any]:
        if self._heartbeat.running:
            self._heartbeat.stop()
        d = self.home.call("DEL", NODE + self.node) if self.home.up else defer.succeed(None)
        d.addErrback(lambda _: None)
        return d.addCallback(lambda _: defer.gatherResults([s.stop() for s in self.shards]))

    # -- where things live ----------------------------------------------------

    def shard_of(self, key: str) -> Shard:
        if self._single is not None:  # one --redis: no hashing per push
            return self._single
        return self._ring(key.encode("utf-8"))

    def call(self, key: str, *args: Any) -> defer.Deferred[Any]:
        """Run a Redis command on the server that holds ``key`` (history keeps streams so)."""
        return self.shard_of(key).call(*args)

    def _channels_for(self, shard: Shard) -> list[str]:
        """Every channel this node needs on ``shard``: its local uids (and globals on home)."""
        assert self.handler is not None
        channels = [UID + uid for uid in self.handler.local_uids() if self.shard_of(uid) is shard]
        if shard is self.home:
            channels += [ALL, self.reply_channel]
        return channels

    def _shard_up(self, shard: Shard) -> None:
        if shard is self.home:
            self._beat()
            self._load_groups()

    # -- subscriptions ------------------------------------------------------------

    def subscribe(self, uid: str) -> None:
        self.shard_of(uid).want(UID + uid)

    def unsubscribe(self, uid: str) -> None:
        self.shard_of(uid).unwant(UID + uid)

    def subscribed(self, uid: str) -> defer.Deferred[None] | None:
        return self.shard_of(uid).when_subscribed(UID + uid)

    # -- delivery ---------------------------------------------------------------

    def publish(
        self, uids: Iterable[str], payload: bytes, position: tuple[str, int, str] | None = None
    ) -> Later:
        """PUBLISH to each uid's channel; the receiver counts (other nodes) summed.

        A push to one uid (the common case) waits for its one reply with a
        bare Later; several uids share one ``_Sum``.
        """
        if position is None:
            message = b"%b%d\x00\x00\x00%b" % (self._head, int(time.time() * 1000), payload)
        else:
            message = b"%b%d\x00%d\x00%b\x00%b" % (
                self._head,
                int(time.time() * 1000),
                position[1],
                position[2].encode(),
                payload,
            )
        if type(uids) is list and len(uids) == 1:
            uid = uids[0]
            channel = UID + uid
            shard = self._single or self.shard_of(uid)
            # Our own subscription (if we hold the uid) counts as a receiver.
            answer = Later()
            reply = partial(_one_reply, answer, 1 if shard.may_count_me(channel) else 0)
            shard.send(publish_command(channel.encode(), message), reply)
            return answer
        total = _Sum()
        for uid in uids:
            channel = UID + uid
            shard = self.shard_of(uid)
            mine = 1 if shard.may_count_me(channel) else 0
            total.left += 1
            shard.send(publish_command(channel.encode(), message), partial(total.reply, mine))
        return total.close()

    def fan_out(self, kind: str, fields: dict[str, Any]) -> defer.Deferred[int]:
        """Ask every other node to act on its connections; sum what they report."""
        gathering = _Gathering(next(self._ids))
        message = {"k": kind, "o": self.node, "i": gathering.id, "t": _now_ms(), **fields}
        self._waiting[gathering.id] = gathering
        gathering.timer = reactor.callLater(self.timeout, self._finish, gathering)

        def published(receivers: int) -> None:
            gathering.expected = receivers - 1  # we receive our own message on ALL too
            if gathering.complete:
                self._finish(gathering)

        def failed(failure: Any) -> None:
            gathering.failed = True
            self._finish(gathering)

        self.home.call("PUBLISH", ALL, _dumps(message)).addCallbacks(published, failed)
        return gathering.answer

    def _finish(self, gathering: _Gathering) -> None:
        """Answer: every ack is in, or the timeout came (late acks are not waited for).

        Without PUBLISH's own reply nobody knows who got the message: that is
        Redis not answering, not zero receivers.
        """
        if self._waiting.pop(gathering.id, None) is None:
            return  # answered already
        if gathering.timer.active():
            gathering.timer.cancel()
        if gathering.failed or gathering.expected is None:
            gathering.answer.errback(Unavailable("Redis is unreachable"))
        else:
            gathering.answer.callback(gathering.total)

    def _ack(self, gathering_id: int, count: int) -> None:
        gathering = self._waiting.get(gathering_id)
        if gathering is not None:  # else too late: answered already
            gathering.acked(count)
            if gathering.complete:
                self._finish(gathering)

    # -- messages from other nodes ----------------------------------------------

    def _received(self, channel: bytes, message: bytes) -> None:
        handler = self.handler
        assert handler is not None
        if channel.startswith(UID_BYTES):
            if message.startswith(self._head):
                return  # our own push (this node holds the uid too): delivered here already
            _, sent, offset, epoch, payload = message.split(b"\x00", 4)
            sent_ms = int(sent)
            # _stale (a call) only for what looks stale: it decides, counts and logs.
            if time.time() * 1000 - sent_ms > STALE_AFTER_MS and self._stale(sent_ms):
                return
            uid = channel[UID_LEN:].decode()
            position = ("u:" + uid, int(offset), epoch.decode()) if offset else None
            handler.deliver_uid(uid, payload, position)
            return
        data = orjson.loads(message)
        if channel == self._reply_bytes:
            self._ack(data["i"], data["n"])
            return
        if data["o"] == self.node:
            return
        kind = data["k"]
        if kind in ("join", "leave"):  # applied however late: memberships must converge
            handler.membership(kind, data["uids"], data["groups"])
            count = 0
        else:
            count = 0 if self._stale(data["t"]) else handler.act(kind, data)
        reply = orjson.dumps({"i": data["i"], "n": count})
        self.home.send(("PUBLISH", REPLY + data["o"], reply), ignore_reply)

    def _stale(self, sent_ms: int) -> bool:
        """Too old to deliver: counted, and logged at most once a minute."""
        age = time.time() - sent_ms / 1000
        if age <= STALE_AFTER:
            return False
        self.stale_messages += 1
        self._stale_log.emit(
            "stale",
            "dropped a cluster message sent {age:.0f} s ago (more than {limit} s): "
            "this node or Redis is overloaded ({suppressed} more were dropped since the last "
            "such line; the next minute's are only counted)",
            age=age,
            limit=STALE_AFTER,
        )
        return True

    # -- groups -------------------------------------------------------------------

    def membership(self, kind: str, uids: list[str], groups: list[str]) -> defer.Deferred[None]:
        """Store a join/leave in Redis, then tell every node and wait for their acks.

        Answered once every node has applied it (or after --redis-timeout), so a
        backend that joins through one node and pushes to the group through
        another reaches the new member.
        """
        command = "SADD" if kind == "join" else "SREM"
        calls = [self.home.call(command, GROUP + group, *uids) for group in groups]
        d = defer.gatherResults(calls, consumeErrors=True)
        d.addCallback(lambda _: self.fan_out(kind, {"uids": uids, "groups": groups}))
        return d.addCallbacks(lambda _: None, unreachable)

    @defer.inlineCallbacks
    def _load_groups(self) -> Any:
        """Adopt every membership stored in Redis (missed while disconnected or started later)."""
        try:
            groups: dict[str, set[str]] = {}
            for key in (yield self._scan(GROUP + "*")):
                members = yield self.home.call("SMEMBERS", key)
                groups[key[len(GROUP) :]] = set(members)
        except Unavailable:
            return
        assert self.handler is not None
        self.handler.adopt_memberships(groups)

    @defer.inlineCallbacks
    def _scan(self, pattern: str) -> Any:
        """Every key on the home Redis matching ``pattern`` (SCAN, not the blocking KEYS)."""
        keys: list[str] = []
        cursor = 0
        while True:
            cursor, found = yield self.home.call("SCAN", cursor, "MATCH", pattern, "COUNT", 1000)
            keys.extend(found)
            if int(cursor) == 0:
                return keys

    # -- presence -------------------------------------------------------------------

    def _beat(self) -> None:
        """Publish this node's counts; they expire if the node dies."""
        assert self.handler is not None
        counts = self.handler.local_counts()
        record = orjson.dumps({"connections": counts["connections"], "pending": counts["pending"]})
        ttl = max(1, int(self.heartbeat * 3 + 0.999))
        self.home.call("SET", NODE + self.node, record, "EX", ttl).addErrback(lambda _: None)

    def online(self, uids: list[str]) -> defer.Deferred[dict[str, bool]]:
        """Ask Redis who holds a subscription to each uid's channel."""
        by_shard: dict[Shard, list[str]] = {}
        for uid in uids:
            by_shard.setdefault(self.shard_of(uid), []).append(uid)
        calls = []
        for shard, some in by_shard.items():
            d = shard.call("PUBSUB", "NUMSUB", *[UID + u for u in some])
            d.addCallback(
                lambda reply, some=some: {
                    uid: int(n) > 0 for uid, n in zip(some, reply[1::2], strict=True)
                }
            )
            calls.append(d)

        def merge(replies: list[dict[str, bool]]) -> dict[str, bool]:
            return {uid: here for reply in replies for uid, here in reply.items()}

        d = defer.gatherResults(calls, consumeErrors=True)
        return d.addCallbacks(merge, unreachable)

    @defer.inlineCallbacks
    def _online_uids(self) -> Any:
        uids: set[str] = set()
        for shard in self.shards:
            channels = yield shard.call("PUBSUB", "CHANNELS", UID + "*")
            uids.update(c[len(UID) :] for c in channels)
        return uids

    def counts(self, local: dict[str, int], uids: Collection[str]) -> defer.Deferred[dict]:
        """Cluster-wide counts: uids from the live channels, connections from node records."""
        return self._counts(local, uids).addErrback(unreachable)

    @defer.inlineCallbacks
    def _counts(self, local: dict[str, int], uids: Collection[str]) -> Any:
        online = yield self._online_uids()
        keys = yield self._scan(NODE + "*")
        records = (yield self.home.call("MGET", *keys)) if keys else []
        connections = pending = 0
        for key, raw in zip(keys, records, strict=True):
            if key == NODE + self.node or raw is None:
                continue
            record = orjson.loads(raw)
            connections += record["connections"]
            pending += record["pending"]
        return {
            "uids": len(online | set(uids)),
            "connections": local["connections"] + connections,
            "pending": local["pending"] + pending,
            "groups": local["groups"],
            "nodes": 1 + sum(1 for k in keys if k != NODE + self.node),
        }

    def list_online(self, uids: Collection[str]) -> defer.Deferred[set[str]]:
        d = self._online_uids()
        return d.addCallbacks(lambda online: online | set(uids), unreachable)


def _now_ms() -> int:
    """Milliseconds since the epoch: when a message was sent (nodes keep NTP time)."""
    return int(time.time() * 1000)


def _dumps(message: dict[str, Any]) -> bytes:
    """JSON of a fan-out message; payload bytes as text, sets as sorted lists."""
    return orjson.dumps(
        message,
        default=lambda v: (
            v.decode("utf-8")
            if isinstance(v, bytes)
            else sorted(v)
            if isinstance(v, (set, frozenset))
            else None
        ),
    )
