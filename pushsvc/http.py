"""The HTTP port: the command model over HTTP, health and metrics, and the browser side.

``POST /api/<command>`` takes the same JSON object as a line on the backend
port and answers with the same result, as JSON with a status code.  The
port binds 127.0.0.1 by default; an API key protects it when configured.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http, resource, server
from twisted.web.error import UnsupportedMethod

from pushsvc import browser, commands, jsoncodec
from pushsvc.auth import Secrets
from pushsvc.errors import INTERNAL, describe, error_body
from pushsvc.metrics import MetricsCollector
from pushsvc.node import Node
from pushsvc.policy import FailureThrottle
from pushsvc.results import then
from pushsvc.websocket import PushServerFactory

log = Logger()

JSON = b"application/json"
# Reason phrases twisted.web lacks: without one it sends "429 Unknown Status".
PHRASES = {**http.RESPONSES, 429: b"Too Many Requests"}


class LimitedRequest(server.Request):
    """A request that stops buffering its body past the site's ``max_body``.

    Twisted would otherwise spool any body to disk before a resource sees it;
    here an over-long body is dropped as it arrives and answered with 413.
    """

    too_large = False
    _received = 0

    def setHeader(self, name: bytes | str, value: bytes | str) -> None:
        """``Server: pushsvc``: no library name and version for scanners to match."""
        if isinstance(name, (bytes, str)) and name.lower() in (b"server", "server"):
            value = b"pushsvc"
        super().setHeader(name, value)

    def gotLength(self, length: int | None) -> None:
        limit = self.channel.site.max_body
        if length is not None and length > limit:
            self.too_large = True
            length = 0
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self.too_large:
            return
        self._received += len(data)
        if self._received > self.channel.site.max_body:
            self.too_large = True
            self.content.seek(0)
            self.content.truncate()
            return
        super().handleContentChunk(data)

    def processingFailed(self, reason: Failure) -> Failure:
        """A bug while answering: logged once with its traceback, answered in JSON, not HTML."""
        log.failure("HTTP request failed", reason)
        if not self.finished and not self.startedWriting:
            body = reply(self, 500, error_body(INTERNAL))
            self.setHeader(b"content-length", b"%d" % len(body))
            self.write(body)
        if not self.finished:
            self.finish()
        return reason


def reply(request: server.Request, status: int, body: dict[str, Any]) -> bytes:
    """A JSON answer with ``status`` and its standard reason phrase."""
    request.setResponseCode(status, PHRASES.get(status, b"Error"))
    request.setHeader(b"content-type", JSON)
    request.setHeader(b"cache-control", b"no-store")
    return jsoncodec.dumps(body) + b"\n"


class JsonResource(resource.Resource):
    """A resource whose own errors are JSON: 404 for unknown children, 405 for other methods.

    twisted.web's versions are HTML pages, which API clients cannot parse.
    """

    def getChild(self, path: bytes, request: server.Request) -> resource.Resource:
        return NotFound()

    def render(self, request: server.Request) -> bytes | int:
        try:
            return super().render(request)
        except UnsupportedMethod as e:
            allowed = list(e.allowedMethods) or [b"GET"]
            if request.method == b"HEAD" and b"GET" in allowed:
                raise  # twisted.web answers HEAD with GET's headers
            request.setHeader(b"allow", b", ".join(allowed))
            return reply(request, 405, error_body("method not allowed"))


class NotFound(resource.Resource):
    """Any path nothing serves."""

    isLeaf = True

    def render(self, request: server.Request) -> bytes:
        return reply(request, 404, error_body("not found"))


class ApiResource(resource.Resource):
    """``/api/<command>``: one command per request."""

    isLeaf = True

    def __init__(
        self,
        node: Node,
        api_key: Secrets | None | Callable[[], Secrets | None],
        throttle: FailureThrottle | None = None,
    ) -> None:
        super().__init__()
        self.node = node
        # A function returning the current key, so that SIGHUP's reload applies.
        self._api_key = api_key if callable(api_key) else (lambda: api_key)
        self.throttle = throttle or FailureThrottle(limit=0)

    @property
    def api_key(self) -> Secrets | None:
        return self._api_key()

    def _authorized(self, request: server.Request) -> bool:
        api_key = self.api_key
        if api_key is None:
            return True
        given = request.getHeader(b"authorization") or b""
        if given[:7].lower() == b"bearer ":
            given = given[7:].strip()
        else:
            given = request.getHeader(b"x-api-key") or b""
        return api_key.matches(given)

    def _refused(self, request: server.Request) -> bytes | None:
        """429 for an IP with too many failed API keys, 401 for a missing or wrong key.

        Each failure is counted (pushsvc_rejected_total{reason="api_key_failed"})
        and logged once a minute at most, whatever the number of IPs.
        """
        if self.api_key is None:
            return None
        ip = getattr(request.getClientAddress(), "host", "?")
        if self.throttle.blocked(ip):
            self.node.metrics.rejected["api_key_blocked"] += 1
            request.setHeader(b"retry-after", b"%d" % self.throttle.retry_after(ip))
            error = "too many failed authentication attempts"
            return reply(request, 429, {"ok": False, "error": error})
        if self._authorized(request):
            return None
        self.node.metrics.rejected["api_key_failed"] += 1
        self.throttle.failed(ip, "HTTP API: refused a request without a valid API key")
        request.setHeader(b"www-authenticate", b'Bearer realm="pushsvc"')
        return reply(request, 401, {"ok": False, "error": "missing or invalid API key"})

    def render(self, request: server.Request) -> bytes | int:
        refused = self._refused(request)
        if refused is not None:
            return refused
        if len(request.postpath) != 1 or not request.postpath[0]:
            return reply(request, 404, {"ok": False, "error": "use /api/<command>"})
        if request.method != b"POST":
            request.setHeader(b"allow", b"POST")
            return reply(request, 405, {"ok": False, "error": "use POST"})
        if getattr(request, "too_large", False):
            limit = request.channel.site.max_body
            return reply(request, 413, {"ok": False, "error": f"body larger than {limit} bytes"})
        try:
            name = request.postpath[0].decode("utf-8")
        except UnicodeDecodeError:
            return reply(request, 404, {"ok": False, "error": "unknown command"})
        body = request.content.read()
        try:
            payload = jsoncodec.loads(body) if body.strip() else {}
        except orjson.JSONDecodeError as e:
            return reply(request, 400, {"ok": False, "error": f"invalid JSON: {e}"})
        answer = commands.serve(self.node, payload, name, self)
        if type(answer) is not tuple:  # a Later or a Deferred: Redis answers
            gone = _watch(request)
            then(answer, lambda a: gone or _finish(request, *a))
            return server.NOT_DONE_YET
        return reply(request, *answer)

    def answered(
        self, cmd: commands.Command, result: dict[str, Any], payload: Any
    ) -> tuple[int, dict[str, Any]]:
        rid = commands.request_id(payload)
        return 200, result if rid is None else {"id": rid, **result}

    def refused(self, error: BaseException, payload: Any) -> tuple[int, dict[str, Any]]:
        status, reason = describe(error)
        return status, error_body(reason, commands.request_id(payload) if status != 404 else None)


def _watch(request: server.Request) -> list[bool]:
    """A flag that turns true if the client goes away before the answer is ready."""
    gone: list[bool] = []
    request.notifyFinish().addErrback(lambda _: gone.append(True))
    return gone


def _finish(request: server.Request, status: int, body: dict[str, Any]) -> None:
    if not request.finished:
        request.write(reply(request, status, body))
        request.finish()


class HealthResource(JsonResource):
    """``/healthz``: 200 while serving, 503 once shutdown has begun."""

    isLeaf = True

    def __init__(self, node: Node) -> None:
        super().__init__()
        self.node = node

    def render_GET(self, request: server.Request) -> bytes:
        request.setHeader(b"content-type", b"text/plain")
        if self.node.running:
            return b"ok\n"
        request.setResponseCode(503)
        return b"stopping\n"


class MetricsResource(JsonResource):
    """``/metrics`` in the Prometheus text format."""

    isLeaf = True

    def __init__(self, node: Node) -> None:
        super().__init__()
        self.collectors = CollectorRegistry(auto_describe=False)
        collector = MetricsCollector(node.hub, node.metrics, lambda: node.broker.stale_messages)
        self.collectors.register(collector)

    def render_GET(self, request: server.Request) -> bytes:
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode())
        return generate_latest(self.collectors)


class PushSite(server.Site):
    """The HTTP port's site: bounded request bodies and no access log line per request."""

    requestFactory = LimitedRequest

    def __init__(
        self,
        root: resource.Resource,
        max_body: int,
        ws_factory: PushServerFactory | None = None,
    ) -> None:
        # Request headers must arrive within --handshake-timeout (an idle
        # keep-alive connection too: browser.BrowserChannel); a stalled body
        # ends after twice that without a byte (Twisted's idle timeout).
        timeout = 2 * ws_factory.handshakes.timeout if ws_factory is not None else 60
        super().__init__(root, timeout=timeout)
        self.max_body = max_body
        self.ws_factory = ws_factory
        if ws_factory is not None:
            # Counted as WebSocket candidates from accept, headers bounded (browser.py).
            self.protocol = browser.BrowserChannel

    def log(self, request: server.Request) -> None:
        """No per-request log lines: /metrics counts what matters."""

    def getResourceFor(self, request: server.Request) -> resource.IResource:
        """A connection whose request is not ``/ws`` is no WebSocket candidate any more."""
        found = super().getResourceFor(request)
        channel = request.channel
        if isinstance(channel, browser.BrowserChannel) and not isinstance(
            found, browser.CountedWebSocketResource
        ):
            channel.release()
        return found


def make_site(
    node: Node,
    api_key: Secrets | None | Callable[[], Secrets | None],
    max_body: int = 1 << 20,
    ws_factory: PushServerFactory | None = None,
    throttle: FailureThrottle | None = None,
) -> PushSite:
    """The HTTP port's resource tree; ``ws_factory`` serves WebSockets at ``/ws``.

    The browser side (``/push.js``, ``/demo``, ``/ws``) lives in browser.py.
    """
    root = JsonResource()
    root.putChild(b"api", ApiResource(node, api_key, throttle))
    root.putChild(b"healthz", HealthResource(node))
    root.putChild(b"metrics", MetricsResource(node))
    browser.add_resources(root, ws_factory)
    return PushSite(root, max_body, ws_factory)


def make_metrics_site(node: Node) -> PushSite:
    """``--metrics-port``: this process's /metrics and /healthz alone, on a port it does not share.

    With --reuse-port the HTTP port is shared by every process and a scrape
    reaches one at random; each process's own port gives every scrape a
    known target.
    """
    root = resource.Resource()
    root.putChild(b"healthz", HealthResource(node))
    root.putChild(b"metrics", MetricsResource(node))
    return PushSite(root, 0)
