"""Nothing a request carries is an internal error: clear request errors, JSON for every status."""

from __future__ import annotations

import http.client
import json
import socket

import pytest
from conftest import PushServer, free_port
from test_commands import http_post
from twisted.python.failure import Failure
from twisted.web.test.requesthelper import DummyChannel

from pushsvc.http import LimitedRequest

KEY = "api-key-0123456789abcdef"


def nested(depth: int) -> bytes:
    return b'{"uid":"deep","data":' + b"[" * depth + b"]" * depth + b"}"


@pytest.mark.parametrize("depth", [254, 255, 1000, 100000])
def test_deep_nesting_is_a_request_error_on_both_transports(server: PushServer, depth: int) -> None:
    with server.backend() as b:
        answer = b.request(nested(depth))
    status, body, headers = http_post(server, "/api/push", nested(depth))
    assert headers["content-type"] == "application/json"
    if depth == 254:  # the deepest orjson writes: an ordinary push (nobody is connected)
        assert answer == b"fail" and status == 200
        return
    assert answer.startswith(b"error ") and b"internal" not in answer, answer
    assert status == 400 and json.loads(body)["ok"] is False
    reason = json.loads(body)["error"]
    if depth < 1024:  # read, but too deep to write again
        assert answer == b"error " + reason.encode()
        assert reason.startswith("data nested too deeply (at most 254 levels")
    else:  # orjson refuses to read it at all
        assert "depth limit exceeded" in reason and b"depth limit exceeded" in answer
    assert "Traceback" not in server.log() and "command failed" not in server.log()


def raw_http(server: PushServer, request: bytes) -> tuple[bytes, dict]:
    """The status line and JSON body of one raw HTTP request."""
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=10) as s:
        s.sendall(request)
        response = http.client.HTTPResponse(s)
        response.begin()
        body = response.read()
    assert response.headers["content-type"] == "application/json", response.headers
    line = b"HTTP/1.1 %d %s" % (response.status, response.reason.encode())
    return line, json.loads(body)


def post(path: str, body: bytes, extra: bytes = b"") -> bytes:
    return b"POST %s HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: %d\r\n%s\r\n%s" % (
        path.encode(),
        len(body),
        extra,
        body,
    )


def test_every_status_is_json_with_its_reason_phrase(start_server) -> None:
    server = start_server("--max-body=100", "--auth-fail-limit=2", env={"PUSHSVC_API_KEY": KEY})
    auth = b"Authorization: Bearer %s\r\n" % KEY.encode()
    cases = [
        (post("/api/push", b"{nope", auth), b"400 Bad Request"),
        (post("/api/nope", b"{}", auth), b"404 Not Found"),
        (post("/api/push", b"z" * 200, auth), b"413 Request Entity Too Large"),
        (
            b"GET /api/push HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + auth + b"\r\n",
            b"405 Method Not Allowed",
        ),
        (
            b"FOO /api/push HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + auth + b"\r\n",
            b"405 Method Not Allowed",
        ),
        (post("/healthz", b"{}"), b"405 Method Not Allowed"),
        (post("/nothing/here", b"{}"), b"404 Not Found"),
        (post("/api/push", b"{}"), b"401 Unauthorized"),
        (post("/api/push", b"{}", b"X-API-Key: wrong\r\n"), b"401 Unauthorized"),
        (post("/api/push", b"{}", auth), b"429 Too Many Requests"),  # blocked after 2 failures
    ]
    for request, status in cases:
        line, body = raw_http(server, request)
        assert line == b"HTTP/1.1 " + status, (request, line)
        assert body["ok"] is False and isinstance(body["error"], str), body
    assert "Traceback" not in server.log()


def test_unavailable_is_json_503(start_server) -> None:
    server = start_server(f"--redis=redis://127.0.0.1:{free_port()}", "--redis-timeout=0.2")
    line, body = raw_http(server, post("/api/online", b'{"uid":"x"}'))
    assert line == b"HTTP/1.1 503 Service Unavailable" and body["ok"] is False


def test_a_bug_while_answering_is_json_500() -> None:
    channel = DummyChannel()
    request = LimitedRequest(channel, False)
    request.method, request.uri, request.clientproto = b"GET", b"/api/x", b"HTTP/1.1"
    request.processingFailed(Failure(ValueError("a bug")))
    written = channel.transport.written.getvalue()
    assert written.startswith(b"HTTP/1.1 500 Internal Server Error\r\n")
    assert written.endswith(b'{"ok":false,"error":"internal error"}\n')
