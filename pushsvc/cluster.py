"""Cluster mode: nodes share their users through Redis pub/sub.

Routing follows Centrifugo's design: a node SUBSCRIBEs to ``pushsvc:u:<uid>``
while it holds a connection of that uid, so a push PUBLISHes to the uid's
channel and only nodes with that user receive it; PUBLISH's receiver count is
the cluster-wide answer.  Broadcasts, group pushes and disconnects go to
every node over ``pushsvc:all``; each node acts on its own connections and
answers the asking node on its reply channel with what it delivered, so the
backend still gets an exact count.  Group memberships are kept in Redis sets
(for nodes that start later) and replayed to every node.

Redis is reached through txredisapi.  Two behaviours of its 1.6 release shape
this module: subscriptions are not restored after a reconnect (we re-subscribe
every local uid ourselves, in batches), and a command issued while Redis is
down waits for the reconnect instead of failing (we never issue one while
disconnected, and bound every call with a timeout).  Every message carries
the time it was sent; a node drops one that is older than STALE_AFTER (a
progress bar should not jump back to 10 % a minute after it showed 100 %),
counts it and logs it once a minute.
"""

from __future__ import annotations

import itertools
import os
import socket
import time
import uuid
from typing import Any
from urllib.parse import unquote, urlparse

import orjson
import txredisapi
from twisted.application.service import Service
from twisted.internet import defer, reactor
from twisted.internet.endpoints import HostnameEndpoint, UNIXClientEndpoint, wrapClientTLS
from twisted.internet.ssl import optionsForClientTLS
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from pushsvc.registry import Registry, page

log = Logger()

PREFIX = "pushsvc:"
ALL = PREFIX + "all"
UID = PREFIX + "u:"
GROUP = PREFIX + "g:"
NODE = PREFIX + "node:"
REPLY = PREFIX + "r:"
SUBSCRIBE_BATCH = 1000
# Seconds after which a message from another node is dropped instead of
# delivered.  Not --redis-timeout: the sender answered ``ok`` as soon as
# Redis counted a receiver, so a message that is merely slow to be read here
# (an overloaded node) must still be delivered.
STALE_AFTER = 30.0


class ClusterUnavailable(Exception):
    """Redis cannot be reached (or did not answer in time): the answer would be a guess."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def parse_redis_url(url: str) -> tuple[object, str, str | None, int | None]:
    """Endpoint, stable name, password and database of a redis://, rediss:// or unix:// URL."""
    parsed = urlparse(url)
    password = unquote(parsed.password) if parsed.password else None
    if parsed.scheme == "unix":
        path = parsed.path
        query = dict(p.split("=", 1) for p in parsed.query.split("&") if "=" in p)
        db = int(query["db"]) if "db" in query else None
        return UNIXClientEndpoint(reactor, path), url, password, db
    if parsed.scheme not in ("redis", "rediss"):
        raise ValueError(f"unsupported Redis URL {url!r}: use redis://, rediss:// or unix://")
    host = parsed.hostname or "127.0.0.1"
    port = parsed.port or 6379
    endpoint: Any = HostnameEndpoint(reactor, host, port, timeout=5)
    if parsed.scheme == "rediss":
        endpoint = wrapClientTLS(optionsForClientTLS(host), endpoint)
    db = int(parsed.path.lstrip("/")) if parsed.path.strip("/") else None
    return endpoint, f"{host}:{port}", password, db


class Subscriber(txredisapi.SubscriberProtocol):
    """The subscribing connection of one shard; hands messages to the cluster."""

    def connectionMade(self) -> defer.Deferred[None]:
        d = super().connectionMade()
        d.addCallback(lambda _: self.factory.shard.subscriber_ready(self))
        return d

    def connectionLost(self, why: object) -> None:
        self.factory.shard.subscriber_lost(self)
        super().connectionLost(why)

    def messageReceived(self, pattern: str | None, channel: str, message: str) -> None:
        self.factory.shard.cluster.received(channel, message)


class Commands(txredisapi.RedisProtocol):
    """The command connection of one shard; tells the shard when it is up or down."""

    def connectionMade(self) -> defer.Deferred[None]:
        d = super().connectionMade()
        d.addCallback(lambda _: self.factory.shard.commands_ready(self))
        return d

    def connectionLost(self, why: object) -> None:
        self.factory.shard.commands_lost(self)
        super().connectionLost(why)


