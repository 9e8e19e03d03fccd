"""Connection limits (total, per IP, per uid) and the client frame rate, end to end."""

from __future__ import annotations

import time

import pytest
from conftest import PushServer
from test_auth import closed_with
from test_slow_consumer import metric
from twisted.python import usage
from websockets.exceptions import InvalidStatus

from pushsvc.tap import PushOptions as Options


def refused_status(server: PushServer, **kw) -> int:
    with pytest.raises(InvalidStatus) as info:
        server.ws(**kw)
    return info.value.response.status_code


def test_total_connections_over_the_limit_get_503(start_server) -> None:
    server = start_server("--max-connections=3")
    clients = [server.ws(f"total-{i}") for i in range(3)]
    server.wait_for(lambda s: s["connections"] == 3)
    assert refused_status(server) == 503
    clients.pop().close()
    server.wait_for(lambda s: s["connections"] == 2)
    clients.append(server.ws("total-again"))
    server.wait_for(lambda s: s["connections"] == 3)
    assert metric(server, 'pushsvc_handshake_refusals_total{status="503"}') == 1
    assert server.log().count("refused a WebSocket handshake") == 1
    for c in clients:
        c.close()


def test_per_ip_limit_gets_429(start_server) -> None:
    server = start_server("--max-per-ip=2")
    clients = [server.ws("ip-a"), server.ws("ip-b")]
    server.wait_for(lambda s: s["connections"] == 2)
    for _ in range(5):
        assert refused_status(server) == 429
    # One line in the log for the lot, every refusal in /metrics.
    assert server.log().count("refused a WebSocket handshake") == 1
    assert metric(server, 'pushsvc_handshake_refusals_total{status="429"}') == 5
    clients.pop().close()
    server.wait_for(lambda s: s["connections"] == 1)
    clients.append(server.ws("ip-c"))  # the slot was released
    server.wait_for(lambda s: s["connections"] == 2)
    for c in clients:
        c.close()


def test_x_forwarded_for_counts_only_when_trusted(start_server) -> None:
    def via(ip: str, spoofed: str = "6.6.6.6") -> dict:
        # What one proxy forwards: whatever the client claimed, then the address it saw.
        return {"additional_headers": {"X-Forwarded-For": f"{spoofed}, {ip}"}}

    trusting = start_server("--max-per-ip=1", "--trust-x-forwarded-for=1")
    # One proxy is trusted: the client IP is the last entry, the one it appended.
    clients = [trusting.ws("xff-1", **via("10.0.0.1"))]
    clients.append(trusting.ws("xff-2", **via("10.0.0.2")))  # another IP: its own slot
    trusting.wait_for(lambda s: s["connections"] == 2)
    assert refused_status(trusting, **via("10.0.0.1", spoofed="7.7.7.7")) == 429

    ignoring = start_server("--max-per-ip=1")  # the header is ignored: all are 127.0.0.1
    clients.append(ignoring.ws("xff-3", **via("10.0.0.3")))
    ignoring.wait_for(lambda s: s["connections"] == 1)
    assert refused_status(ignoring, **via("10.0.0.4")) == 429
    for c in clients:
        c.close()


def test_per_uid_limit_closes_4029_after_auth(start_server) -> None:
    server = start_server("--max-per-uid=2")
    first, second = server.ws("many"), server.ws("many")
    other = server.ws("other-uid")
    server.wait_for(lambda s: s["connections"] == 3)
    assert closed_with(server.ws("many")) == (4029, "too many connections")
    with server.backend() as b:
        assert b.json('{"id":1,"uid":"many","data":"x"}')["delivered"] == 2
    assert metric(server, 'pushsvc_forced_disconnects_total{reason="too_many_connections"}') == 1
    for c in (first, second, other):
        c.close()


def test_client_frame_rate_limit_closes_1008(start_server) -> None:
    server = start_server("--client-rate=5", "--client-burst=5")
    calm = server.ws("calm")
    flood = server.ws("flood")
    server.wait_for(lambda s: s["connections"] == 2)
    for i in range(20):
        flood.send(f"frame {i}")
    assert closed_with(flood) == (1008, "rate limit exceeded")
    for i in range(6):  # 4 a second: under the rate
        calm.send(f"hello {i}")
        time.sleep(0.25)
    with server.backend() as b:
        assert b.request('{"uid":"calm","data":"still open"}') == b"ok"
    assert calm.recv(timeout=5) == "still open"
    assert metric(server, 'pushsvc_forced_disconnects_total{reason="rate_limit"}') == 1
    calm.close()


@pytest.mark.parametrize(
    "args",
    [
        ["--max-queue=-1"],
        ["--max-per-ip=-2"],
        ["--client-rate=-1"],
        ["--allowed-origins=not-an-origin"],
        ["--allowed-origins=https://*"],
        ["--allowed-origins=https://a.*.example.com"],
        ["--backend-secret-file=/nonexistent/secret"],
    ],
)
def test_bad_limit_options_are_refused(args: list[str]) -> None:
    with pytest.raises(usage.UsageError):
        Options().parseOptions(args)


def test_limit_defaults() -> None:
    config = Options()
    config.parseOptions([])
    assert config["max-queue"] == 1 << 20
    assert (config["max-connections"], config["max-per-uid"], config["max-per-ip"]) == (0, 0, 0)
    assert (config["client-rate"], config["client-burst"]) == (10.0, 20)
    assert config["origins"].everyone
    assert config["drain-window"] == 2.0
