"""The WebSocket frontend: browsers connect, authenticate, then only receive.

A thin adapter from Autobahn's callbacks to the node (as Django's daphne is
to its channel layer).  The first text frame (or a ``?token=`` query
parameter) says who the connection is: the uid itself, a signed token, or a
JSON hello carrying one of them and the history positions to resume from.
Frames after authentication are ignored.  Origins, connection caps, the
client frame rate and the send-queue guard (pushsvc.policy) are applied here.
"""

from __future__ import annotations

import time

import orjson
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from twisted.internet.interfaces import IAddress
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from pushsvc import compat
from pushsvc.auth import JWTAuthenticator, UidAuthenticator
from pushsvc.errors import (
    CLOSE_AUTH_TIMEOUT,
    CLOSE_BAD_REQUEST,
    CLOSE_GOING_AWAY,
    CLOSE_INVALID_TOKEN,
    CLOSE_POLICY,
    CLOSE_SLOW_CONSUMER,
    CLOSE_TOKEN_EXPIRED,
    CLOSE_TOO_MANY_CONNECTIONS,
    AuthError,
)
from pushsvc.history.replay import Replay
from pushsvc.history.store import Position
from pushsvc.hub import Frame
from pushsvc.node import Node
from pushsvc.policy import (
    DEFAULT_HANDSHAKE_TIMEOUT,
    DEFAULT_MAX_HANDSHAKE,
    DEFAULT_MAX_QUEUE,
    FD_RESERVE,
    ConnectionCaps,
    Deadlines,
    OriginPolicy,
    PerKeyCounter,
    SendQueueGuard,
    TokenBucket,
    peer_ip,
)
from pushsvc.ratelog import RateLimitedLog, close_reason, peer_text

# Module-level on purpose: Autobahn's classes keep their own ``log`` attribute
# (a txaio logger whose debug calls are no-ops unless enabled).
log = Logger()

# pushsvc_rejected_total{reason} of refused credentials and of connections
# Autobahn failed (each kind also has its own log line, once a minute at most).
REFUSED = {
    CLOSE_INVALID_TOKEN: "bad_token",
    CLOSE_TOKEN_EXPIRED: "expired_token",
    CLOSE_BAD_REQUEST: "bad_hello",
}
# Autobahn sets its frame parser's state on the connection with each frame;
# past this many attributes it is folded back (compat.compact) to keep an
# idle connection's dict at its smaller size (a dict of 22-42 keys is 832 bytes).
COMPACT_ABOVE = 21
# What deliver() reads per push: kept in a compacted connection's own dict
# (pushsvc.compat.compact).
HOT = ("_gate", "_guard", "envelopes")
FAILED = {1002: "protocol_violation", 1007: "invalid_payload", 1009: "message_too_big"}
RATE_NOTE = (
    "({suppressed} more of this kind since the last such line; the next 60 s are only "
    "counted in /metrics)"
)