class Shard:
    """One Redis server: a command connection and a subscriber connection."""

    def __init__(self, cluster: Cluster, url: str) -> None:
        self.cluster = cluster
        endpoint, self.name, password, db = parse_redis_url(url)
        self.endpoint = endpoint
        self.commands_factory = txredisapi.RedisFactory(
            self.name, db, 1, isLazy=True, password=password
        )
        self.commands_factory.protocol = Commands
        self.commands_factory.maxDelay = 5
        self.commands_factory.shard = self
        self.sub_factory = txredisapi.SubscriberFactory(isLazy=True)
        self.sub_factory.protocol = Subscriber
        self.sub_factory.password = password
        self.sub_factory.maxDelay = 5
        self.sub_factory.shard = self
        self.commands: Commands | None = None
        self.subscriber: Subscriber | None = None
        self.subscribed: set[str] = set()  # channels SUBSCRIBEd on the live connection
        self._to_subscribe: set[str] = set()
        self._to_unsubscribe: set[str] = set()
        self._flush_call: Any = None
        self._was_up = False
        # SUBSCRIBEs sent but not yet confirmed, and who waits for them (recovery).
        self._unconfirmed: set[str] = set()
        self._waiters: dict[str, list[defer.Deferred[None]]] = {}

    # the ring (txredisapi.HashRing) keys shards by their factory's uuid
    @property
    def _factory(self) -> txredisapi.RedisFactory:
        return self.commands_factory

    def start(self) -> None:
        self.commands_factory.startConnecting(self.endpoint)
        self.sub_factory.startConnecting(self.endpoint)

    def stop(self) -> defer.Deferred[Any]:
        return defer.gatherResults(
            [self.commands_factory.disconnect(), self.sub_factory.disconnect()],
            consumeErrors=True,
        )

    @property
    def up(self) -> bool:
        return self.commands is not None and self.subscriber is not None

    # -- connection state ---------------------------------------------------

    def commands_ready(self, proto: Commands) -> None:
        self.commands = proto
        self._state_changed()

    def commands_lost(self, proto: Commands) -> None:
        if self.commands is proto:
            self.commands = None
            self._state_changed()

    def subscriber_ready(self, proto: Subscriber) -> None:
        self.subscriber = proto
        self.subscribed = set()
        self._unconfirmed = set()
        # txredisapi does not restore subscriptions: subscribe to everything
        # this node needs on this shard again, in batches.
        wanted = self.cluster.channels_for(self)
        self._to_unsubscribe.clear()
        self._to_subscribe = set(wanted)
        self._flush()
        self._state_changed()

    def subscriber_lost(self, proto: Subscriber) -> None:
        if self.subscriber is proto:
            self.subscriber = None
            self.subscribed = set()
            self._state_changed()

    def _state_changed(self) -> None:
        if self.up and not self._was_up:
            self._was_up = True
            log.info("Redis {name} connected", name=self.name)
            self.cluster.shard_up(self)
        elif not self.up and self._was_up:
            self._was_up = False
            log.warn(
                "Redis {name} unreachable: serving local users only until it is back",
                name=self.name,
            )

    # -- batched (un)subscription --------------------------------------------

    def want(self, channel: str) -> None:
        if channel in self._to_unsubscribe:
            self._to_unsubscribe.discard(channel)
        elif channel not in self.subscribed:
            self._to_subscribe.add(channel)
        self._schedule()

    def unwant(self, channel: str) -> None:
        if channel in self._to_subscribe:
            self._to_subscribe.discard(channel)
        elif channel in self.subscribed:
            self._to_unsubscribe.add(channel)
        self._schedule()

    def _schedule(self) -> None:
        if self._flush_call is None and self.subscriber is not None:
            self._flush_call = reactor.callLater(0, self._flush)

    def _flush(self) -> None:
        self._flush_call = None
        sub = self.subscriber
        if sub is None:
            return  # everything is subscribed again on reconnect
        adding, self._to_subscribe = list(self._to_subscribe), set()
        removing, self._to_unsubscribe = list(self._to_unsubscribe), set()
        for i in range(0, len(adding), SUBSCRIBE_BATCH):
            batch = adding[i : i + SUBSCRIBE_BATCH]
            self.subscribed.update(batch)
            self._unconfirmed.update(batch)
            d = sub.subscribe(batch)
            d.addCallbacks(self._confirmed, self._subscribe_failed, callbackArgs=(batch,))
        for i in range(0, len(removing), SUBSCRIBE_BATCH):
            batch = removing[i : i + SUBSCRIBE_BATCH]
            self.subscribed.difference_update(batch)
            sub.unsubscribe(batch).addErrback(self._subscribe_failed)

    def _confirmed(self, _: object, batch: list[str]) -> None:
        # Redis runs one SUBSCRIBE for the whole batch: its first reply means all of it.
        for channel in batch:
            self._unconfirmed.discard(channel)
            for waiter in self._waiters.pop(channel, ()):
                if not waiter.called:
                    waiter.callback(None)

    def when_subscribed(self, channel: str) -> defer.Deferred[None]:
        """Fires once this node receives ``channel``'s messages (bounded by --redis-timeout)."""
        if channel in self.subscribed and channel not in self._unconfirmed:
            return defer.succeed(None)
        waiter: defer.Deferred[None] = defer.Deferred()
        self._waiters.setdefault(channel, []).append(waiter)
        return waiter.addTimeout(self.cluster.timeout, reactor)

    def _subscribe_failed(self, failure: Any) -> None:
        # The connection is gone; subscriber_ready() redoes it all.
        log.debug("(un)subscribe failed: {f}", f=failure.getErrorMessage())

    # -- commands -------------------------------------------------------------

    def call(self, *args: Any) -> defer.Deferred[Any]:
        """Run one Redis command, failing fast when down and after the timeout."""
        proto = self.commands
        if proto is None:
            return defer.fail(ClusterUnavailable(f"Redis {self.name} is unreachable"))
        d = proto.execute_command(*args)
        d.addTimeout(self.cluster.timeout, reactor)
        d.addErrback(self._unavailable)
        return d

    def _unavailable(self, failure: Any) -> None:
        if failure.check(ClusterUnavailable):
            return failure
        raise ClusterUnavailable(f"Redis {self.name}: {failure.getErrorMessage()}")


