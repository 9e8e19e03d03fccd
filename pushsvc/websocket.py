"""The WebSocket frontend: browsers connect, authenticate, then only receive.

The first text frame (or a ``?token=`` query parameter) says who the
connection is: the uid itself, a signed token, or a JSON hello carrying one
of them and the history positions to resume from (pushsvc.history).  The
registry takes it from there.  Frames after authentication are ignored.
Limits (pushsvc.limits) and origins (pushsvc.access) are enforced here.
"""

from __future__ import annotations

import time

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.protocol import PreparedMessage
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from twisted.internet.protocol import connectionDone
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from pushsvc.access import OriginPolicy
from pushsvc.auth import (
    CLOSE_AUTH_TIMEOUT,
    CLOSE_BAD_REQUEST,
    AuthError,
    JWTAuthenticator,
    UidAuthenticator,
)
from pushsvc.fastpath import write_now
from pushsvc.history import Position, parse_hello
from pushsvc.limits import (
    CLOSE_RATE_LIMITED,
    CLOSE_SLOW_CONSUMER,
    CLOSE_TOO_MANY_CONNECTIONS,
    DEFAULT_MAX_QUEUE,
    PerKeyCounter,
    SendQueueGuard,
    TokenBucket,
    peer_ip,
)
from pushsvc.registry import Registry

GOING_AWAY = 1001

# Module-level on purpose: Autobahn's classes keep their own ``log`` attribute
# (a txaio logger whose debug calls are no-ops unless enabled).
log = Logger()


