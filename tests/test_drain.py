"""Graceful drain: on SIGTERM the 1001 closes are spread over --drain-window, then twistd exits."""

from __future__ import annotations

import selectors
import signal
import time
from pathlib import Path

from conftest import PushServer
from rawws import RawWS
from test_lifecycle import STOPPED_OK

from pushsvc.tap import PushOptions as Options


def test_closes_are_spread_over_the_drain_window(start_server) -> None:
    server: PushServer = start_server("--drain-window=1", "--drain-timeout=2")
    clients = [RawWS(server.ws_port) for _ in range(40)]
    for i, raw in enumerate(clients):
        assert raw.handshake() == 101
        raw.send_text(f"drain-{i}")
    server.wait_for(lambda s: s["connections"] == 40)
    sel = selectors.DefaultSelector()
    for raw in clients:
        sel.register(raw.sock, selectors.EVENT_READ, raw)
    started = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    closed_at: dict[RawWS, float] = {}
    while len(closed_at) < len(clients) and time.monotonic() - started < 10:
        for key, _ in sel.select(timeout=0.1):
            raw = key.data
            assert raw.close_code() == (1001, "server shutting down")  # and answers it
            closed_at[raw] = time.monotonic() - started
            sel.unregister(raw.sock)
    times = sorted(closed_at.values())
    assert len(times) == 40
    assert times[-1] < 1 + 0.8, times  # all within the window (and some slack)
    assert times[-1] - times[0] > 0.5, times  # spread out, not all at once
    assert sum(t < 0.5 for t in times) < 35, times  # roughly even
    assert server.proc.wait(5) in STOPPED_OK
    assert "closing 40 WebSocket connection(s) with 1001 over 1.0 s" in server.log()
    for raw in clients:
        raw.close()


def test_drain_is_bounded_by_window_plus_timeout(start_server) -> None:
    server: PushServer = start_server("--drain-window=0.5", "--drain-timeout=1")
    silent = RawWS(server.ws_port)  # gets its 1001 but never answers it
    assert silent.handshake() == 101
    silent.send_text("never-answers")
    server.wait_for(lambda s: s["connections"] == 1)
    started = time.monotonic()
    assert server.stop(signal.SIGTERM) in STOPPED_OK
    assert time.monotonic() - started < 0.5 + 1 + 2.5
    silent.close()


def test_systemd_stop_timeout_covers_window_and_timeout() -> None:
    unit = Path(__file__).resolve().parent.parent / "contrib/systemd/pushsvc.service"
    stop = next(
        int(line.split("=", 1)[1])
        for line in unit.read_text().splitlines()
        if line.startswith("TimeoutStopSec=")
    )
    config = Options()
    config.parseOptions([])
    assert stop > config["drain-window"] + config["drain-timeout"] + 2
