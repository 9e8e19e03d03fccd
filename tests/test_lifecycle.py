"""twistd end to end: start, serve, SIGTERM with 1001 at every client, exit."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from conftest import TWISTD, PushServer, child_env
from websockets.exceptions import ConnectionClosed

from pushsvc.listeners import endpoint

# twistd re-raises the signal that stopped it after a clean shutdown, so the
# exit status is "killed by SIGTERM" (systemd counts that as success).
STOPPED_OK = (0, -signal.SIGTERM)


def test_sigterm_closes_clients_with_1001(start_server) -> None:
    server: PushServer = start_server()
    clients = [server.ws("alice"), server.ws("alice"), server.ws("bob"), server.ws()]
    server.wait_for(lambda s: s["connections"] == 3 and s["pending"] == 1)
    with server.backend() as b:
        assert b.request('{"uid":"alice","percent":"50%"}') == b"ok"
    assert clients[0].recv(timeout=5) == "50%"
    assert server.stop(signal.SIGTERM) in STOPPED_OK
    for c in clients:
        with pytest.raises(ConnectionClosed) as info:
            while True:
                c.recv(timeout=5)
        assert info.value.rcvd is not None and info.value.rcvd.code == 1001
    assert "closing 4 WebSocket connection(s) with 1001" in server.log()


def test_sigterm_with_a_client_that_never_answers_is_bounded(start_server) -> None:
    server: PushServer = start_server("--drain-timeout=1")
    raw = socket.create_connection(("127.0.0.1", server.ws_port))
    raw.sendall(
        b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    assert b"101" in raw.recv(4096)
    started = time.monotonic()
    assert server.stop(signal.SIGTERM) in STOPPED_OK
    assert time.monotonic() - started < 8
    raw.close()


def test_daemon_mode_writes_pid_and_log(tmp_path: Path) -> None:
    """``twistd push`` without -n daemonizes with twistd's own pid and log files."""
    env = child_env()
    cmd = [
        TWISTD,
        "--pidfile=push.pid",
        "--logfile=push.log",
        "push",
        "--ws-port=tcp:0:interface=127.0.0.1",
        "--text-port=tcp:0:interface=127.0.0.1",
        "--http-port=off",
    ]
    assert subprocess.run(cmd, cwd=tmp_path, env=env, timeout=30).returncode == 0
    pidfile = tmp_path / "push.pid"
    deadline = time.monotonic() + 10
    while not pidfile.exists():
        assert time.monotonic() < deadline, "no pid file"
        time.sleep(0.05)
    pid = int(pidfile.read_text())
    try:
        while b"] backend on " not in (tmp_path / "push.log").read_bytes():
            assert time.monotonic() < deadline, "daemon did not start listening"
            time.sleep(0.05)
    finally:
        os.kill(pid, signal.SIGTERM)
    while pidfile.exists():
        assert time.monotonic() < deadline + 10, "daemon did not exit"
        time.sleep(0.05)


def test_port_numbers_and_endpoint_descriptions() -> None:
    assert endpoint("1234") == "tcp:1234:backlog=1024"
    assert endpoint("5678", "127.0.0.1") == "tcp:5678:backlog=1024:interface=127.0.0.1"
    assert endpoint("unix:/run/push.sock") == "unix:/run/push.sock"
    assert endpoint("tcp:1234:interface=0.0.0.0") == "tcp:1234:interface=0.0.0.0:backlog=1024"
    assert endpoint("tcp:1234:backlog=64") == "tcp:1234:backlog=64"
    assert endpoint("ssl:443:privateKey=k.pem") == "ssl:443:privateKey=k.pem:backlog=1024"
