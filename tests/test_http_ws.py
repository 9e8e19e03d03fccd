"""The HTTP port's browser side without a browser: /ws, the static files, the demo backend."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from conftest import ROOT, PushServer, child_env
from test_auth import SECRET, token
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from pushsvc.auth import make_authenticator
from pushsvc.broker.memory import MemoryBroker
from pushsvc.browser import FactoryService
from pushsvc.history.store import MemoryStore
from pushsvc.node import Node
from pushsvc.websocket import PushServerFactory


def http_ws(server: PushServer, uid: str | None = None, query: str = "") -> ClientConnection:
    """A WebSocket to /ws on the HTTP port."""
    conn = connect(f"ws://127.0.0.1:{server.http_port}/ws{query}", open_timeout=5)
    if uid is not None:
        conn.send(uid)
    return conn


def close_code(conn: ClientConnection, timeout: float = 5.0) -> int | None:
    with pytest.raises(ConnectionClosed) as info:
        while True:
            conn.recv(timeout=timeout)
    return info.value.rcvd.code if info.value.rcvd else None


def get(server: PushServer, path: str, headers: dict[str, str] | None = None):
    req = urllib.request.Request(server.http_url + path, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read(), resp.headers
    except urllib.error.HTTPError as e:
        return e.code, e.read(), e.headers


@pytest.mark.parametrize(
    "path, media_type, marker",
    [
        ("/push.js", "text/javascript", b"globalThis"),
        ("/push.mjs", "text/javascript", b"export const PushClient"),
        ("/demo", "text/html", b"<title>pushsvc demo</title>"),
        ("/demo?uid=uid7", "text/html", b"push.js"),
    ],
)
def test_static_files(server: PushServer, path: str, media_type: str, marker: bytes) -> None:
    status, body, headers = get(server, path)
    assert status == 200 and marker in body
    assert headers["content-type"].startswith(media_type)
    assert headers["cache-control"] == "no-cache"
    status, body, _ = get(server, path, {"If-None-Match": headers["etag"]})
    assert status == 304 and body == b""


def test_no_pages_below_the_files(server: PushServer) -> None:
    """``/demo/`` would break the page's relative links: a 404, not the page."""
    assert get(server, "/demo/")[0] == 404
    assert get(server, "/push.js/x")[0] == 404


def test_ws_on_the_http_port_shares_the_node(server: PushServer) -> None:
    on_http = http_ws(server, "hws-1")
    on_ws_port = server.ws("hws-1")
    server.wait_for(lambda s: s["connections"] >= 2)
    with server.backend() as b:
        assert b.json('{"id":1,"uid":"hws-1","data":"both"}')["delivered"] == 2
    assert on_http.recv(timeout=5) == "both"
    assert on_ws_port.recv(timeout=5) == "both"
    on_http.close()
    on_ws_port.close()


def test_token_in_query_on_the_http_port(start_server) -> None:
    server = start_server(env={"PUSHSVC_SECRET": SECRET})
    conn = http_ws(server, query=f"?token={token('carol')}")
    server.wait_for(lambda s: s["connections"] == 1)
    with server.backend() as b:
        assert b.request('{"uid":"carol","data":"hi"}') == b"ok"
    assert conn.recv(timeout=5) == "hi"
    bad = http_ws(server, token("carol", secret="wrong-secret-0123456789-abcdefghij"))
    assert close_code(bad) == 4001
    conn.close()


def test_auth_timeout_over_ws_on_the_http_port(start_server) -> None:
    server = start_server("--auth-timeout=0.5")
    started = time.monotonic()
    silent = http_ws(server)
    assert close_code(silent) == 4008
    assert time.monotonic() - started < 4


def test_sigterm_closes_ws_on_the_http_port_with_1001(start_server) -> None:
    server = start_server()
    conn = http_ws(server, "hws-stop")
    server.wait_for(lambda s: s["connections"] == 1)
    assert server.stop(signal.SIGTERM) in (0, -signal.SIGTERM)
    assert close_code(conn) == 1001


def test_http_port_off_keeps_the_ws_port(start_server) -> None:
    server = start_server("--http-port=off")
    conn = server.ws("hws-off")
    server.wait_for(lambda s: s["connections"] == 1)
    conn.close()


def test_factory_service_runs_the_sweeper_with_or_without_a_port() -> None:
    """WebSocketResource never starts its factory; FactoryService does, counting like a port."""
    factory = PushServerFactory(
        Node(MemoryBroker(), MemoryStore()), make_authenticator(None), auth_timeout=1
    )
    service = FactoryService(factory)
    service.startService()
    assert factory._sweeper.running
    factory.doStart()  # the --ws-port listener
    factory.doStop()  # ...stops first
    assert factory._sweeper.running
    service.stopService()
    assert not factory._sweeper.running


def run_demo(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pushsvc.demo", *args],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
        env=child_env(),
    )


def test_demo_script_pushes_every_step(server: PushServer) -> None:
    conn = server.ws("demo-py")
    server.wait_for(lambda s: s["connections"] >= 1)
    port = str(server.text_port)
    proc = run_demo("--uid", "demo-py", "--port", port, "--delay", "0", "--step", "25")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["0%", "ok", "25%", "ok", "50%", "ok", "75%", "ok", "100%", "ok"]
    assert [conn.recv(timeout=5) for _ in range(5)] == ["0%", "25%", "50%", "75%", "100%"]
    proc = run_demo("--uid", "demo-py", "--port", port, "--delay", "0", "--step", "50", "--json")
    assert [conn.recv(timeout=5) for _ in range(3)] == [f'{{"percent":{p}}}' for p in (0, 50, 100)]
    conn.close()


def test_pushsvc_demo_subcommand(server: PushServer) -> None:
    conn = server.ws("demo-cli")
    server.wait_for(lambda s: s["connections"] >= 1)
    proc = subprocess.run(
        [sys.executable, "-m", "pushsvc.cli", "--port", str(server.text_port), "demo"]
        + ["--uid", "demo-cli", "--delay", "0", "--step", "50"],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
        env=child_env(),
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["0%", "ok", "50%", "ok", "100%", "ok"]
    assert [conn.recv(timeout=5) for _ in range(3)] == ["0%", "50%", "100%"]
    conn.close()


def unused_port() -> int:
    """A port nothing listens on (bound, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_demo_script_exit_codes(server: PushServer) -> None:
    proc = run_demo("--uid", "nobody-here", "--port", str(server.text_port), "--delay", "0")
    assert proc.returncode == 1 and "fail" in proc.stdout
    assert "is 'nobody-here' connected" in proc.stderr
    assert run_demo("--port", str(unused_port())).returncode == 2
