"""SIGHUP reloads secrets and origins without dropping a connection; it never kills."""

from __future__ import annotations

import signal
import time

import jwt
from conftest import until
from websockets.exceptions import ConnectionClosed

A = "sighup-secret-A-0123456789abcdefghijkl"
B = "sighup-secret-B-0123456789abcdefghijkl"


def token(uid: str, key: str) -> str:
    return jwt.encode({"sub": uid, "exp": int(time.time()) + 60}, key)


def reloaded(server, count: int) -> None:
    until(lambda: server.log().count("SIGHUP: ") >= count, what="SIGHUP logged")


def test_sighup_rotates_the_jwt_secret_without_dropping(start_server, tmp_path, ws_clients) -> None:
    secret = tmp_path / "secret"
    secret.write_text(A + "\n")
    server = start_server(f"--secret-file={secret}")
    first = server.ws(token("rot-1", A))
    ws_clients.append(first)
    server.wait_for(lambda s: s["connections"] == 1)
    secret.write_text(f"{B}\n{A}\n")
    server.proc.send_signal(signal.SIGHUP)
    reloaded(server, 1)
    assert "SIGHUP: settings reloaded; JWT secret: 2 keys" in server.log()
    assert A not in server.log() and B not in server.log()
    ws_clients += [server.ws(token("rot-2", B)), server.ws(token("rot-3", A))]
    server.wait_for(lambda s: s["connections"] == 3)
    with server.backend() as b:
        assert b.request('{"uid":"rot-1","data":"still here"}') == b"ok"
    assert first.recv(timeout=5) == "still here"
    # A bad file: the old settings stay, and the log says why.
    secret.write_text("short\n")
    server.proc.send_signal(signal.SIGHUP)
    reloaded(server, 2)
    assert "SIGHUP: reload failed, keeping the previous settings" in server.log()
    assert "must be at least 32 bytes" in server.log()
    ws_clients.append(server.ws(token("rot-4", B)))
    server.wait_for(lambda s: s["connections"] == 4)


def test_sighup_without_secrets_drops_nothing(start_server, ws_clients) -> None:
    server = start_server()
    ws_clients.append(server.ws("hup-1"))
    server.wait_for(lambda s: s["connections"] == 1)
    for n in (1, 2):
        server.proc.send_signal(signal.SIGHUP)
        reloaded(server, n)
    assert server.proc.poll() is None
    assert "SIGHUP: settings reloaded; nothing changed" in server.log()
    with server.backend() as b:
        assert b.request('{"uid":"hup-1","data":"alive"}') == b"ok"
    try:
        assert ws_clients[0].recv(timeout=5) == "alive"
    except ConnectionClosed as e:
        raise AssertionError(f"dropped by SIGHUP: {e}") from None
