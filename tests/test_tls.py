"""wss:// served by pushsvc itself through a Twisted ssl: endpoint and a self-signed certificate."""

from __future__ import annotations

import datetime
import ipaddress
import json
import ssl
from pathlib import Path

import pytest
from conftest import PushServer
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from websockets.sync.client import connect


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A key and a certificate for 127.0.0.1, valid for a day."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_path, cert_path = directory / "key.pem", directory / "cert.pem"
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


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