class _Gathering:
    """The answers to one fan-out: acks may arrive before PUBLISH's own reply."""

    def __init__(self, push_id: int, local: int) -> None:
        self.id = push_id
        self.total = local
        self.answer: defer.Deferred[int] = defer.Deferred()
        self.expected: int | None = None  # other nodes that got it, once PUBLISH says
        self.acks = 0
        self.failed = False

    def expect(self, others: int) -> None:
        self.expected = others

    def acked(self, count: int) -> None:
        self.acks += 1
        self.total += count

    @property
    def complete(self) -> bool:
        return self.expected is not None and self.acks >= self.expected


class Cluster(Service):
    """The registry's link to the other nodes (``--redis``)."""

    def __init__(
        self,
        registry: Registry,
        urls: list[str],
        timeout: float = 1.0,
        heartbeat: float = 2.0,
    ) -> None:
        self.registry = registry
        self.node = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.timeout = timeout
        self.heartbeat = heartbeat
        self.shards = [Shard(self, url) for url in urls]
        self.ring = txredisapi.HashRing(self.shards)
        self.home = self.shards[0]  # global channels and keys live on the first Redis
        self.reply_channel = REPLY + self.node
        self._stale_logged = 0.0
        self._ids = itertools.count(1)
        self._waiting: dict[int, _Gathering] = {}
        self._heartbeat = LoopingCall(self._beat)
        registry.cluster = self

    # -- service --------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        for shard in self.shards:
            shard.start()
        self._heartbeat.start(self.heartbeat, now=False)

    def stopService(self) -> defer.Deferred[Any]:
        super().stopService()
        if self._heartbeat.running:
            self._heartbeat.stop()
        d = self.home.call("DEL", NODE + self.node) if self.home.up else defer.succeed(None)
        d.addErrback(lambda _: None)
        return d.addCallback(lambda _: defer.gatherResults([s.stop() for s in self.shards]))

    # -- where things live ----------------------------------------------------

    def shard_of(self, uid: str) -> Shard:
        return self.ring(uid.encode("utf-8"))

    def channels_for(self, shard: Shard) -> list[str]:
        """Every channel this node needs on ``shard``: its local uids (and globals on home)."""
        channels = [UID + uid for uid in self.registry.online_uids() if self.shard_of(uid) is shard]
        if shard is self.home:
            channels += [ALL, self.reply_channel]
        return channels

    def shard_up(self, shard: Shard) -> None:
        if shard is self.home:
            self._beat()
            self._load_groups()

    # -- registry hooks ---------------------------------------------------------

    def uid_online(self, uid: str) -> None:
        self.shard_of(uid).want(UID + uid)

    def uid_offline(self, uid: str) -> None:
        self.shard_of(uid).unwant(UID + uid)

    def subscribed(self, uid: str) -> defer.Deferred[None]:
        """Fires once pushes to ``uid`` from other nodes reach this one (history recovery)."""
        return self.shard_of(uid).when_subscribed(UID + uid)

    # -- delivery ---------------------------------------------------------------

    def _stamp(self) -> int:
        """Milliseconds since the epoch: when a message was sent (nodes keep NTP time)."""
        return int(time.time() * 1000)

    def _stale(self, sent_ms: int) -> bool:
        """Too old to deliver; counted, and logged at most once a minute."""
        now = time.time()
        if now * 1000 - sent_ms <= STALE_AFTER * 1000:
            return False
        self.registry.metrics.stale_messages += 1
        if now >= self._stale_logged + 60:
            self._stale_logged = now
            log.warn(
                "dropped a cluster message sent {age:.0f} s ago (more than {limit} s): "
                "this node or Redis is overloaded; more in the next minute are only counted",
                age=now - sent_ms / 1000,
                limit=STALE_AFTER,
            )
        return True

    def push(self, uids: list[str], payload: bytes, local: int) -> int | defer.Deferred[int]:
        """Publish to each uid's channel; the receiver counts are the remote answer.

        Local connections were reached already.  If any were, the answer is
        ``ok`` whatever Redis says, so the backend does not wait for it.
        """
        message = f"{self.node}\x00{self._stamp()}\x00".encode() + payload
        calls = []
        for uid in uids:
            shard = self.shard_of(uid)
            d = shard.call("PUBLISH", UID + uid, message)
            # Our own subscription (if we hold the uid) counts as a receiver.
            mine = 1 if UID + uid in shard.subscribed else 0
            d.addCallback(lambda n, mine=mine: max(0, n - mine))
            calls.append(d)
        result = defer.gatherResults(calls, consumeErrors=True)
        if local:
            result.addErrback(lambda _: None)  # already answered ok; logged once per outage
            return local
        result.addCallback(sum)
        result.addErrback(self._unavailable_answer, local)
        return result

    def fan_out(self, kind: str, local: int, **fields: Any) -> defer.Deferred[int]:
        """Ask every other node to act on its connections; sum what they report."""
        gathering = _Gathering(next(self._ids), local)
        message: dict[str, Any] = {"k": kind, "o": self.node, "i": gathering.id}
        message["t"] = self._stamp()
        for key, value in fields.items():
            if isinstance(value, bytes):
                value = value.decode("utf-8")
            elif isinstance(value, (set, frozenset)):
                value = sorted(value)
            message[key] = value
        self._waiting[gathering.id] = gathering
        reactor.callLater(self.timeout, self._finish, gathering)

        def published(receivers: int) -> None:
            gathering.expect(receivers - 1)  # we receive our own message on ALL too
            if gathering.complete:
                self._finish(gathering)

        def failed(failure: Any) -> None:
            gathering.failed = True
            self._finish(gathering)

        self.home.call("PUBLISH", ALL, orjson.dumps(message)).addCallbacks(published, failed)
        return gathering.answer

    def _finish(self, gathering: _Gathering) -> None:
        if self._waiting.pop(gathering.id, None) is None:
            return  # answered already
        if gathering.failed and not gathering.total:
            gathering.answer.errback(ClusterUnavailable("Redis is unreachable"))
        else:
            gathering.answer.callback(gathering.total)

    def _ack(self, push_id: int, count: int) -> None:
        gathering = self._waiting.get(push_id)
        if gathering is not None:  # else too late: answered already
            gathering.acked(count)
            if gathering.complete:
                self._finish(gathering)

    def _unavailable_answer(self, failure: Any, local: int) -> int:
        failure.trap(ClusterUnavailable, defer.FirstError)
        if local:
            return local
        raise ClusterUnavailable("Redis is unreachable")

    # -- messages from other nodes ----------------------------------------------

    def received(self, channel: str, message: str) -> None:
        if channel.startswith(UID):
            origin, sent, payload = message.split("\x00", 2)
            if origin != self.node and not self._stale(int(sent)):
                self.registry.local_push([channel[len(UID) :]], payload.encode("utf-8"))
            return
        data = orjson.loads(message)
        if channel == self.reply_channel:
            self._ack(data["i"], data["n"])
            return
        if data["o"] == self.node:
            return
        kind = data["k"]
        if kind in ("join", "leave"):
            apply = self.registry.local_join if kind == "join" else self.registry.local_leave
            apply(data["uids"], data["groups"])
            return
        count = 0
        if not self._stale(data["t"]):
            count = self._act(kind, data)
        reply = orjson.dumps({"i": data["i"], "n": count})
        self.home.call("PUBLISH", REPLY + data["o"], reply).addErrback(lambda _: None)

    def _act(self, kind: str, data: dict[str, Any]) -> int:
        registry = self.registry
        exclude = frozenset(data.get("exclude", ()))
        if kind == "broadcast":
            return registry.local_broadcast(data["data"].encode("utf-8"), exclude)
        if kind == "group":
            return registry.local_push_groups(data["groups"], data["data"].encode("utf-8"), exclude)
        if kind == "disconnect":
            return registry.local_disconnect(data["uids"], data["code"], data["reason"])
        return 0

    # -- groups -------------------------------------------------------------------

    def membership(self, kind: str, uids: list[str], groups: list[str]) -> defer.Deferred[None]:
        """Store a join/leave in Redis and tell every node."""
        command = "SADD" if kind == "join" else "SREM"
        calls = [self.home.call(command, GROUP + group, *uids) for group in groups]
        note = {"k": kind, "o": self.node, "i": 0, "uids": uids, "groups": groups}
        calls.append(self.home.call("PUBLISH", ALL, orjson.dumps(note)))
        d = defer.gatherResults(calls, consumeErrors=True)
        d.addErrback(self._unavailable_answer, 0)
        return d.addCallback(lambda _: None)

    @defer.inlineCallbacks
    def _load_groups(self) -> Any:
        """Adopt every membership stored in Redis (missed while disconnected or started later)."""
        try:
            groups: dict[str, set[str]] = {}
            for key in (yield self._scan(GROUP + "*")):
                members = yield self.home.call("SMEMBERS", key)
                groups[key[len(GROUP) :]] = set(members)
        except ClusterUnavailable:
            return
        self.registry.replace_joined(groups)

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
        record = orjson.dumps(
            {
                "connections": self.registry.connection_count(),
                "pending": self.registry.pending_count(),
            }
        )
        ttl = max(1, int(self.heartbeat * 3 + 0.999))
        self.home.call("SET", NODE + self.node, record, "EX", ttl).addErrback(lambda _: None)

    def online(self, local: dict[str, bool]) -> defer.Deferred[dict[str, bool]]:
        """Ask Redis who holds a subscription to each offline-here uid's channel."""
        by_shard: dict[Shard, list[str]] = {}
        for uid, here in local.items():
            if not here:
                by_shard.setdefault(self.shard_of(uid), []).append(uid)
        calls = []
        for shard, uids in by_shard.items():
            d = shard.call("PUBSUB", "NUMSUB", *[UID + u for u in uids])
            d.addCallback(lambda reply, uids=uids: dict(zip(uids, reply[1::2], strict=True)))
            calls.append(d)

        def merge(replies: list[dict[str, int]]) -> dict[str, bool]:
            result = dict(local)
            for reply in replies:
                for uid, subscribers in reply.items():
                    result[uid] = int(subscribers) > 0
            return result

        d = defer.gatherResults(calls, consumeErrors=True)
        d.addErrback(self._unavailable_answer, 0)
        return d.addCallback(merge)

    @defer.inlineCallbacks
    def _online_uids(self) -> Any:
        uids: set[str] = set()
        for shard in self.shards:
            channels = yield shard.call("PUBSUB", "CHANNELS", UID + "*")
            uids.update(c[len(UID) :] for c in channels)
        return uids

    @defer.inlineCallbacks
    def counts(self, local: dict[str, int]) -> Any:
        """Cluster-wide counts: uids from the live channels, connections from node records."""
        try:
            uids = yield self._online_uids()
            keys = yield self._scan(NODE + "*")
            records = (yield self.home.call("MGET", *keys)) if keys else []
        except (ClusterUnavailable, defer.FirstError) as e:
            raise ClusterUnavailable("Redis is unreachable") from e
        connections = pending = 0
        for key, raw in zip(keys, records, strict=True):
            if key == NODE + self.node or raw is None:
                continue
            record = orjson.loads(raw)
            connections += record["connections"]
            pending += record["pending"]
        return {
            "uids": len(uids | set(self.registry.online_uids())),
            "connections": local["connections"] + connections,
            "pending": local["pending"] + pending,
            "groups": local["groups"],
            "nodes": 1 + sum(1 for k in keys if k != NODE + self.node),
        }

    @defer.inlineCallbacks
    def list_online(self, after: str | None, limit: int) -> Any:
        try:
            uids = yield self._online_uids()
        except (ClusterUnavailable, defer.FirstError) as e:
            raise ClusterUnavailable("Redis is unreachable") from e
        uids.update(self.registry.online_uids())
        chunk, next_after = page(uids, after, limit)
        return chunk, next_after, len(uids)
