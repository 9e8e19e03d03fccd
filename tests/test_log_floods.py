"""Peers cannot flood the log: one line per kind a minute, counted, peer text escaped."""

from __future__ import annotations

import base64
import json
import time

import jwt
from conftest import PushServer
from rawws import TEXT, RawWS, frame
from test_http import metrics
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from pushsvc.ratelog import close_reason, peer_text

SECRET = "flood-secret-0123456789abcdefghijkl"
EVIL = "x\n\x1b[31mred\u202eevil"


def refused(server: PushServer, token: str) -> tuple[int, str]:
    """Connect with ``token`` as the first frame; the close code and reason it gets."""
    with connect(f"ws://127.0.0.1:{server.ws_port}/", open_timeout=5) as ws:
        ws.send(token)
        try:
            ws.recv(timeout=5)
        except ConnectionClosed as e:
            return e.rcvd.code, e.rcvd.reason
    raise AssertionError("not closed")


def lines(server: PushServer, text: str) -> int:
    return sum(text in line for line in server.log().splitlines())


def test_peer_text_is_escaped_and_bounded() -> None:
    assert peer_text(EVIL) == "x\\x0a\\x1b[31mred\\u202eevil"
    assert peer_text("\u2028\u200b\\") == "\\u2028\\u200b\\\\"
    assert len(peer_text("y" * 10_000)) == 100
    assert len(close_reason("é" * 500).encode("utf-8")) <= 123


def test_bad_token_flood_is_counted_not_logged(start_server) -> None:
    server = start_server(env={"PUSHSVC_SECRET": SECRET})
    expired = jwt.encode({"sub": "u", "exp": int(time.time()) - 60}, SECRET)
    for _ in range(500):
        assert refused(server, "not-a-token")[0] == 4001
    for _ in range(20):
        assert refused(server, expired) == (4002, "token expired")
    m = metrics(server)
    assert m["pushsvc_rejected_total{reason=bad_token}"] == 500
    assert m["pushsvc_rejected_total{reason=expired_token}"] == 20
    assert lines(server, "authentication failed from") == 2  # one per kind


def test_a_token_header_is_escaped_in_the_log_and_close_reason(start_server) -> None:
    server = start_server(env={"PUSHSVC_SECRET": SECRET})

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    header = {"alg": "HS256", "typ": "JWT", "crit": [EVIL + "z" * 300]}
    token = f"{b64(json.dumps(header).encode())}.{b64(b'{}')}.c2ln"
    code, reason = refused(server, token)
    assert code == 4001
    assert reason.startswith("invalid token: Unsupported critical extension: x\\x0a\\x1b[31m")
    assert "\\u202eevil" in reason and reason.endswith("…")
    assert not any(c in reason for c in "\n\x1b\u202e") and len(reason) <= 100
    log = server.log()
    assert "x\\x0a\\x1b[31mred\\u202eevil" in log
    assert not any(c in log for c in "\x1b\u202e") and "x\nred" not in log
    assert "z" * 101 not in log


def test_bad_frames_are_counted_and_logged_once_a_minute(start_server) -> None:
    server = start_server("--max-client-frame=100")
    for data, code in [(b"\xff\xfe", 1007)] * 30 + [(b"y" * 200, 1009)] * 30:
        raw = RawWS(server.ws_port)
        assert raw.handshake() == 101
        raw.send(frame(TEXT, data))
        got = raw.close_code()
        assert got is not None and got[0] == code
        raw.close()
    server.wait_for(lambda s: s["pending"] == 0)
    m = metrics(server)
    assert m["pushsvc_rejected_total{reason=invalid_payload}"] == 30
    assert m["pushsvc_rejected_total{reason=message_too_big}"] == 30
    assert lines(server, "closed a WebSocket from") == 2
    assert "failing WebSocket connection" not in server.log()  # Autobahn's own line per peer
