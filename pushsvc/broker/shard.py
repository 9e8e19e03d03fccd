"""One Redis server as a broker sees it: a command connection and a subscriber connection.

Redis is reached through txredisapi.  Two behaviours of its 1.6 release shape
this module: subscriptions are not restored after a reconnect (the shard
subscribes to everything its owner needs again, in batches), and a command
issued while Redis is down waits for the reconnect instead of failing (a
shard never issues one while disconnected, and bounds every call with a
timeout).
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any
from urllib.parse import unquote, urlparse

import txredisapi
from twisted.internet import defer, reactor
from twisted.internet.endpoints import HostnameEndpoint, UNIXClientEndpoint, wrapClientTLS
from twisted.internet.ssl import optionsForClientTLS
from twisted.logger import Logger

from pushsvc.errors import Unavailable

log = Logger()

SUBSCRIBE_BATCH = 1000
RECONNECT_MAX_DELAY = 5


def parse_redis_url(url: str) -> tuple[Any, str, str | None, int | None]:
    """Endpoint, stable name, password and database of a redis://, rediss:// or unix:// URL."""
    parsed = urlparse(url)
    password = unquote(parsed.password) if parsed.password else None
    if parsed.scheme == "unix":
        query = dict(p.split("=", 1) for p in parsed.query.split("&") if "=" in p)
        db = int(query["db"]) if "db" in query else None
        return UNIXClientEndpoint(reactor, parsed.path), url, password, db
    if parsed.scheme not in ("redis", "rediss"):
        raise ValueError(f"unsupported Redis URL {url!r}: use redis://, rediss:// or unix://")
    host = parsed.hostname or "127.0.0.1"
    port = parsed.port or 6379
    endpoint: Any = HostnameEndpoint(reactor, host, port, timeout=5)
    if parsed.scheme == "rediss":
        endpoint = wrapClientTLS(optionsForClientTLS(host), endpoint)
    db = int(parsed.path.lstrip("/")) if parsed.path.strip("/") else None
    return endpoint, f"{host}:{port}", password, db


class SubscriberConnection(txredisapi.SubscriberProtocol):
    """The subscribing connection; hands every message to its shard's owner."""

    def connectionMade(self) -> defer.Deferred[None]:
        d = super().connectionMade()
        d.addCallback(lambda _: self.factory.shard.subscriber_ready(self))
        return d

    def connectionLost(self, why: object) -> None:
        self.factory.shard.subscriber_lost(self)
        super().connectionLost(why)

    def messageReceived(self, pattern: str | None, channel: str, message: str) -> None:
        self.factory.shard.on_message(channel, message)


class CommandConnection(txredisapi.RedisProtocol):
    """The command connection; tells its shard when it is up or down."""

    def connectionMade(self) -> defer.Deferred[None]:
        d = super().connectionMade()
        d.addCallback(lambda _: self.factory.shard.commands_ready(self))
        return d

    def connectionLost(self, why: object) -> None:
        self.factory.shard.commands_lost(self)
        super().connectionLost(why)


class CommandFactory(txredisapi.RedisFactory):
    protocol = CommandConnection
    maxDelay = RECONNECT_MAX_DELAY

    def __init__(self, shard: Shard, password: str | None, db: int | None) -> None:
        super().__init__(shard.name, db, 1, isLazy=True, password=password)
        self.shard = shard


class SubscriberFactory(txredisapi.SubscriberFactory):
    protocol = SubscriberConnection
    maxDelay = RECONNECT_MAX_DELAY

    def __init__(self, shard: Shard, password: str | None) -> None:
        super().__init__(isLazy=True)
        self.shard = shard
        self.password = password