def parse_hello(text: str) -> tuple[str, dict[str, Position] | None]:
    """The credential and history positions of a first frame.

    A JSON object with a ``uid`` or ``token`` key is a hello: its positions
    (``{}`` without ``since``) say the client wants envelopes.  Any other text
    is the credential itself, as in the Workerman recipe: None, plain texts.
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
        return credential, {}
    if not isinstance(since, dict):
        raise AuthError(CLOSE_BAD_REQUEST, "since must be an object")
    return credential, {channel: _position(pos) for channel, pos in since.items()}


def _position(pos: object) -> Position:
    if (
        not isinstance(pos, list)
        or len(pos) != 2
        or not isinstance(pos[0], int)
        or isinstance(pos[0], bool)
        or pos[0] < 0
        or not (pos[1] is None or isinstance(pos[1], str))
    ):
        raise AuthError(CLOSE_BAD_REQUEST, "since values must be [offset, epoch]")
    return pos[0], pos[1] or None


class PushServerProtocol(WebSocketServerProtocol):
    """One browser connection; the hub's ``Connection``."""

    uid: str | None = None
    # Stored pushes arrive as envelopes with their positions only for clients
    # that said hello in JSON; the seed's bare uid or token gets plain texts.
    envelopes = False
    _query_token: str | None = None
    _ip: str | None = None  # counted in the factory's per-IP table while set
    _counted: str | None = None  # counted in the factory's caps from accept while set
    # While the opening handshake arrives: its byte limit until the first read,
    # then a reader if that read did not hold the whole head.
    _head: compat.HandshakeReader | int | None = None
    _bucket: TokenBucket | None = None
    _guard: SendQueueGuard | None = None
    _gate: Replay | None = None  # while recovering history
    # Autobahn's own line per failed connection (1002, 1007, 1009) is dropped;
    # onClose counts and logs those, rate-limited.
    log = compat.FailureLog(WebSocketServerProtocol.log)

    def connectionMade(self) -> None:
        WebSocketServerProtocol.connectionMade(self)
        factory = self.factory
        self._counted, limit = factory.claim()
        if limit:
            self._head = limit
        factory.handshakes.add(self)
        if factory.max_queue:
            self._guard = SendQueueGuard(factory.max_queue, self._slow_consumer)
            compat.replace_producer(self.transport, self._guard)
        if factory.client_rate:
            self._bucket = TokenBucket(factory.client_rate, factory.client_burst)

    def dataReceived(self, data: bytes) -> None:
        """Until the headers are complete: collected with a byte limit, parsed once."""
        reader = self._head
        if reader is None:
            WebSocketServerProtocol.dataReceived(self, data)
            if len(vars(self)) > COMPACT_ABOVE and self.state == self.STATE_OPEN:
                # After the handshake and frames: keep what an idle one uses.
                compat.compact(self, HOT)
            return
        if type(reader) is int:  # the first read: a browser's whole head, as a rule
            if data.find(b"\r\n\r\n", 0, reader) >= 0:
                self._head = None
                WebSocketServerProtocol.dataReceived(self, data)  # onConnect ends its deadline
                return
            reader = self._head = compat.HandshakeReader(reader)
        try:
            head = reader.feed(data)
        except compat.HandshakeTooLarge:
            self._head = None
            self._reject("handshake_too_large", 431, "request header fields too large")
            return
        if head is not None:
            self._head = None
            WebSocketServerProtocol.dataReceived(self, head)  # onConnect ends its deadline

    def handshake_expired(self) -> None:
        """The opening handshake did not complete within --handshake-timeout of accept."""
        if self.state == self.STATE_CONNECTING:
            self._head = None
            self._reject("handshake_timeout", 408, "handshake timeout")

    def _reject(self, kind: str, code: int, reason: str) -> None:
        self.factory.reject(kind, code, reason, self.peer)
        compat.refuse_handshake(self, code, reason, None)

    def onConnect(self, request: ConnectionRequest) -> None:
        self.factory.handshakes.discard(self)
        self._ip = self.factory.admit(request)
        tokens = request.params.get("token")
        if tokens:
            self._query_token = tokens[0]

    def onOpen(self) -> None:
        self.factory.node.attach(self)
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
        factory = self.factory
        try:
            identity = factory.authenticator.authenticate(credential)
        except AuthError as e:
            self._refuse(e)
            return
        node = factory.node
        limit = factory.max_per_uid
        if limit and node.connections_of(identity.uid) >= limit:
            node.metrics.disconnects["too_many_connections"] += 1
            self.sendClose(CLOSE_TOO_MANY_CONNECTIONS, "too many connections")
            return
        self.uid = identity.uid
        self.envelopes = since is not None
        node.identify(self, identity.uid, identity.groups)
        if since:
            node.recover(self, identity.uid, identity.groups, since)

    def _refuse(self, error: AuthError) -> None:
        """Close with the error's code; counted, and logged once a minute per kind.

        The reason may quote the token (a JWT header is the peer's text): it is
        escaped and bounded in the log and in the close frame.  Never log the
        credential itself: a token is a bearer secret.
        """
        factory = self.factory
        kind = REFUSED.get(error.code, f"auth_{error.code}")
        factory.node.metrics.auth_failures[str(error.code)] += 1
        factory.node.metrics.rejected[kind] += 1
        reason = close_reason(error.reason)
        factory.ratelog.emit(
            kind,
            "authentication failed from {peer}: {reason} " + RATE_NOTE,
            peer=peer_text(self.peer or "?"),
            reason=reason,
        )
        self.sendClose(error.code, reason)

    # -- the hub's Connection ----------------------------------------------------

    def deliver(self, frame: Frame, gated: bool = True) -> bool:
        """The push hot path: the envelope or its plain twin, written at once when possible.

        Through the recovery gate while there is one (``gated``); while the
        send-queue guard counts (the peer lags), frames take Autobahn's path,
        where the guard sees every byte.  False if the socket said the peer
        is gone (reset): the push did not reach this connection.
        """
        if gated and self._gate is not None:
            self._gate.offer(frame)
            return True
        if frame.plain is not None and not self.envelopes:
            frame = frame.plain
        guard = self._guard
        return compat.send_prepared(self, frame, guard is None or not guard.state)

    def send_frame(self, frame: Frame) -> None:
        """Write a frame past the recovery gate (the gate's own way out)."""
        self.deliver(frame, False)

    def set_gate(self, gate: Replay | None) -> None:
        self._gate = gate

    def close(self, code: int, reason: str) -> None:
        self.sendClose(code, reason)

    def go_away(self) -> None:
        """Close with 1001 at shutdown."""
        compat.close_with(self, CLOSE_GOING_AWAY, b"server shutting down")

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        failure = compat.failure_of(self)
        if failure is not None:
            _failed(self, *failure)
        self.factory.node.detach(self)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        super().connectionLost(reason)
        factory = self.factory
        factory.handshakes.discard(self)
        if self._counted is not None:
            factory.caps.release(self._counted)
            self._counted = None
        if self._ip is not None:
            self.factory.per_ip.release(self._ip)
            self._ip = None

    # -- limits (pushsvc/policy.py; docs/security.md) ----------------------------

    def sendData(self, data: bytes, sync: bool = False, chopsize: int | None = None) -> None:
        """Autobahn's write path, counted by the send-queue guard while the peer lags.

        The handshake's response leaves at once, without Twisted's queued write.
        """
        guard = self._guard
        if guard is not None and guard.state and not guard.admit(len(data)):
            return  # closing as a slow consumer: dropped
        if self.state == self.STATE_CONNECTING and not (sync or chopsize):
            if compat.send_response_now(self, data):
                return
        WebSocketServerProtocol.sendData(self, data, sync, chopsize)

    def onFrameBegin(self) -> None:
        """Every client frame (data or control) spends a token of the connection's bucket."""
        bucket = self._bucket
        if bucket is not None and not bucket.take() and self.state == self.STATE_OPEN:
            self.factory.node.metrics.disconnects["rate_limit"] += 1
            compat.close_with(self, CLOSE_POLICY, b"rate limit exceeded")
        WebSocketServerProtocol.onFrameBegin(self)

    def _slow_consumer(self) -> None:
        """The peer stopped reading: stop routing pushes here, tell it why, then let it go.

        The 4010 close frame is queued behind what the peer has not read; the
        close handshake timeout aborts the connection (freeing its buffer) if
        the peer does not get through it.  Later writes are dropped.  This runs
        inside the hub's loop over connections, so the detach waits a turn.
        """
        node = self.factory.node
        node.metrics.disconnects["slow_consumer"] += 1
        self.factory.reactor.callLater(0, node.detach, self)
        if self.state == self.STATE_OPEN:
            self.sendClose(CLOSE_SLOW_CONSUMER, "slow consumer")
        else:
            self.dropConnection(abort=True)

    def onAutoPingTimeout(self) -> None:
        """No pong in time: counted, then Autobahn drops the connection."""
        self.factory.node.metrics.disconnects["ping_timeout"] += 1
        super().onAutoPingTimeout()

    def dropConnection(self, abort: bool = False) -> None:
        """Drop the TCP connection; an unclean drop is logged once a minute per reason.

        Autobahn warns for every connection dropped after a ping or closing
        handshake timeout; a network event that strands thousands of browsers,
        or a drain whose clients vanished, would write a line for each.
        """
        reason = compat.unclean_drop(self)
        if reason is None:
            super().dropConnection(abort)
            return
        self.factory.ratelog.emit(
            "drop: " + reason,
            "dropped a WebSocket ({peer}): {reason}; {suppressed} more for this reason "
            "since the last such line, the next 60 s are not logged",
            peer=self.peer,
            reason=reason,
        )
        compat.drop_quietly(self, super().dropConnection, abort)

    def failHandshake(self, reason: str, code: int = 400, responseHeaders: object = None) -> None:
        """Refuse the opening handshake: counted, and logged at most once a minute.

        Autobahn's own version logs two lines per refused connection, which a
        flood turns into a flood of log lines.
        """
        self.factory.refused(code, reason, self.peer)
        compat.refuse_handshake(self, code, reason, responseHeaders)


