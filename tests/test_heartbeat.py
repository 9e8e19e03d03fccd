"""Heartbeats: a client that stops answering pings is dropped and its uid goes offline."""

from __future__ import annotations

import time

from conftest import PushServer
from rawws import RawWS
from test_slow_consumer import metric


def online(server: PushServer, uid: str) -> bool:
    with server.backend() as b:
        return b.json(f'{{"cmd":"online","uid":"{uid}"}}')["online"][uid]


def test_client_that_stops_answering_pings_is_dropped(start_server) -> None:
    # Autobahn's timers round down to whole seconds: a 2 s timeout waits 1 to 2 s.
    server = start_server("--ping-interval=1", "--ping-timeout=2")
    dead = RawWS(server.ws_port)  # completes the handshake, then never reads or answers
    assert dead.handshake() == 101
    started = time.monotonic()
    dead.send_text("hb-dead")
    alive = server.ws("hb-alive")  # the websockets client answers pings by itself
    server.wait_for(lambda s: s["connections"] == 2)
    while online(server, "hb-dead"):
        # interval + timeout is at most 3 s; allow for a loaded machine
        assert time.monotonic() - started < 5, "not dropped within the heartbeat bound"
        time.sleep(0.05)
    assert time.monotonic() - started > 0.5  # not before a ping went unanswered
    time.sleep(2)  # more ping rounds: the healthy client stays
    assert online(server, "hb-alive")
    with server.backend() as b:
        assert b.request('{"uid":"hb-alive","data":"still here"}') == b"ok"
    assert alive.recv(timeout=5) == "still here"
    assert metric(server, 'pushsvc_forced_disconnects_total{reason="ping_timeout"}') == 1
    log = server.log()
    assert "WebSocket ping timeout" in log and "dropped a WebSocket (tcp4:127.0.0.1:" in log
    assert "dropping connection" not in log  # Autobahn's per-connection warning
    server.wait_for(lambda s: s["connections"] == 1)
    alive.close()
    dead.close()