class PushServerProtocol(WebSocketServerProtocol):
    """One browser connection."""

    uid: str | None = None
    _query_token: str | None = None
    _ip: str | None = None  # counted in the factory's per-IP table while set
    _bucket: TokenBucket | None = None

    def connectionMade(self) -> None:
        super().connectionMade()
        factory = self.factory
        if factory.max_queue:
            guard = SendQueueGuard(self, factory.max_queue, self._slow_consumer)
            guard.attach(self.transport)
        if factory.client_rate:
            self._bucket = TokenBucket(factory.client_rate, factory.client_burst)

    def onConnect(self, request: ConnectionRequest) -> None:
        self.factory.admit(self, request)
        tokens = request.params.get("token")
        if tokens:
            self._query_token = tokens[0]

    def onOpen(self) -> None:
        self.factory.registry.attach(self)
        if self._query_token is not None:
            token, self._query_token = self._query_token, None
            self._authenticate(token)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if self.uid is not None or self.state != self.STATE_OPEN:
            return  # after authentication (or once closing), frames carry nothing we act on
        if isBinary:
            self._refuse(AuthError(CLOSE_BAD_REQUEST, "the first frame must be a text frame"))
            return
        # Autobahn has already checked that text frames are valid UTF-8.
        credential = payload.decode("utf-8")
        since = None
        if credential.startswith("{"):  # maybe a hello: {"uid"|"token": ..., "since": {...}}
            try:
                credential, since = parse_hello(credential)
            except AuthError as e:
                self._refuse(e)
                return
        self._authenticate(credential, since)

    def _authenticate(self, credential: str, since: dict[str, Position] | None = None) -> None:
        try:
            identity = self.factory.authenticator.authenticate(credential)
        except AuthError as e:
            self._refuse(e)
            return
        limit = self.factory.max_per_uid
        if limit and len(self.factory.registry.connections_of(identity.uid)) >= limit:
            self.factory.registry.metrics.disconnects["too_many_connections"] += 1
            self.sendClose(CLOSE_TOO_MANY_CONNECTIONS, "too many connections")
            return
        self.uid = identity.uid
        registry = self.factory.registry
        registry.identify(self, identity.uid, identity.groups)
        if since is not None and registry.history is not None:
            registry.history.recover(self, identity.uid, identity.groups, since)

    def _refuse(self, error: AuthError) -> None:
        self.factory.registry.metrics.auth_failures[str(error.code)] += 1
        # Never log the credential itself: a token is a bearer secret.
        log.info("authentication failed from {peer}: {reason}", peer=self.peer, reason=error.reason)
        self.sendClose(error.code, error.reason[:120])

    def sendPreparedMessage(self, preparedMsg: PreparedMessage) -> None:
        """The push hot path: write the frame straight to the socket when nothing is in the way.

        Autobahn's own path (``sendData``) builds debug-log arguments and
        queues the write for the next reactor turn; an open, uncompressed
        connection with nothing queued needs none of that.  Anything else
        (compression, Autobahn's send queue, the slow-consumer guard counting
        through ``sendData``) takes Autobahn's path.
        """
        if (
            self._perMessageCompress is None
            and not self.send_queue
            and "sendData" not in self.__dict__
        ):
            write_now(self.transport, preparedMsg.payloadHybi)
        else:
            super().sendPreparedMessage(preparedMsg)

    def goAway(self) -> None:
        """Close with 1001 at shutdown.

        ``sendClose`` only accepts 1000 and 3000-4999 (the codes an application
        may choose), so the frame is sent through ``sendCloseFrame``.
        """
        self.sendCloseFrame(GOING_AWAY, b"server shutting down", isReply=False)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.factory.registry.detach(self)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        super().connectionLost(reason)
        if self._ip is not None:
            self.factory.per_ip.release(self._ip)
            self._ip = None

    # -- limits (pushsvc/limits.py; docs/security.md) ----------------------------

    def onFrameBegin(self) -> None:
        """Every client frame (data or control) spends a token of the connection's bucket."""
        bucket = self._bucket
        if bucket is not None and not bucket.take() and self.state == self.STATE_OPEN:
            self.factory.registry.metrics.disconnects["rate_limit"] += 1
            # 1008 is outside sendClose's range (1000, 3000-4999), like goAway's 1001.
            self.sendCloseFrame(CLOSE_RATE_LIMITED, b"rate limit exceeded", isReply=False)
        super().onFrameBegin()

    def _slow_consumer(self) -> None:
        """The peer stopped reading: stop routing pushes here, tell it why, then let it go.

        The 4010 close frame is queued behind what the peer has not read; the
        close handshake timeout aborts the connection (freeing its buffer) if
        the peer does not get through it.  Later writes are dropped.  This runs
        inside a registry loop over connections, so the detach waits a turn.
        """
        registry = self.factory.registry
        registry.metrics.disconnects["slow_consumer"] += 1
        self.factory.reactor.callLater(0, registry.detach, self)
        if self.state == self.STATE_OPEN:
            self.sendClose(CLOSE_SLOW_CONSUMER, "slow consumer")
        else:
            self.dropConnection(abort=True)

    def onAutoPingTimeout(self) -> None:
        """No pong in time: counted, then Autobahn drops the connection."""
        self.factory.registry.metrics.disconnects["ping_timeout"] += 1
        super().onAutoPingTimeout()

    def dropConnection(self, abort: bool = False) -> None:
        """Drop the TCP connection; an unclean drop is logged once a minute per reason.

        Autobahn warns for every connection dropped after a ping or closing
        handshake timeout; a network event that strands thousands of browsers,
        or a drain whose clients vanished, would write a line for each.
        """
        if self.wasClean or self.state == self.STATE_CLOSED:
            super().dropConnection(abort)
            return
        reason = self.wasNotCleanReason or "connection dropped"
        self.factory.log_once(
            "drop: " + reason,
            "dropped a WebSocket ({peer}): {reason}; more for this reason in the next 60 s "
            "are not logged",
            peer=self.peer,
            reason=reason,
        )
        self.wasClean = True  # only while Autobahn's method runs: it warns when False
        try:
            super().dropConnection(abort)
        finally:
            self.wasClean = False

    def failHandshake(self, reason: str, code: int = 400, responseHeaders: object = None) -> None:
        """Refuse the opening handshake: counted, and logged at most once a minute.

        Autobahn's own version logs two lines per refused connection, which a
        flood turns into a flood of log lines.
        """
        self.factory.refused(code, reason, self.peer)
        self.wasNotCleanReason = reason
        self.sendHttpErrorResponse(code, reason, responseHeaders)
        self.wasClean = True  # a refusal is an orderly end: no per-connection warning
        self.dropConnection(abort=False)


