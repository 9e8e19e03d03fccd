"""The backend port: newline-delimited JSON over TCP, the Workerman recipe's Text protocol.

Exactly one reply line per request line, in request order, so a backend may
pipeline many lines in one write.  This module only turns bytes into
requests and results into bytes; the command model does the work.  With a
backend secret, a connection's first line must authenticate it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

import orjson
from twisted.internet import reactor
from twisted.internet.interfaces import IDelayedCall, IReactorTime, ITCPTransport
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver

from pushsvc import commands, jsoncodec
from pushsvc.auth import Secrets
from pushsvc.compat import write_now
from pushsvc.errors import UnknownCommand, describe
from pushsvc.node import Node
from pushsvc.policy import FailureThrottle, default_max_connections
from pushsvc.ratelog import RateLimitedLog
from pushsvc.results import settle

log = Logger()

BACKEND_SECRET_ENV = "PUSHSVC_BACKEND_SECRET"

OK = b"ok\n"
FAIL = b"fail\n"
QUEUED = b"queued\n"  # a push with a ttl that nobody got now, stored for later
# Replies one backend connection may have waiting for the cluster before it
# stops reading requests (docs/cluster.md, "Backpressure").
MAX_WAITING = 1000


def error_line(reason: str, rid: Any = None) -> bytes:
    """An error reply: ``error <reason>``, or a JSON object when the request had an id."""
    if rid is not None:
        return jsoncodec.dumps({"id": rid, "ok": False, "error": reason}) + b"\n"
    return b"error " + reason.replace("\n", " ").encode("utf-8", "replace") + b"\n"


def ok_line(rid: Any) -> bytes:
    return jsoncodec.dumps({"id": rid, "ok": True}) + b"\n" if rid is not None else OK


def result_line(cmd: commands.Command, result: dict, rid: Any) -> bytes:
    if rid is not None:
        return jsoncodec.dumps({"id": rid, **result}) + b"\n"
    if cmd.delivery:
        if not result["ok"]:
            return FAIL
        return OK if result["delivered"] else QUEUED
    return orjson.dumps(result) + b"\n"


def decode_error(line: bytes, exc: Exception) -> str:
    try:
        line.decode("utf-8")
    except UnicodeDecodeError:
        return "invalid UTF-8"
    return f"invalid JSON: {exc}"


def is_auth_request(request: object) -> bool:
    return isinstance(request, dict) and request.get("cmd") == "auth"


SecretSource = Callable[[], "Secrets | None"]

DEFAULT_MAX_PENDING = 64  # unauthenticated backend connections (with a secret)


def default_max_backends() -> int:
    """Backend connections in all: a tenth of the WebSocket cap, at least 64.

    Backends are few (a pool per application server); the cap only stops a
    local process from taking the file descriptors browsers need.
    """
    return max(64, default_max_connections() // 10)


class BackendGate:
    """The backend port's optional shared secret, and the throttle for wrong guesses.

    ``secret`` may be a function returning the current secrets, so that a
    reload (SIGHUP) takes effect for the next auth line without touching
    this object.
    """

    def __init__(
        self,
        secret: Secrets | None | SecretSource,
        throttle: FailureThrottle | None = None,
    ) -> None:
        self._secret: SecretSource = secret if callable(secret) else (lambda: secret)
        self.throttle = throttle

    @property
    def secret(self) -> Secrets | None:
        return self._secret()

    def check(self, request: dict) -> bool:
        """Whether an auth request carries the secret (any secret when none is set)."""
        secrets = self.secret
        if secrets is None:
            return True
        secret = request.get("secret")
        if not isinstance(secret, str):
            return False
        return secrets.matches(secret.encode("utf-8"))


class BackendProtocol(LineReceiver):
    """One backend connection.

    ``dataReceived`` is overridden (LineReceiver would drop every line that
    follows an over-long one in the same buffer, and would write one reply per
    line); it splits a whole read at once, answers every line, and writes all
    the replies in one call.
    """

    delimiter = b"\n"
    factory: BackendFactory | None = None  # set by the factory; counts and caps connections
    _timer: IDelayedCall | None = None  # the auth timeout, until the first line authenticates
    _counted = False  # in the factory's counts
    _pending = False  # counted as unauthenticated

    def __init__(self, node: Node, max_line: int, gate: BackendGate | None = None) -> None:
        self.node = node
        self.MAX_LENGTH = max_line
        self.gate = gate or BackendGate(None)
        # Until the first line authenticates (with a secret configured), lines
        # go to _first_line; after a refusal, to nothing.
        self.authenticated = self.gate.secret is None
        self.closing = False
        self._partial = b""
        self._discarding = False  # inside an over-long line, until its newline
        self._waiting: deque[list[bytes | None]] | None = None
        self._held = False  # reading stopped: too many replies waiting for the cluster
        self._flush_call: IDelayedCall | None = None  # replies that came in this turn, written once
        # Bound once: a cluster push's reply slot would make two method objects per push.
        self._on_reply, self._on_broken = self._resolved, self._broken

    def connectionMade(self) -> None:
        self.node.metrics.backend_connections += 1
        if ITCPTransport.providedBy(self.transport):
            self.transport.setTcpNoDelay(True)
        # Backpressure: a backend that writes requests but does not read its
        # replies makes Twisted pause us (LineReceiver's pauseProducing stops
        # reading from the socket) instead of buffering replies without bound.
        self.transport.registerProducer(self, True)
        factory = self.factory
        if factory is not None:
            refusal = factory.admit(self._ip(), pending=not self.authenticated)
            if refusal is not None:
                self.transport.write(self._refuse(error_line(refusal)))
                return
            self._counted, self._pending = True, not self.authenticated
            if self._pending:
                self._timer = factory.clock.callLater(factory.auth_timeout, self._auth_timeout)
        throttle = self.gate.throttle
        if not self.authenticated and throttle is not None and throttle.blocked(self._ip()):
            self.node.metrics.rejected["backend_auth_blocked"] += 1
            self.transport.write(self._refuse(b"error too many failed authentication attempts\n"))

    def _auth_timeout(self) -> None:
        """No auth line within --auth-timeout: a silent peer must not hold a connection."""
        self._timer = None
        if self.authenticated or self.closing or self.factory is None:
            return
        self.factory.rejected(
            "backend_unauthenticated_timeout", "did not authenticate in time", self._ip()
        )
        self.closing = True
        self.transport.write(error_line("authentication timeout"))
        self.transport.loseConnection()

    def _ip(self) -> str:
        return getattr(self.transport.getPeer(), "host", "?")

    def dataReceived(self, data: bytes) -> None:
        buf = self._partial + data if self._partial else data
        replies: list[Any] = []  # each reply line, or a Later or Deferred of it
        start = 0
        limit = self.MAX_LENGTH
        while (end := buf.find(b"\n", start)) >= 0 and not self.closing:
            line = buf[start:end]
            start = end + 1
            if self._discarding:
                self._discarding = False  # that newline ended the over-long line
            elif len(line) > limit:
                replies.append(self._too_long())
            else:
                replies.append(self.lineReceived(line))
        rest = buf[start:]
        if len(rest) > limit:
            if not self._discarding and not self.closing:
                replies.append(self._too_long())
                self._discarding = True
            rest = b""
        self._partial = rest
        if replies:
            self._send(replies)

    def _too_long(self) -> bytes:
        """An over-long line: an error; before authentication, also the end of the connection."""
        reply = error_line(f"line longer than {self.MAX_LENGTH} bytes")
        if self.authenticated:
            return reply
        if self.factory is not None:
            self.factory.rejected(
                "backend_line_too_long", "sent an over-long first line", self._ip()
            )
        return self._refuse(reply)

    def lineReceived(self, line: bytes) -> Any:
        """Answer one request line (without its newline)."""
        if self.closing:
            return b""  # the connection is closing: no more replies
        if line.endswith(b"\r"):
            line = line[:-1]
        if not self.authenticated:
            return self._first_line(line)
        if not line.strip():
            return error_line("empty line")
        try:
            request = jsoncodec.loads(line)
        except orjson.JSONDecodeError as e:
            return error_line(decode_error(line, e))
        return commands.serve(self.node, request, None, self)

    def answered(self, cmd: commands.Command, result: dict, request: Any) -> bytes:
        return result_line(cmd, result, commands.request_id(request))

    def refused(self, error: BaseException, request: Any) -> bytes:
        rid = commands.request_id(request)
        if isinstance(error, UnknownCommand) and is_auth_request(request):
            # Not a command: the backend port's own.  ``ok`` without a secret,
            # so that backends can send it before the service requires it.
            ok = self.gate.check(request)
            return ok_line(rid) if ok else error_line("authentication failed", rid)
        return error_line(describe(error)[1], rid)

    def _first_line(self, line: bytes) -> bytes:
        """With a backend secret: the first line must be ``{"cmd":"auth","secret":...}``.

        Anything else gets one error line and the connection is closed after
        it: a peer that does not know the secret gains nothing by staying, and
        a backend missing its auth line fails loudly.
        """
        try:
            request = jsoncodec.loads(line)
        except orjson.JSONDecodeError:
            request = None
        rid = commands.request_id(request)
        throttle = self.gate.throttle
        metrics = self.node.metrics
        if not is_auth_request(request):
            metrics.rejected["backend_unauthenticated_request"] += 1
            if throttle is not None:  # no credential tried: logged, not counted
                throttle.note(self._ip(), "backend connection sent a request before authenticating")
            return self._refuse(error_line("authentication required", rid))
        if not self.gate.check(request):  # type: ignore[arg-type]
            metrics.rejected["backend_auth_failed"] += 1
            if throttle is not None:
                throttle.failed(self._ip(), "backend authentication failed (wrong secret)")
            return self._refuse(error_line("authentication failed", rid))
        self.authenticated = True
        self._stop_waiting()
        return ok_line(rid)

    def _stop_waiting(self) -> None:
        """No longer unauthenticated: the timer and the pending count end."""
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None
        if self._pending and self.factory is not None:
            self._pending = False
            self.factory.pending -= 1

    def _refuse(self, reply: bytes) -> bytes:
        """Answer ``reply``, then close once it is written; later lines get nothing."""
        self.closing = True
        reactor.callLater(0, self.transport.loseConnection)  # after this read's replies
        return reply

    # -- ordered replies ------------------------------------------------------

    def _send(self, replies: list[Any]) -> None:
        if self._waiting is None and all(type(r) is bytes for r in replies):
            write_now(self.transport, b"".join(replies))
            return
        if self._waiting is None:
            self._waiting = deque()
        for reply in replies:
            # One slot per reply, filled when its answer comes: replies go
            # out in request order without searching the queue.
            slot: list[bytes | None] = [None]
            self._waiting.append(slot)
            if type(reply) is bytes:
                slot[0] = reply
            else:
                settle(reply, self._on_reply, self._on_broken, slot)
        self._flush()
        self._hold_if_behind()

    def _resolved(self, value: bytes, slot: list[bytes | None]) -> None:
        """One reply is known: written at the end of this reactor turn with the others.

        A Redis read answers many pushes at once (one PUBLISH reply each):
        their replies leave in one write, not one write each.
        """
        slot[0] = value
        if self._waiting is not None and self._flush_call is None:
            self._flush_call = reactor.callLater(0, self._flush_turn)

    def _broken(self, error: BaseException, slot: list[bytes | None]) -> None:
        """Not a reply but a bug (``serve`` answers every error, and logged this one)."""
        self._resolved(error_line("internal error"), slot)

    def _flush_turn(self) -> None:
        self._flush_call = None
        if self._waiting is not None:
            self._flush()

    # -- backpressure: the cluster behind this backend ---------------------------
    # A pipelining backend can send requests faster than Redis and the other
    # nodes answer them.  Past MAX_WAITING replies not yet sent, this
    # connection stops reading: requests wait in the socket (the backend's
    # writes block), not in timers, and no reply says "Redis is unreachable"
    # merely because it queued behind others.

    def _hold_if_behind(self) -> None:
        waiting = self._waiting
        if not self._held and waiting is not None and len(waiting) >= MAX_WAITING:
            self._held = True
            self.transport.pauseProducing()

    def _release_if_caught_up(self) -> None:
        waiting = self._waiting
        if (
            self._held
            and self.transport is not None
            and (waiting is None or len(waiting) <= MAX_WAITING // 2)
        ):
            self._held = False
            if not self.paused:  # still paused while the backend does not read its replies
                self.transport.resumeProducing()

    def resumeProducing(self) -> None:
        """Our replies drained (Twisted's producer call): read again unless still behind."""
        self.paused = False
        if not self._held:
            self.transport.resumeProducing()

    def _flush(self) -> None:
        waiting = self._waiting
        ready = []
        while waiting and waiting[0][0] is not None:
            ready.append(waiting.popleft()[0])
        if ready and self.transport is not None:
            write_now(self.transport, b"".join(ready))  # type: ignore[arg-type]
        if not waiting:
            self._waiting = None
        self._release_if_caught_up()

    def connectionLost(self, reason: object = None) -> None:
        self.node.metrics.backend_connections -= 1
        self._waiting = None
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush_call = None
        self._stop_waiting()
        if self._counted and self.factory is not None:
            self._counted = False
            self.factory.connections -= 1


class BackendFactory(Factory):
    """Creates backend connections bound to the node, and counts them against the caps.

    ``max_backends`` caps all backend connections (0: no cap), ``max_pending``
    those that have not authenticated yet (with a secret; 0: no cap).  Over a
    cap a connection gets one error line and is closed.
    """

    def __init__(
        self,
        node: Node,
        max_line: int = 1 << 20,
        gate: BackendGate | None = None,
        *,
        auth_timeout: float = 10.0,
        max_backends: int = 0,
        max_pending: int = DEFAULT_MAX_PENDING,
        clock: IReactorTime | None = None,
    ) -> None:
        self.node = node
        self.max_line = max_line
        self.gate = gate
        self.auth_timeout = auth_timeout
        self.max_backends = max_backends
        self.max_pending = max_pending
        self.clock: IReactorTime = clock or reactor  # type: ignore[assignment]
        self.connections = 0  # counted connections
        self.pending = 0  # of which not authenticated yet
        self.ratelog = RateLimitedLog(log, clock=self.clock.seconds)

    def buildProtocol(self, addr: object) -> BackendProtocol:
        proto = BackendProtocol(self.node, self.max_line, self.gate)
        proto.factory = self
        return proto

    def admit(self, ip: str, pending: bool) -> str | None:
        """Count a new connection; or the error it gets if a cap is reached."""
        if self.max_backends and self.connections >= self.max_backends:
            self.rejected("too_many_backends", "over --max-backends", ip)
            return "too many backend connections"
        if pending and self.max_pending and self.pending >= self.max_pending:
            self.rejected("too_many_unauthenticated_backends", "over --max-backend-pending", ip)
            return "too many unauthenticated backend connections"
        self.connections += 1
        self.pending += pending
        return None

    def rejected(self, reason: str, what: str, ip: str) -> None:
        """Count a refused backend connection; one log line per reason a minute at most."""
        self.node.metrics.rejected[reason] += 1
        self.ratelog.emit(
            reason,
            "backend port: closed a connection from {ip}: {what} ({suppressed} more for this "
            "reason since the last such line; the next 60 s are only counted in /metrics)",
            ip=ip,
            what=what,
        )
