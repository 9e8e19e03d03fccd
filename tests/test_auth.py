"""Signed tokens, auth failures and the auth timeout, with real WebSocket clients."""

from __future__ import annotations

import time

import jwt
import pytest
from conftest import PushServer
from websockets.exceptions import ConnectionClosed

SECRET = "test-secret-0123456789-abcdefghijklmnop"


def token(sub: object = "alice", secret: str = SECRET, exp_in: float = 60, **claims) -> str:
    payload = {"sub": sub, "exp": int(time.time() + exp_in), **claims}
    return jwt.encode(payload, secret, algorithm="HS256")


def closed_with(ws) -> tuple[int, str]:
    with pytest.raises(ConnectionClosed) as info:
        ws.recv(timeout=10)
    rcvd = info.value.rcvd
    assert rcvd is not None, "closed without a close frame"
    return rcvd.code, rcvd.reason


@pytest.fixture
def secured(start_server) -> PushServer:
    return start_server(env={"PUSHSVC_SECRET": SECRET})


def test_valid_token_in_first_frame(secured: PushServer) -> None:
    ws = secured.ws(token("alice"))
    secured.wait_for(lambda s: s["connections"] == 1)
    with secured.backend() as b:
        assert b.request('{"uid":"alice","data":"hi alice"}') == b"ok"
    assert ws.recv(timeout=5) == "hi alice"
    ws.close()


def test_valid_token_in_query(secured: PushServer) -> None:
    ws = secured.ws(path=f"/?token={token('bob')}")
    secured.wait_for(lambda s: s["connections"] == 1)
    with secured.backend() as b:
        assert b.request('{"uid":"bob","data":"hi bob"}') == b"ok"
    assert ws.recv(timeout=5) == "hi bob"
    ws.close()


@pytest.mark.parametrize(
    ("credential", "code", "reason"),
    [
        (lambda: token(secret="wrong-secret-wrong-secret-wrong!!"), 4001, "invalid token"),
        (lambda: token(exp_in=-60), 4002, "token expired"),
        (lambda: "alice", 4001, "invalid token"),  # a bare uid is not a token
        (lambda: jwt.encode({"sub": "alice"}, SECRET, algorithm="HS256"), 4001, "invalid token"),
        (lambda: jwt.encode({"exp": int(time.time()) + 60}, SECRET), 4001, "invalid token"),
        (lambda: token(algorithm_none=True) + "x", 4001, "invalid token"),
    ],
    ids=["bad-signature", "expired", "not-a-token", "no-exp", "no-sub", "tampered"],
)
def test_bad_tokens_are_closed_with_4xxx(secured: PushServer, credential, code, reason) -> None:
    secret_token = credential()
    ws = secured.ws(secret_token)
    got_code, got_reason = closed_with(ws)
    assert got_code == code
    assert got_reason.startswith(reason)
    log = secured.log()
    assert "authentication failed" in log
    assert secret_token not in log  # the log records the failure, never the token


def test_unsigned_alg_none_token_is_refused(secured: PushServer) -> None:
    forged = jwt.encode({"sub": "alice", "exp": int(time.time()) + 60}, None, algorithm="none")
    code, _ = closed_with(secured.ws(forged))
    assert code == 4001


def test_bad_token_in_query_is_refused(secured: PushServer) -> None:
    code, reason = closed_with(secured.ws(path="/?token=garbage"))
    assert (code, reason.split(":")[0]) == (4001, "invalid token")


def test_secret_file(start_server, tmp_path) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_text(SECRET + "\n")
    server = start_server(f"--secret-file={secret_file}")
    ws = server.ws(token("carol"))
    server.wait_for(lambda s: s["connections"] == 1)
    code, _ = closed_with(server.ws("carol"))  # the seed's bare uid no longer works
    assert code == 4001
    ws.close()
    assert "UNAUTHENTICATED" not in server.log()


def test_development_mode_warns_at_startup(server: PushServer) -> None:
    assert "UNAUTHENTICATED" in server.log()


def test_auth_timeout_closes_silent_connections(start_server) -> None:
    server = start_server("--auth-timeout=0.5")
    ws = server.ws()
    started = time.monotonic()
    code, reason = closed_with(ws)
    assert (code, reason) == (4008, "authentication timeout")
    assert 0.4 < time.monotonic() - started < 3
    server.wait_for(lambda s: s["pending"] == 0)


def test_empty_uid_is_refused(server: PushServer) -> None:
    assert closed_with(server.ws(""))[0] == 4000


def test_binary_first_frame_is_refused(server: PushServer) -> None:
    assert closed_with(server.ws(b"uid-as-bytes"))[0] == 4000


def test_oversized_client_frame_is_closed_1009(start_server) -> None:
    server = start_server("--max-client-frame=256")
    code, _ = closed_with(server.ws("u" * 1000))
    assert code == 1009
    with server.backend() as b:
        assert b.request('{"cmd":"stats"}').startswith(b"{")
