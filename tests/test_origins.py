"""--allowed-origins: browsers from other sites are refused with 403 at the handshake."""

from __future__ import annotations

import pytest
from conftest import PushServer
from test_limits import refused_status
from test_slow_consumer import metric

from pushsvc.policy import OriginPolicy

ALLOWED = "https://app.example.com,https://*.example.org:8443,http://localhost:3000"


@pytest.fixture(scope="module")
def strict(tmp_path_factory: pytest.TempPathFactory):
    s = PushServer(tmp_path_factory.mktemp("origins"), f"--allowed-origins={ALLOWED}")
    yield s
    s.stop()


@pytest.mark.parametrize(
    "origin",
    [
        "https://app.example.com",
        "HTTPS://APP.EXAMPLE.COM",
        "https://app.example.com:443",
        "https://a.example.org:8443",
        "https://a.b.example.org:8443",
        "http://localhost:3000",
        None,  # no Origin header: not a browser (see docs/security.md)
    ],
)
def test_allowed_origins_connect(strict: PushServer, origin: str | None) -> None:
    ws = strict.ws("origin-ok", origin=origin)
    with strict.backend() as b:
        assert b.request('{"uid":"origin-ok","data":"hi"}') == b"ok"
    assert ws.recv(timeout=5) == "hi"
    ws.close()


@pytest.mark.parametrize(
    "origin",
    [
        "https://evil.example.net",
        "http://app.example.com",  # another scheme
        "https://app.example.com:8443",  # another port
        "https://app.example.com.evil.net",
        "https://example.org:8443",  # the wildcard needs a subdomain
        "https://a.example.org",  # the pattern's port is 8443
        "https://evilexample.org:8443",
        "http://localhost:3001",
        "null",
    ],
)
def test_other_origins_get_403(strict: PushServer, origin: str) -> None:
    assert refused_status(strict, origin=origin) == 403


def test_refusals_are_counted(strict: PushServer) -> None:
    assert refused_status(strict, origin="https://counted.example.net") == 403
    assert metric(strict, 'pushsvc_handshake_refusals_total{status="403"}') >= 1


def test_default_allows_every_origin(server: PushServer) -> None:
    for origin in ("https://anything.example.net", "null"):
        ws = server.ws("origin-any", origin=origin)
        ws.close()


def test_policy_parsing() -> None:
    policy = OriginPolicy.parse(" https://a.com , null ")
    assert policy.allows("https://a.com") and policy.allows("null")
    assert not policy.allows("https://b.com")
    assert not policy.allows("https://a.com/path")
    assert not policy.allows("garbage")
    assert OriginPolicy.parse("").everyone and OriginPolicy.parse("*").everyone