class PushServerFactory(WebSocketServerFactory):
    """Builds browser connections bound to the shared registry and auth policy."""

    protocol = PushServerProtocol

    def __init__(
        self,
        registry: Registry,
        authenticator: UidAuthenticator | JWTAuthenticator,
        *,
        auth_timeout: float = 10.0,
        max_frame: int = 4096,
        ping_interval: float = 30.0,
        ping_timeout: float = 10.0,
        compression: bool = False,
        url: str | None = None,
        max_queue: int = DEFAULT_MAX_QUEUE,
        max_connections: int = 0,
        max_per_uid: int = 0,
        max_per_ip: int = 0,
        client_rate: float = 0.0,
        client_burst: int = 0,
        allowed_origins: OriginPolicy | None = None,
        trust_x_forwarded_for: int = 0,
    ) -> None:
        super().__init__(url)
        self.registry = registry
        self.authenticator = authenticator
        self.auth_timeout = auth_timeout
        self.max_queue = max_queue
        self.max_per_uid = max_per_uid
        self.per_ip = PerKeyCounter(max_per_ip)
        self.client_rate = client_rate
        self.client_burst = max(client_burst, 1) if client_rate else 0
        self.origins = allowed_origins or OriginPolicy(None)
        self._logged_until: dict[str, float] = {}
        # All options in one call: a second setProtocolOptions call resets
        # allowNullOrigin and friends to their defaults.
        self.setProtocolOptions(
            maxFramePayloadSize=max_frame,
            maxMessagePayloadSize=max_frame,
            autoPingInterval=ping_interval or 0,
            autoPingTimeout=ping_timeout if ping_interval else 0,
            openHandshakeTimeout=max(auth_timeout, 5.0),
            closeHandshakeTimeout=2,
            # Protocol violations get a close frame with a code (1002, 1007,
            # 1009...) instead of a silent TCP drop, so clients can tell why.
            failByDrop=False,
            perMessageCompressionAccept=_accept_deflate if compression else None,
            # Over --max-connections: HTTP 503 at the handshake (Autobahn's check).
            maxConnections=max_connections,
            # The peer address (for per-IP limits and logs) is taken from the
            # X-Forwarded-For entry this many proxies back; 0 ignores the header.
            trustXForwardedFor=trust_x_forwarded_for,
            # Origins are checked in admit() (403 instead of Autobahn's 400);
            # Autobahn's own check would refuse the "null" origin before it.
            allowNullOrigin=True,
            # A plain GET would get Autobahn's status page (its version) and
            # ?redirect=<url> an open redirect; answer 426 instead.
            webStatus=False,
        )
        # Autobahn copies every option from the factory onto each connection
        # unless the protocol class already has it: give this factory its own
        # protocol class holding the options, so a connection stores none.
        # (Callables such as perMessageCompressionAccept must stay plain
        # functions, not become methods of the class.)
        options = {
            name: staticmethod(value) if callable(value) else value
            for name in self.protocol.CONFIG_ATTRS
            for value in [getattr(self, name)]
        }
        self.protocol = type(self.protocol.__name__, (self.protocol,), options)
        self._sweeper = LoopingCall(self._close_unauthenticated)

    def startFactory(self) -> None:
        super().startFactory()
        interval = max(0.05, min(1.0, self.auth_timeout / 4))
        self._sweeper.start(interval, now=False)

    def stopFactory(self) -> None:
        if self._sweeper.running:
            self._sweeper.stop()
        super().stopFactory()

    def admit(self, conn: PushServerProtocol, request: ConnectionRequest) -> None:
        """Refuse at the handshake what the origin policy or the per-IP limit does not allow."""
        if not self.origins.allows(request.origin):
            raise ConnectionDeny(403, "origin not allowed")
        ip = peer_ip(request.peer)
        if not self.per_ip.acquire(ip):
            raise ConnectionDeny(429, "too many connections from this address")
        conn._ip = ip

    def refused(self, code: int, reason: str, peer: str | None) -> None:
        """Count a refused handshake; log one line a minute at most."""
        self.registry.metrics.handshake_refusals[str(code)] += 1
        self.log_once(
            "refused",
            "refused a WebSocket handshake from {peer}: {code} {reason} "
            "(further refusals in the next 60 s are only counted in /metrics)",
            peer=peer,
            code=code,
            reason=reason,
        )

    def log_once(self, kind: str, message: str, **fields: object) -> None:
        """Log ``message`` at most once a minute per ``kind``: for events clients cause in bulk."""
        now = time.monotonic()
        if now >= self._logged_until.get(kind, 0.0):
            self._logged_until[kind] = now + 60.0
            log.info(message, **fields)

    def _close_unauthenticated(self) -> None:
        """One sweep for every connection's auth timeout, instead of a timer each."""
        deadline = time.monotonic() - self.auth_timeout
        for conn, opened in self.registry.waiting_since():
            if opened > deadline:
                break
            conn.sendClose(CLOSE_AUTH_TIMEOUT, "authentication timeout")


def _accept_deflate(offers: list) -> object | None:
    from autobahn.websocket.compress import PerMessageDeflateOffer, PerMessageDeflateOfferAccept

    for offer in offers:
        if isinstance(offer, PerMessageDeflateOffer):
            return PerMessageDeflateOfferAccept(offer)
    return None
