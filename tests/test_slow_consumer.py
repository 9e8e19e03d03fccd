"""Slow consumers: a peer that stops reading is closed (4010) before it costs unbounded memory."""

from __future__ import annotations

import json
import threading
import time
import urllib.request

from conftest import PushServer
from rawws import RawWS

MB = 1 << 20


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def metric(server: PushServer, sample: str) -> float:
    """The value of one sample (name with labels) on /metrics; 0 if absent."""
    with urllib.request.urlopen(server.http_url + "/metrics", timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(sample + " "):
                return float(line.split()[-1])
    return 0.0


def never_reading(server: PushServer, uid: str) -> RawWS:
    """A client that authenticates and then never reads (small receive buffer)."""
    raw = RawWS(server.ws_port, rcvbuf=4096)
    assert raw.handshake() == 101
    raw.send_text(uid)
    return raw


class Reader(threading.Thread):
    """A healthy client reading everything pushed to it."""

    def __init__(self, server: PushServer, uid: str) -> None:
        super().__init__(daemon=True)
        self.ws = server.ws(uid)
        self.received: list[str] = []

    def run(self) -> None:
        try:
            for message in self.ws:
                self.received.append(message)
        except Exception:
            pass


def test_non_reading_client_is_dropped_and_memory_stays_bounded(start_server) -> None:
    server = start_server("--max-line=2000000")
    slow = never_reading(server, "slow")
    healthy = Reader(server, "healthy")
    healthy.start()
    server.wait_for(lambda s: s["connections"] == 2)
    baseline = peak = rss_mb(server.proc.pid)
    chunk = "x" * MB
    replies = []
    with server.backend() as b:
        for i in range(100):  # 100 MB for the client that does not read
            replies.append(b.request(json.dumps({"uid": "slow", "data": f"{i}:{chunk}"})))
            assert b.request(json.dumps({"uid": "healthy", "data": str(i)})) == b"ok"
            peak = max(peak, rss_mb(server.proc.pid))
        # The slow client was detached as soon as it was over the limit.
        assert b.json('{"cmd":"online","uid":"slow"}')["online"] == {"slow": False}
    delivered = replies.count(b"ok")
    assert replies == [b"ok"] * delivered + [b"fail"] * (100 - delivered), replies
    assert 0 < delivered < 20  # 1 MiB queue + socket buffers, not 100 MB
    # Unbounded, the service grows by more than 100 MB here; bounded, by a few.
    assert peak - baseline < 50, (baseline, peak)
    deadline = time.monotonic() + 10
    while len(healthy.received) < 100 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert healthy.received == [str(i) for i in range(100)]
    assert metric(server, 'pushsvc_forced_disconnects_total{reason="slow_consumer"}') == 1
    # The connection itself is gone within the close handshake timeout (2 s).
    assert slow.wait_eof(10) < 10
    server.wait_for(lambda s: s["connections"] == 1)
    healthy.ws.close()
    slow.close()


def test_slow_consumer_that_catches_up_sees_4010(start_server) -> None:
    server = start_server("--max-queue=65536")
    raw = never_reading(server, "lagging")
    server.wait_for(lambda s: s["connections"] == 1)
    chunk = "y" * 16384
    with server.backend() as b:
        for _ in range(2000):  # stop as soon as the service gives up on it
            if b.request(json.dumps({"uid": "lagging", "data": chunk})) == b"fail":
                break
        else:
            raise AssertionError("never detached")
    # Now read everything: the pushes that were queued, then the close frame.
    assert raw.close_code() == (4010, "slow consumer")
    raw.close()
