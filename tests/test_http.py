"""The HTTP port: status codes, the API key, body limits, health and metrics."""

from __future__ import annotations

import json
import socket
import urllib.request

from conftest import PushServer
from prometheus_client.parser import text_string_to_metric_families
from test_commands import http_post
from test_push import seed_line

KEY = "k-0123456789abcdef0123456789abcdef"


def get(server: PushServer, path: str) -> tuple[int, bytes, object]:
    try:
        with urllib.request.urlopen(server.http_url + path, timeout=10) as resp:
            return resp.status, resp.read(), resp.headers
    except urllib.error.HTTPError as e:
        return e.code, e.read(), e.headers


def test_api_key_required_when_set(start_server) -> None:
    server = start_server(env={"PUSHSVC_API_KEY": KEY})
    body = b'{"uid":"x","data":"y"}'
    status, data, headers = http_post(server, "/api/push", body)
    assert status == 401 and json.loads(data)["error"] == "missing or invalid API key"
    assert headers["www-authenticate"].startswith("Bearer")
    assert http_post(server, "/api/push", body, {"Authorization": "Bearer nope"})[0] == 401
    assert http_post(server, "/api/push", body, {"Authorization": f"Bearer {KEY}"})[0] == 200
    assert http_post(server, "/api/push", body, {"X-API-Key": KEY})[0] == 200
    assert "refused a request without a valid API key" in server.log()
    # Health and metrics stay open to the scraper on the (127.0.0.1) HTTP port.
    assert get(server, "/healthz")[0] == 200


def test_api_key_file(start_server, tmp_path) -> None:
    key_file = tmp_path / "api-key"
    key_file.write_text(KEY + "\n")
    server = start_server(f"--api-key-file={key_file}")
    assert http_post(server, "/api/stats", b"{}")[0] == 401
    assert http_post(server, "/api/stats", b"{}", {"Authorization": f"Bearer {KEY}"})[0] == 200


def test_status_codes(server: PushServer) -> None:
    assert http_post(server, "/api/push", b"{not json")[0] == 400
    assert http_post(server, "/api/push", b"[1]")[0] == 400
    assert http_post(server, "/api/nope", b"{}")[0] == 404
    assert http_post(server, "/api", b"{}")[0] == 404
    assert http_post(server, "/api/push/extra", b"{}")[0] == 404
    assert get(server, "/api/stats")[0] == 405
    status, data, _ = http_post(server, "/api/stats", b"")  # an empty body is {}
    assert status == 200 and json.loads(data)["ok"] is True
    assert get(server, "/nothing-here")[0] == 404


def test_body_too_large(start_server) -> None:
    server = start_server("--max-body=1024")
    big = json.dumps({"uid": "x", "data": "z" * 5000}).encode()
    status, data, _ = http_post(server, "/api/push", big)
    assert status == 413 and json.loads(data)["error"] == "body larger than 1024 bytes"
    # Chunked, without a Content-Length: cut off as it arrives.
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=10) as s:
        s.sendall(b"POST /api/push HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(5):
            s.sendall(b"3e8\r\n" + b"z" * 1000 + b"\r\n")
        s.sendall(b"0\r\n\r\n")
        assert s.recv(4096).startswith(b"HTTP/1.1 413")
    assert http_post(server, "/api/stats", b"{}")[0] == 200


def test_a_one_mib_body_with_default_options(server: PushServer, ws_clients) -> None:
    """The default --max-body matches --max-line: 1 MiB."""
    ws = server.ws("http-mib", max_size=2 << 20)
    ws_clients.append(ws)
    server.wait_for(lambda s: s["pending"] == 0)
    body = seed_line("http-mib", 1 << 20)
    assert http_post(server, "/api/push", body)[:2] == (200, b'{"ok":true,"delivered":1}\n')
    assert ws.recv(timeout=10) == json.loads(body)["percent"]
    status, data, _ = http_post(server, "/api/push", seed_line("http-mib", (1 << 20) + 1))
    assert status == 413 and json.loads(data)["error"] == "body larger than 1048576 bytes"


def test_healthz(server: PushServer) -> None:
    status, body, _ = get(server, "/healthz")
    assert (status, body) == (200, b"ok\n")


def metrics(server: PushServer) -> dict[str, float]:
    status, body, headers = get(server, "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    values = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            values[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return values


def test_metrics_count_what_happened(start_server) -> None:
    server = start_server(env={"PUSHSVC_SECRET": "metrics-secret-0123456789abcdefghij"})
    before = metrics(server)
    assert before["pushsvc_connections"] == 0
    assert before["pushsvc_pushes_total{outcome=delivered}"] == 0
    import time

    import jwt

    token = jwt.encode(
        {"sub": "m1", "exp": int(time.time()) + 60}, "metrics-secret-0123456789abcdefghij"
    )
    tabs = [server.ws(token), server.ws(token)]
    bad = server.ws("not-a-token")
    server.wait_for(lambda s: s["connections"] == 2 and s["pending"] == 0)
    with server.backend() as b:
        for _ in range(3):
            assert b.request('{"uid":"m1","data":"12345"}') == b"ok"
        assert b.request('{"uid":"m2","data":"x"}') == b"fail"
        assert b.request('{"uid":5}').startswith(b"error")
        assert b.request('{"cmd":"broadcast","data":"bc"}') == b"ok"
        after = metrics(server)
    assert after["pushsvc_connections"] == 2
    assert after["pushsvc_online_uids"] == 1
    assert after["pushsvc_pushes_total{outcome=delivered}"] == 3
    assert after["pushsvc_pushes_total{outcome=offline}"] == 1
    assert after["pushsvc_pushes_total{outcome=error}"] == 1
    assert after["pushsvc_broadcasts_total"] == 1
    assert after["pushsvc_frames_sent_total"] == 3 * 2 + 2
    assert after["pushsvc_bytes_sent_total"] == 3 * 2 * 5 + 2 * 2
    assert after["pushsvc_auth_failures_total{code=4001}"] == 1
    assert after["pushsvc_backend_connections"] == 1
    # Four pushes and a broadcast; a rejected request is counted, not timed.
    assert after["pushsvc_push_handling_seconds_count"] == 5
    assert after["pushsvc_push_handling_seconds_bucket{le=+Inf}"] == 5
    for t in tabs + [bad]:
        t.close()


def test_no_library_version_in_server_headers(server: PushServer) -> None:
    """Neither the HTTP port nor the WebSocket handshake names Twisted or Autobahn."""
    for path in ("/healthz", "/push.js", "/nope"):
        assert get(server, path)[2]["server"] == "pushsvc", path
    with socket.create_connection(("127.0.0.1", server.ws_port), timeout=5) as s:
        s.sendall(
            b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        response = b""
        while b"\r\n\r\n" not in response:
            response += s.recv(4096)
    assert response.startswith(b"HTTP/1.1 101")
    assert b"\r\nServer: pushsvc\r\n" in response, response