class Shard:
    """One Redis server: its two connections, batched (un)subscription and bounded calls.

    ``wanted`` returns every channel the owner needs on this shard (subscribed
    again after each reconnect); ``on_message`` receives every message;
    ``on_up`` is called each time both connections are up.
    """

    def __init__(
        self,
        url: str,
        timeout: float,
        wanted: Callable[[Shard], Collection[str]],
        on_message: Callable[[str, str], None],
        on_up: Callable[[Shard], None],
    ) -> None:
        self.endpoint, self.name, password, db = parse_redis_url(url)
        self.timeout = timeout
        self._wanted = wanted
        self.on_message = on_message
        self._on_up = on_up
        self.commands_factory = CommandFactory(self, password, db)
        self.sub_factory = SubscriberFactory(self, password)
        self.conn: CommandConnection | None = None
        self.subscriber: SubscriberConnection | None = None
        self.subscribed: set[str] = set()  # channels SUBSCRIBEd on the live connection
        self._to_subscribe: set[str] = set()
        self._to_unsubscribe: set[str] = set()
        self._flush_call: Any = None
        self._was_up = False
        # SUBSCRIBEs sent but not yet confirmed, and who waits for them (recovery).
        self._unconfirmed: set[str] = set()
        # UNSUBSCRIBEs sent but not yet confirmed: Redis may still count us.
        self._leaving: set[str] = set()
        self._waiters: dict[str, list[defer.Deferred[None]]] = {}

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
        return self.conn is not None and self.subscriber is not None

    # -- connection state ---------------------------------------------------

    def commands_ready(self, proto: CommandConnection) -> None:
        self.conn = proto
        self._state_changed()

    def commands_lost(self, proto: CommandConnection) -> None:
        if self.conn is proto:
            self.conn = None
            self._state_changed()

    def subscriber_ready(self, proto: SubscriberConnection) -> None:
        self.subscriber = proto
        self.subscribed = set()
        self._unconfirmed = set()
        self._leaving = set()
        self._to_unsubscribe.clear()
        self._to_subscribe = set(self._wanted(self))
        self._flush()
        self._state_changed()

    def subscriber_lost(self, proto: SubscriberConnection) -> None:
        if self.subscriber is proto:
            self.subscriber = None
            self.subscribed = set()
            self._leaving = set()
            self._state_changed()

    def _state_changed(self) -> None:
        if self.up and not self._was_up:
            self._was_up = True
            log.info("Redis {name} connected", name=self.name)
            self._on_up(self)
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
        for batch in _batches(adding):
            self.subscribed.update(batch)
            self._unconfirmed.update(batch)
            d = sub.subscribe(batch)
            d.addCallbacks(self._confirmed, self._subscribe_failed, callbackArgs=(batch,))
        for batch in _batches(removing):
            self.subscribed.difference_update(batch)
            self._leaving.update(batch)
            d = sub.unsubscribe(batch)
            d.addErrback(self._subscribe_failed)
            d.addBoth(lambda _, batch=batch: self._leaving.difference_update(batch))

    def _confirmed(self, _: object, batch: list[str]) -> None:
        # Redis runs one SUBSCRIBE for the whole batch: its first reply means all of it.
        for channel in batch:
            self._unconfirmed.discard(channel)
            for waiter in self._waiters.pop(channel, ()):
                if not waiter.called:
                    waiter.callback(None)

    def may_count_me(self, channel: str) -> bool:
        """Whether PUBLISH's receiver count on ``channel`` may include this node.

        While an UNSUBSCRIBE is on its way Redis may still count us; counting
        ourselves out then can only turn an ``ok`` into a ``fail``, never the
        reverse.
        """
        return channel in self.subscribed or channel in self._leaving

    def when_subscribed(self, channel: str) -> defer.Deferred[None] | None:
        """Fires once ``channel``'s messages reach this node (None: already; bounded)."""
        if channel in self.subscribed and channel not in self._unconfirmed:
            return None
        waiter: defer.Deferred[None] = defer.Deferred()
        self._waiters.setdefault(channel, []).append(waiter)
        return waiter.addTimeout(self.timeout, reactor)

    def _subscribe_failed(self, failure: Any) -> None:
        # The connection is gone; subscriber_ready() redoes it all.
        log.debug("(un)subscribe failed: {f}", f=failure.getErrorMessage())

    # -- commands -------------------------------------------------------------

    def call(self, *args: Any) -> defer.Deferred[Any]:
        """Run one Redis command, failing fast when down and after the timeout."""
        conn = self.conn
        if conn is None:
            return defer.fail(Unavailable(f"Redis {self.name} is unreachable"))
        d = conn.execute_command(*args)
        d.addTimeout(self.timeout, reactor)
        d.addErrback(self._unavailable)
        return d

    def _unavailable(self, failure: Any) -> None:
        if failure.check(Unavailable):
            return failure
        raise Unavailable(f"Redis {self.name}: {failure.getErrorMessage()}")


def _batches(channels: list[str]) -> list[list[str]]:
    return [channels[i : i + SUBSCRIBE_BATCH] for i in range(0, len(channels), SUBSCRIBE_BATCH)]
