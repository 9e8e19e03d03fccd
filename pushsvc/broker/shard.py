"""One Redis server as a broker sees it: a command connection and a subscriber connection.

Redis is reached through pushsvc's own engine (pushsvc/broker/connection.py:
pipelined writes, hiredis's C reply parser).  A shard subscribes again to
everything its owner needs after each reconnect, in batches; it never queues
a command while Redis is down (it fails it at once), and answers
``Unavailable`` for waiting commands only when Redis has said nothing for
``timeout`` seconds.

With ``redis+sentinel://`` the shard asks the sentinels for the master before
every connection, and only keeps a connection to a server that says it is the
master: a failover (whose new master the sentinels name, and whose old
master's clients they disconnect) is followed by reconnecting.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Collection
from typing import Any
from urllib.parse import unquote, urlparse

from twisted.application.internet import ClientService, backoffPolicy
from twisted.internet import defer, reactor
from twisted.internet.endpoints import HostnameEndpoint, UNIXClientEndpoint, wrapClientTLS
from twisted.internet.ssl import optionsForClientTLS
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from pushsvc.broker.connection import RedisConnection, RedisConnectionFactory, ReplyTo, ignore_reply
from pushsvc.broker.sentinel import SentinelEndpoint, parse_sentinel_url
from pushsvc.errors import Unavailable

log = Logger()

SUBSCRIBE_BATCH = 1000
RECONNECT_MAX_DELAY = 5


def parse_redis_url(url: str) -> tuple[Any, str, str | None, int | None]:
    """Endpoint, stable name, password and database of a Redis URL.

    redis://, rediss://, unix:// and redis+sentinel://HOST:PORT[,HOST:PORT...]/MASTER[/DB].
    """
    if url.startswith("redis+sentinel://"):
        sentinels, master, password, db = parse_sentinel_url(url)
        return SentinelEndpoint(reactor, sentinels, master), f"sentinel:{master}", password, db
    parsed = urlparse(url)
    password = unquote(parsed.password) if parsed.password else None
    if parsed.scheme == "unix":
        query = dict(p.split("=", 1) for p in parsed.query.split("&") if "=" in p)
        db = int(query["db"]) if "db" in query else None
        return UNIXClientEndpoint(reactor, parsed.path), url, password, db
    if parsed.scheme not in ("redis", "rediss"):
        raise ValueError(
            f"unsupported Redis URL {url!r}: use redis://, rediss://, unix:// or redis+sentinel://"
        )
    host = parsed.hostname or "127.0.0.1"
    port = parsed.port or 6379
    endpoint: Any = HostnameEndpoint(reactor, host, port, timeout=5)
    if parsed.scheme == "rediss":
        endpoint = wrapClientTLS(optionsForClientTLS(host), endpoint)
    db = int(parsed.path.lstrip("/")) if parsed.path.strip("/") else None
    return endpoint, f"{host}:{port}", password, db


def _master_only(answers: list[Any]) -> str | None:
    """The handshake's check for a sentinel-managed server: ROLE must say master."""
    role = answers[-1]
    kind = role[0] if isinstance(role, list) and role else role
    if isinstance(kind, bytes):
        kind = kind.decode()
    return None if kind == "master" else f"is a {kind}, not the master: asking the sentinels again"


def _any_role(answers: list[Any]) -> str | None:
    return None


