"""wss:// served by pushsvc itself through a Twisted ssl: endpoint and a self-signed certificate."""

from __future__ import annotations

import json
import ssl
from pathlib import Path

import pytest
from certificate import self_signed
from conftest import PushServer
from websockets.sync.client import connect


@pytest.fixture
def tls_server(start_server, tmp_path: Path) -> tuple[PushServer, ssl.SSLContext]:
    key, cert = self_signed(tmp_path)
    server = start_server(
        f"--ws-port=ssl:0:privateKey={key}:certKey={cert}:interface=127.0.0.1",
        "--max-queue=65536",
        "--max-line=1000000",
    )
    return server, ssl.create_default_context(cafile=str(cert))


def test_wss_push(tls_server) -> None:
    server, context = tls_server
    ws = connect(f"wss://127.0.0.1:{server.ws_port}/", ssl=context, open_timeout=5)
    ws.send("tls-user")
    server.wait_for(lambda s: s["connections"] == 1)
    with server.backend() as b:
        assert b.request('{"uid":"tls-user","data":"over TLS"}') == b"ok"
    assert ws.recv(timeout=5) == "over TLS"
    ws.close()


def test_wss_refuses_an_untrusted_client_view(tls_server) -> None:
    """A client that does not trust the certificate does not get through (no silent fallback)."""
    server, _ = tls_server
    with pytest.raises(ssl.SSLCertVerificationError):
        connect(f"wss://127.0.0.1:{server.ws_port}/", ssl=ssl.create_default_context())


def test_slow_consumer_limit_applies_under_tls(tls_server) -> None:
    """The send-queue guard sits on the TLS transport too."""
    server, context = tls_server
    ws = connect(
        f"wss://127.0.0.1:{server.ws_port}/",
        ssl=context,
        open_timeout=5,
        close_timeout=1,  # its close frame sits behind what it never read
        max_queue=1,
    )
    ws.send("tls-slow")
    server.wait_for(lambda s: s["connections"] == 1)
    line = json.dumps({"uid": "tls-slow", "data": "z" * 100_000})
    with server.backend() as b:
        for _ in range(500):
            if b.request(line) == b"fail":
                break
        else:
            raise AssertionError("the non-reading TLS client was never detached")
    server.wait_for(lambda s: s["connections"] == 0, timeout=10)
    ws.close()
