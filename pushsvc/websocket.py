"""The WebSocket frontend: browsers connect, authenticate, then only receive.

The first text frame (or a ``?token=`` query parameter) says who the
connection is; the registry takes it from there.  Frames after
authentication are ignored.
"""

from __future__ import annotations

import time

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionRequest
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from pushsvc.auth import (
    CLOSE_AUTH_TIMEOUT,
    CLOSE_BAD_REQUEST,
    AuthError,
    JWTAuthenticator,
    UidAuthenticator,
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

    def onConnect(self, request: ConnectionRequest) -> None:
        tokens = request.params.get("token")
        if tokens:
            self._query_token = tokens[0]

    def onOpen(self) -> None:
        self.factory.registry.attach(self)
        if self._query_token is not None:
            token, self._query_token = self._query_token, None
            self._authenticate(token)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if self.uid is not None:
            return  # after authentication, client frames carry nothing we act on
        if isBinary:
            self._refuse(AuthError(CLOSE_BAD_REQUEST, "the first frame must be a text frame"))
            return
        # Autobahn has already checked that text frames are valid UTF-8.
        self._authenticate(payload.decode("utf-8"))

    def _authenticate(self, credential: str) -> None:
        try:
            identity = self.factory.authenticator.authenticate(credential)
        except AuthError as e:
            self._refuse(e)
            return
        self.uid = identity.uid
        self.factory.registry.identify(self, identity.uid, identity.groups)

    def _refuse(self, error: AuthError) -> None:
        self.factory.registry.metrics.auth_failures[str(error.code)] += 1
        # Never log the credential itself: a token is a bearer secret.
        log.info("authentication failed from {peer}: {reason}", peer=self.peer, reason=error.reason)
        self.sendClose(error.code, error.reason[:120])

    def goAway(self) -> None:
        """Close with 1001 at shutdown.

        ``sendClose`` only accepts 1000 and 3000-4999 (the codes an application
        may choose), so the frame is sent through ``sendCloseFrame``.
        """
        self.sendCloseFrame(GOING_AWAY, b"server shutting down", isReply=False)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.factory.registry.detach(self)


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
    ) -> None:
        super().__init__(url)
        self.registry = registry
        self.authenticator = authenticator
        self.auth_timeout = auth_timeout
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
        )
        self._sweeper = LoopingCall(self._close_unauthenticated)

    def startFactory(self) -> None:
        super().startFactory()
        interval = max(0.05, min(1.0, self.auth_timeout / 4))
        self._sweeper.start(interval, now=False)

    def stopFactory(self) -> None:
        if self._sweeper.running:
            self._sweeper.stop()
        super().stopFactory()

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