class Shard:
    """One Redis server: its two connections, batched (un)subscription and honest calls.

    ``wanted`` returns every channel the owner needs on this shard (subscribed
    again after each reconnect); ``on_message`` receives every message
    (channel and payload as bytes); ``on_up`` is called each time both
    connections are up.
    """

    def __init__(
        self,
        url: str,
        timeout: float,
        wanted: Callable[[Shard], Collection[str]],
        on_message: Callable[[bytes, bytes], None],
        on_up: Callable[[Shard], None],
    ) -> None:
        self.endpoint, self.name, password, db = parse_redis_url(url)
        self.timeout = timeout
        self._wanted = wanted
        self.on_message = on_message
        self._on_up = on_up
        greeting: list[tuple[Any, ...]] = [("AUTH", password)] if password else []
        check = _master_only if url.startswith("redis+sentinel://") else _any_role
        selected = [("SELECT", db)] if db else []
        self._factories: list[RedisConnectionFactory] = []
        self._services = [
            self._service(greeting + selected + [("ROLE",)], check, None),
            self._service(greeting + [("ROLE",)], check, self._pushed),
        ]
        self.conn: RedisConnection | None = None
        self.subscriber: RedisConnection | None = None
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
        if isinstance(self.endpoint, SentinelEndpoint):
            self._services.append(self.endpoint.watch(self.reconnect))
        self._watchdog = LoopingCall(self._watch)
        self._silent: set[RedisConnection] = set()

    def _service(
        self,
        handshake: list[tuple[Any, ...]],
        check: Callable[[list[Any]], str | None],
        on_push: Callable[[list[Any]], None] | None,
    ) -> ClientService:
        ready = self.subscriber_ready if on_push else self.commands_ready
        lost = self.subscriber_lost if on_push else self.commands_lost

        def build() -> RedisConnection:
            on_message = self.on_message if on_push else None
            return RedisConnection(self.name, handshake, check, ready, lost, on_push, on_message)

        policy = backoffPolicy(0.5, RECONNECT_MAX_DELAY, jitter=lambda: random.random() * 0.5)
        factory = RedisConnectionFactory(build)
        self._factories.append(factory)
        return ClientService(self.endpoint, factory, retryPolicy=policy)

    def start(self) -> None:
        for service in self._services:
            service.startService()
        self._watchdog.start(max(self.timeout / 2, 0.05), now=False)

    def stop(self) -> defer.Deferred[Any]:
        if self._watchdog.running:
            self._watchdog.stop()
        return defer.gatherResults(
            [defer.maybeDeferred(s.stopService) for s in self._services], consumeErrors=True
        )

    @property
    def up(self) -> bool:
        return self.conn is not None and self.subscriber is not None

    @property
    def in_flight(self) -> int:
        """Commands waiting for Redis on the command connection."""
        return self.conn.in_flight if self.conn is not None else 0

    # -- connection state ---------------------------------------------------

    def commands_ready(self, proto: RedisConnection) -> None:
        self.conn = proto
        self._state_changed()

    def commands_lost(self, proto: RedisConnection) -> None:
        if self.conn is proto:
            self.conn = None
            self._state_changed()

    def subscriber_ready(self, proto: RedisConnection) -> None:
        self.subscriber = proto
        self.subscribed = set()
        self._unconfirmed = set()
        self._leaving = set()
        self._to_unsubscribe.clear()
        self._to_subscribe = set(self._wanted(self))
        self._flush()
        self._state_changed()

    def subscriber_lost(self, proto: RedisConnection) -> None:
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

    def reconnect(self) -> None:
        """Drop both connections (the master moved); they reconnect to where the sentinels say."""
        for factory in self._factories:
            proto = factory.current
            if proto is not None and proto.transport is not None:
                proto.transport.abortConnection()

    def _watch(self) -> None:
        """Drop a connection on which Redis said nothing for ``timeout`` while commands wait.

        Seen silent on two ticks in a row, so that a reactor that was busy
        (replies unread in the socket) does not count as a silent Redis.
        """
        now = time.monotonic()
        silent = set()
        for proto in (factory.current for factory in self._factories):
            if proto is not None and proto.silent_for(now) >= self.timeout:
                if proto in self._silent and proto.transport is not None:
                    proto.transport.abortConnection()
                else:
                    silent.add(proto)
        self._silent = silent

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
            sub.send(("SUBSCRIBE", *batch), ignore_reply)
        for batch in _batches(removing):
            self.subscribed.difference_update(batch)
            self._leaving.update(batch)
            sub.send(("UNSUBSCRIBE", *batch), ignore_reply)

    def _pushed(self, reply: list[Any]) -> None:
        """What the subscriber connection receives but messages: (un)subscription confirmations."""
        kind = reply[0]
        # One confirmation per channel; the command's own callback took the first.
        if kind == b"subscribe":
            self._confirmed(reply[1].decode())
        elif kind == b"unsubscribe" and reply[1] is not None:
            self._leaving.discard(reply[1].decode())

    def _confirmed(self, channel: str) -> None:
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

    # -- commands -------------------------------------------------------------

    def send(self, command: tuple[Any, ...] | bytes, reply_to: ReplyTo) -> None:
        """Pipeline one command (arguments, or packed); ``reply_to`` gets the reply or an error.

        Fails at once (with Unavailable) while Redis is down: nothing is queued.
        """
        conn = self.conn
        if conn is None:
            reply_to(Unavailable(f"Redis {self.name} is unreachable"))
        else:
            conn.send(command, reply_to)

    def call(self, *args: Any) -> defer.Deferred[Any]:
        """Run one Redis command as a Deferred; fails with Unavailable when Redis cannot answer."""
        d: defer.Deferred[Any] = defer.Deferred()

        def answer(reply: Any) -> None:
            if isinstance(reply, Unavailable):
                d.errback(reply)
            elif isinstance(reply, Exception):
                d.errback(Unavailable(f"Redis {self.name}: {reply}"))
            else:
                d.callback(reply)

        self.send(args, answer)
        return d


def _batches(channels: list[str]) -> list[list[str]]:
    return [channels[i : i + SUBSCRIBE_BATCH] for i in range(0, len(channels), SUBSCRIBE_BATCH)]
