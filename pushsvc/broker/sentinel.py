"""Redis Sentinel: find the current master before every connection.

``--redis redis+sentinel://[:PASSWORD@]HOST:PORT[,HOST:PORT...]/MASTER_NAME[/DB]``
lists the sentinels; the password and database are the master's (as in a
redis:// URL).  Before each connection the endpoint asks the sentinels in
turn (``SENTINEL get-master-addr-by-name``) and connects to the address the
first one that answers gives.  The shard then checks ``ROLE`` says master:
during a failover a sentinel may still name the old master for a moment, and
the sentinels disconnect the old master's clients when they demote it, so a
node follows a failover by reconnecting and asking again.  It does not wait
for that (a sentinel demotes the old master seconds later): each node also
subscribes to ``+switch-master`` on a sentinel and reconnects as soon as one
announces the new master.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from urllib.parse import unquote

import hiredis
from twisted.application.internet import ClientService
from twisted.internet import defer
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.error import ConnectError
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger

from pushsvc.broker.connection import RedisConnection, RedisConnectionFactory

log = Logger()

ASK_TIMEOUT = 2.0  # seconds for one sentinel to answer


def parse_sentinel_url(url: str) -> tuple[list[tuple[str, int]], str, str | None, int | None]:
    """Sentinel addresses, master name, password and database of a redis+sentinel:// URL."""
    rest = url[len("redis+sentinel://") :]
    netloc, _, path = rest.partition("/")
    password = None
    if "@" in netloc:
        userinfo, netloc = netloc.rsplit("@", 1)
        password = unquote(userinfo.partition(":")[2]) or None
    sentinels = []
    for item in netloc.split(","):
        host, _, port = item.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"{url!r}: each sentinel is HOST:PORT (got {item!r})")
        sentinels.append((host.strip("[]"), int(port)))
    parts = [p for p in path.split("/") if p]
    if not parts or len(parts) > 2 or (len(parts) == 2 and not parts[1].isdigit()):
        raise ValueError(f"{url!r}: the path is /MASTER_NAME or /MASTER_NAME/DB")
    db = int(parts[1]) if len(parts) == 2 else None
    return sentinels, parts[0], password, db


class _Ask(Protocol):
    """Sends one command, fires ``answer`` with its reply, hangs up."""

    def __init__(self, command: tuple[Any, ...], answer: defer.Deferred[Any]) -> None:
        self.command = command
        self.answer = answer
        self.reader = hiredis.Reader(encoding="utf-8")

    def connectionMade(self) -> None:
        self.transport.write(hiredis.pack_command(self.command))

    def dataReceived(self, data: bytes) -> None:
        self.reader.feed(data)
        reply = self.reader.gets()
        if reply is not False:
            if not self.answer.called:
                self.answer.callback(reply)
            self.transport.loseConnection()

    def connectionLost(self, reason: object = None) -> None:
        if not self.answer.called:
            self.answer.errback(ConnectError(string="the sentinel hung up without answering"))


class SentinelEndpoint:
    """A client endpoint that connects to whatever master the sentinels name now."""

    def __init__(self, reactor: Any, sentinels: list[tuple[str, int]], master: str) -> None:
        self.reactor = reactor
        self.sentinels = sentinels
        self.master = master

    @defer.inlineCallbacks
    def connect(self, factory: Any) -> Any:
        """Ask each sentinel in turn for the master, then connect to it."""
        host, port = yield self.master_address()
        endpoint = HostnameEndpoint(self.reactor, host, port, timeout=5)
        return (yield endpoint.connect(factory))

    @defer.inlineCallbacks
    def master_address(self) -> Any:
        """(host, port) of the master, from the first sentinel that knows it."""
        problems = []
        for host, port in self.sentinels:
            try:
                reply = yield self._ask(host, port)
            except Exception as e:  # noqa: BLE001 - try the next sentinel
                problems.append(f"{host}:{port}: {e}")
                continue
            if isinstance(reply, list) and len(reply) == 2:
                return reply[0], int(reply[1])
            problems.append(f"{host}:{port}: does not know master {self.master!r} ({reply!r})")
        raise ConnectError(string="no sentinel named the master: " + "; ".join(problems))

    def watch(self, switched: Callable[[], None]) -> ClientService:
        """A service subscribed to ``+switch-master`` on a sentinel: ``switched()`` on failover."""

        def pushed(reply: list[Any]) -> None:
            if reply[0] == b"message" and reply[2].split(b" ", 1)[0] == self.master.encode():
                log.info("sentinel: master {name} switched: reconnecting", name=self.master)
                switched()

        def build() -> RedisConnection:
            return RedisConnection(
                "sentinel", [("SUBSCRIBE", "+switch-master")], _no_check, _ignore, _ignore, pushed
            )

        endpoint = _AnyOf(self.reactor, self.sentinels)
        return ClientService(endpoint, RedisConnectionFactory(build), retryPolicy=_retry)

    def _ask(self, host: str, port: int) -> defer.Deferred[Any]:
        answer: defer.Deferred[Any] = defer.Deferred()
        command = ("SENTINEL", "get-master-addr-by-name", self.master)
        factory = Factory.forProtocol(lambda: _Ask(command, answer))
        factory.noisy = False  # asked before every connection: no line each time
        endpoint = HostnameEndpoint(self.reactor, host, port, timeout=ASK_TIMEOUT)
        endpoint.connect(factory).addErrback(lambda f: None if answer.called else answer.errback(f))
        return answer.addTimeout(ASK_TIMEOUT, self.reactor)


def _no_check(answers: list[Any]) -> None:
    return None


def _ignore(conn: Any) -> None:
    pass


def _retry(attempt: int) -> float:
    return min(0.5 * 2**attempt, 5.0)


class _AnyOf:
    """A client endpoint that connects to the first of several sentinels that accepts."""

    def __init__(self, reactor: Any, addresses: list[tuple[str, int]]) -> None:
        self.reactor = reactor
        self.addresses = addresses

    @defer.inlineCallbacks
    def connect(self, factory: Any) -> Any:
        error: Exception = ConnectError(string="no sentinel")
        for host, port in self.addresses:
            try:
                endpoint = HostnameEndpoint(self.reactor, host, port, timeout=ASK_TIMEOUT)
                return (yield endpoint.connect(factory))
            except Exception as e:  # noqa: BLE001 - try the next sentinel
                error = e
        raise error
