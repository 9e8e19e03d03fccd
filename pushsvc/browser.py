"""The browser-facing part of the HTTP port: ``/ws``, ``/push.js``, ``/push.mjs``, ``/demo``.

A site then needs one port behind one proxy: the page, its client library
and its WebSocket all come from the same origin.  ``/ws`` is Autobahn's
``WebSocketResource``, which takes over the HTTP channel's transport once the
upgrade request has been parsed (it relies on Twisted internals; the range of
Twisted versions it is tested with is pinned in pyproject.toml).
"""

from __future__ import annotations

import hashlib
from importlib import resources

from autobahn.twisted.resource import WebSocketResource
from twisted.application.service import Service
from twisted.web import resource, server

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
        root.putChild(b"ws", WebSocketResource(ws_factory))