class PushServerFactory(WebSocketServerFactory):
    """Builds browser connections bound to the node and the auth policy."""

    protocol = PushServerProtocol

    def __init__(
        self,
        node: Node,
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
        max_handshake: int = DEFAULT_MAX_HANDSHAKE,
        handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
    ) -> None:
        super().__init__(url, server="pushsvc")  # no library version in the 101 response
        self.node = node
        self.authenticator = authenticator
        self.auth_timeout = auth_timeout
        self.max_queue = max_queue
        self.max_per_uid = max_per_uid
        self.max_handshake = max_handshake
        self.handshakes = Deadlines(handshake_timeout)
        self._set_caps(max_connections, max_per_ip, trust_x_forwarded_for)
        self._pending: tuple[str | None, int] = (None, 0)
        self._handover: tuple[str | None, int] | None = None
        self.lingering: set[RefusedSocket] = set()  # refused at accept, reading to the end
        self.client_rate = client_rate
        self.client_burst = max(client_burst, 1) if client_rate else 0
        self.origins = allowed_origins or OriginPolicy(None)
        self.ratelog = RateLimitedLog(log)
        self._set_options(
            max_frame,
            ping_interval,
            ping_timeout,
            compression,
            trust_x_forwarded_for,
        )
        self.protocol = compat.protocol_with_options(self)
        self._sweeper = LoopingCall(self._sweep)

    def _set_caps(self, max_connections: int, max_per_ip: int, trust_x_forwarded_for: int) -> None:
        # Counted from accept; per IP there only when the TCP peer is the client.
        self.caps = ConnectionCaps(max_connections, 0 if trust_x_forwarded_for else max_per_ip)
        # Counted at the handshake by the X-Forwarded-For address otherwise.
        self.per_ip = PerKeyCounter(max_per_ip if trust_x_forwarded_for else 0)
        self._xff = bool(trust_x_forwarded_for)

    def _set_options(
        self,
        max_frame: int,
        ping_interval: float,
        ping_timeout: float,
        compression: bool,
        trust_x_forwarded_for: int,
    ) -> None:
        # All options in one call: a second setProtocolOptions call resets
        # allowNullOrigin and friends to their defaults.
        self.setProtocolOptions(
            maxFramePayloadSize=max_frame,
            maxMessagePayloadSize=max_frame,
            autoPingInterval=ping_interval or 0,
            autoPingTimeout=ping_timeout if ping_interval else 0,
            # The handshake deadline is the factory's sweep (--handshake-timeout).
            openHandshakeTimeout=0,
            closeHandshakeTimeout=2,
            # Protocol violations get a close frame with a code (1002, 1007,
            # 1009...) instead of a silent TCP drop, so clients can tell why.
            failByDrop=False,
            perMessageCompressionAccept=_accept_deflate if compression else None,
            # --max-connections is counted from accept (self.caps), not by Autobahn.
            maxConnections=0,
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

    def startFactory(self) -> None:
        super().startFactory()
        shortest = min(self.auth_timeout, self.handshakes.timeout)
        interval = max(0.05, min(1.0, shortest / 4))
        self._sweeper.start(interval, now=False)

    def stopFactory(self) -> None:
        if self._sweeper.running:
            self._sweeper.stop()
        super().stopFactory()

    def buildProtocol(self, addr: IAddress) -> Protocol | None:
        """A connection counted against the caps from accept, or a socket refused at once.

        Over a cap, the socket gets its HTTP status (503 or 429) and is closed
        before anything is read from it, so it holds its descriptor no longer.
        """
        handover, self._handover = self._handover, None
        if handover is not None:  # /ws: counted since the HTTP channel's accept
            self._pending = handover
            return super().buildProtocol(addr)
        ip = getattr(addr, "host", None) or "?"
        reason = self.caps.acquire(ip)
        if reason is not None:
            status = ConnectionCaps.STATUS[reason]
            self.reject(reason, status, reason.replace("_", " "), ip)
            if len(self.lingering) >= RefusedSocket.LINGER_MAX:
                return None  # Twisted closes the socket at once, before the next accept
            return RefusedSocket(self, status, reason.replace("_", " "))
        self._pending = (ip, self.max_handshake)
        return super().buildProtocol(addr)

    def hand_over(self, ip: str) -> None:
        """The next connection built (by ``/ws``) takes over ``ip``'s count in ``caps``.

        Its request line and headers were already read and bounded by the
        HTTP channel, so it gets no byte limit of its own.
        """
        self._handover = (ip, 0)

    def cancel_hand_over(self) -> None:
        """Release the count of a hand-over no connection took (``/ws`` failed before)."""
        handover, self._handover = self._handover, None
        if handover is not None and handover[0] is not None:
            self.caps.release(handover[0])

    def claim(self) -> tuple[str | None, int]:
        """For the connection just built: the address counted for it and its handshake limit."""
        pending, self._pending = self._pending, (None, 0)
        return pending

    def admit(self, request: ConnectionRequest) -> str | None:
        """The forwarded address, counted; refuses what the origins or per-IP limit do not allow."""
        if not self.origins.allows(request.origin):
            raise ConnectionDeny(403, "origin not allowed")
        if not self._xff:
            return None  # counted by the TCP peer's address from accept
        ip = peer_ip(request.peer)
        if not self.per_ip.acquire(ip):
            self.node.metrics.rejected[ConnectionCaps.TOO_MANY_FROM_IP] += 1
            raise ConnectionDeny(429, "too many connections from this address")
        return ip

    def reject(self, kind: str, code: int, reason: str, peer: str | None) -> None:
        """A handshake refused for ``kind`` (a ``rejected`` reason), logged per kind."""
        self.node.metrics.rejected[kind] += 1
        self.refused(code, reason, peer, kind)

    def refused(self, code: int, reason: str, peer: str | None, kind: str = "refused") -> None:
        """Count a refused handshake; log one line a minute at most per kind."""
        self.node.metrics.handshake_refusals[str(code)] += 1
        self.ratelog.emit(
            kind,
            "refused a WebSocket handshake from {peer}: {code} {reason} "
            "({suppressed} more since the last such line; the next 60 s are only counted "
            "in /metrics)",
            peer=peer,
            code=code,
            reason=reason,
        )

    def _sweep(self) -> None:
        """One timer for every connection's deadlines, instead of a timer each."""
        for conn in self.handshakes.expired():
            conn.handshake_expired()
        self._close_unauthenticated()

    def _close_unauthenticated(self) -> None:
        """Close connections open for --auth-timeout without a uid."""
        deadline = time.monotonic() - self.auth_timeout
        for conn, opened in self.node.waiting_since():
            if opened > deadline:
                break
            conn.close(CLOSE_AUTH_TIMEOUT, "authentication timeout")


def _failed(conn: PushServerProtocol, code: int, reason: str) -> None:
    """A connection Autobahn failed (bad frames): counted, and logged once a minute per kind."""
    factory = conn.factory
    kind = FAILED.get(code, f"failed_{code}")
    factory.node.metrics.rejected[kind] += 1
    factory.ratelog.emit(
        kind,
        "closed a WebSocket from {peer} with {code}: {reason} " + RATE_NOTE,
        peer=peer_text(conn.peer or "?"),
        code=code,
        reason=peer_text(reason),
    )


class RefusedSocket(Protocol):
    """A socket over a connection cap: its HTTP status at once, never parsed, soon closed.

    The status is written once the client has sent something (a client
    reads no response before it has sent its request), then the write side
    is shut.  Closing with the request unread would make the kernel answer
    with a reset that can destroy the status before the client reads it; so
    what the client sends is read and dropped until it closes, for at most
    --handshake-timeout and --max-handshake bytes.  Only LINGER_MAX refused
    sockets wait like that at a time (their descriptors come out of the fd
    reserve); past that a refused socket is closed at accept, unanswered.
    """

    LINGER_MAX = FD_RESERVE // 4

    def __init__(self, factory: PushServerFactory, status: int, reason: str) -> None:
        self.factory = factory
        self.received = 0
        self.response = b"HTTP/1.1 %d %s\r\nConnection: close\r\nContent-Length: 0\r\n\r\n" % (
            status,
            reason.encode("ascii"),
        )

    def connectionMade(self) -> None:
        self.factory.lingering.add(self)
        self.factory.handshakes.add(self)

    def dataReceived(self, data: bytes) -> None:
        if not self.received:
            self.transport.write(self.response)
            self.transport.loseWriteConnection()
        self.received += len(data)
        if self.received > self.factory.max_handshake:
            self.transport.abortConnection()

    def handshake_expired(self) -> None:
        self.transport.abortConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.factory.lingering.discard(self)
        self.factory.handshakes.discard(self)


def _accept_deflate(offers: list) -> object | None:
    from autobahn.websocket.compress import PerMessageDeflateOffer, PerMessageDeflateOfferAccept

    for offer in offers:
        if isinstance(offer, PerMessageDeflateOffer):
            return PerMessageDeflateOfferAccept(offer)
    return None
