"""The browser-facing part of the HTTP port: ``/ws``, ``/push.js``, ``/push.mjs``, ``/demo``.

A site then needs one port behind one proxy: the page, its client library
and its WebSocket all come from the same origin.  ``/ws`` is Autobahn's
``WebSocketResource``, which takes over the HTTP channel's transport once the
upgrade request has been parsed (it relies on Twisted internals; the range of
Twisted versions it is tested with is pinned in pyproject.toml).

Every connection to the HTTP port may become a WebSocket, so
:class:`BrowserChannel` counts it against ``--max-connections`` and
``--max-per-ip`` from accept, and gives its request line and headers
``--max-handshake`` bytes and ``--handshake-timeout`` seconds, like
``--ws-port``.  A connection is never refused at accept here: ``/healthz``,
``/metrics`` and the API answer whatever browsers do; one that found the caps
full and then asks for ``/ws`` gets 503 or 429 unless a slot freed meanwhile.
A connection whose request is not ``/ws`` stops counting once its headers
are in.
"""

from __future__ import annotations

import hashlib
from importlib import resources

from autobahn.twisted.resource import WebSocketResource
from twisted.application.service import Service
from twisted.web import http, resource, server

from pushsvc.policy import ConnectionCaps
from pushsvc.websocket import PushServerFactory

JAVASCRIPT = "text/javascript; charset=utf-8"
HTML = "text/html; charset=utf-8"

# URL path -> (file in pushsvc/static, media type)
FILES: dict[bytes, tuple[str, str]] = {
    b"push.js": ("push.js", JAVASCRIPT),
    b"push.mjs": ("push.mjs", JAVASCRIPT),
    b"demo": ("demo.html", HTML),
}


def static_bytes(name: str) -> bytes:
    """A file shipped in pushsvc/static (package data, so it works from a wheel too)."""
    return resources.files("pushsvc").joinpath("static", name).read_bytes()


class StaticFile(resource.Resource):
    """A small file held in memory, revalidated by ETag.

    Read once at start-up, so every request of one process serves the same
    version; ``no-cache`` makes browsers ask again after an upgrade.  Not a
    leaf: ``/demo/`` is a 404 rather than a page whose relative links break.
    """

    def __init__(self, data: bytes, media_type: str) -> None:
        super().__init__()
        self.data = data
        self.media_type = media_type.encode("ascii")
        self.etag = b'"' + hashlib.sha256(data).hexdigest()[:20].encode("ascii") + b'"'

    def render_GET(self, request: server.Request) -> bytes:
        request.setHeader(b"content-type", self.media_type)
        request.setHeader(b"cache-control", b"no-cache")
        request.setHeader(b"x-content-type-options", b"nosniff")
        request.setHeader(b"etag", self.etag)
        if request.getHeader(b"if-none-match") == self.etag:
            request.setResponseCode(304)
            return b""
        request.setHeader(b"content-length", b"%d" % len(self.data))
        return b"" if request.method == b"HEAD" else self.data

    render_HEAD = render_GET


class FactoryService(Service):
    """Starts and stops a factory that no listening port owns.

    A port calls ``doStart``/``doStop`` on its factory; ``WebSocketResource``
    does not, and PushServerFactory's auth-timeout sweeper only runs between
    the two.  ``doStart`` counts like a port does, so the factory may also
    serve ``--ws-port``: the sweeper runs while either needs it.
    """

    def __init__(self, factory: PushServerFactory) -> None:
        self.factory = factory

    def startService(self) -> None:
        super().startService()
        self.factory.doStart()

    def stopService(self) -> None:
        super().stopService()
        self.factory.doStop()


def add_resources(root: resource.Resource, ws_factory: PushServerFactory | None) -> None:
    """Put the client library, the demo and (given a factory) ``/ws`` under ``root``."""
    for path, (name, media_type) in FILES.items():
        root.putChild(path, StaticFile(static_bytes(name), media_type))
    if ws_factory is not None:
        root.putChild(b"ws", CountedWebSocketResource(ws_factory))


class BrowserChannel(http.HTTPChannel):
    """An HTTP-port connection: a WebSocket candidate from accept until its request is in.

    Its site's ``ws_factory`` holds the caps and the handshake deadlines it
    shares with ``--ws-port``.  (Plain HTTP/1.1: this channel does not
    negotiate HTTP/2, which could not carry ``/ws`` either.)
    """

    _counted: str | None = None  # the address counted in the caps while set

    def connectionMade(self) -> None:
        ws = self.factory.ws_factory
        self.totalHeadersSize = ws.max_handshake
        super().connectionMade()
        peer = self.transport.getPeer()
        ip = getattr(peer, "host", None) or "?"
        if ws.caps.acquire(ip) is None:
            self._counted = ip
        ws.handshakes.add(self)

    def allHeadersReceived(self) -> None:
        self.factory.ws_factory.handshakes.discard(self)
        super().allHeadersReceived()

    def requestDone(self, request: server.Request) -> None:
        """The next request's headers get --handshake-timeout too (an idle keep-alive ends)."""
        super().requestDone(request)
        if self.transport is not None and not self.transport.disconnecting:
            self.factory.ws_factory.handshakes.add(self)

    def handshake_expired(self) -> None:
        """No complete request line and headers within --handshake-timeout."""
        ws = self.factory.ws_factory
        peer = self.transport.getPeer()
        ws.reject("handshake_timeout", 408, "handshake timeout", getattr(peer, "host", "?"))
        self.transport.write(b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\n\r\n")
        self.transport.loseConnection()

    def release(self) -> str | None:
        """Stop counting this connection; the address it was counted for, if it was."""
        ip, self._counted = self._counted, None
        if ip is not None:
            self.factory.ws_factory.caps.release(ip)
        return ip

    def connectionLost(self, reason: object) -> None:
        self.factory.ws_factory.handshakes.discard(self)
        self.release()
        super().connectionLost(reason)


class CountedWebSocketResource(WebSocketResource):
    """``/ws``: the channel's count (from accept) passes to the WebSocket it becomes."""

    def __init__(self, factory: PushServerFactory) -> None:
        super().__init__(factory)
        self.ws_factory = factory

    def render(self, request: server.Request) -> bytes | int:
        factory = self.ws_factory
        channel = request.channel
        ip = channel.release() if isinstance(channel, BrowserChannel) else None
        if ip is None:  # over a cap at accept, or not counted: ask again now
            peer = request.getClientAddress()
            ip = getattr(peer, "host", None) or "?"
            reason = factory.caps.acquire(ip)
            if reason is not None:
                status = ConnectionCaps.STATUS[reason]
                factory.reject(reason, status, reason.replace("_", " "), ip)
                request.setResponseCode(status)
                request.setHeader(b"connection", b"close")
                return b""
        factory.hand_over(ip)
        try:
            return super().render(request)
        finally:
            factory.cancel_hand_over()
