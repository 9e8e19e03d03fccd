"""Nothing before authentication exhausts pushsvc (issue 11, the WebSocket side).

Attackers connect from 127.0.0.2 (and other clients from 127.0.0.3) to the
server's 127.0.0.1 ports, so per-address limits can be seen on one machine.
"""

from __future__ import annotations

import http.client
import socket
import time
import urllib.request

import pytest
from conftest import PushServer, new_uid, until
from test_slow_consumer import metric
from websockets.exceptions import ConnectionClosed, InvalidMessage, InvalidStatus
from websockets.sync.client import ClientConnection, connect

ATTACKER, OTHER = "127.0.0.2", "127.0.0.3"
UPGRADE = (
    b"GET %s HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
)


def raw(port: int, source: str = ATTACKER) -> socket.socket:
    s = socket.socket()
    s.bind((source, 0))
    s.settimeout(10)
    s.connect(("127.0.0.1", port))
    return s


def rss_kib(server: PushServer) -> int:
    with open(f"/proc/{server.proc.pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def closed_after(s: socket.socket, timeout: float) -> tuple[bytes, float]:
    """What the server wrote until it closed ``s``, and how long that took."""
    start = time.monotonic()
    s.settimeout(timeout)
    data = b""
    try:
        while chunk := s.recv(4096):
            data += chunk
    except ConnectionResetError:
        pass
    return data, time.monotonic() - start


def client_from(url: str, source: str, uid: str) -> ClientConnection:
    """A real WebSocket client whose socket comes from ``source``, identified as ``uid``."""
    host_port = url.split("/")[2]
    s = raw(int(host_port.rsplit(":", 1)[1]), source)
    conn = connect(url, sock=s, open_timeout=5)
    conn.send(uid)
    return conn


def served(server: PushServer, url: str, source: str = OTHER) -> None:
    """A client from ``source`` connects through ``url`` and gets a push."""
    uid = new_uid("legit")
    with client_from(url, source, uid) as c:
        server.push_until_delivered(uid, "hello")
        assert c.recv(timeout=5) == "hello"


def test_header_bomb_is_closed_with_431_and_memory_stays_bounded(start_server) -> None:
    server = start_server()
    before = rss_kib(server)
    chunk = b"X-Filler: " + b"a" * 1000 + b"\r\n"
    sockets = [raw(server.ws_port) for _ in range(50)]
    for s in sockets:
        s.sendall(b"GET / HTTP/1.1\r\n")
    deadline = time.monotonic() + 5
    open_ = set(sockets)
    while open_ and time.monotonic() < deadline:  # keep sending headers until each is closed
        for s in list(open_):
            try:
                s.sendall(chunk)
            except OSError:
                open_.discard(s)
    assert not open_, f"{len(open_)} sockets still open after sending headers for 5 s"
    for s in sockets:
        data, _ = closed_after(s, 5)
        assert data.startswith(b"HTTP/1.1 431"), data[:80]
        s.close()
    grown = rss_kib(server) - before
    assert grown < 20 * 1024, f"RSS grew by {grown} KiB"
    assert metric(server, 'pushsvc_rejected_total{reason="handshake_too_large"}') == 50
    served(server, server.ws_url)


@pytest.mark.parametrize("where", ["ws-port", "/ws"])
def test_slow_and_silent_handshakes_are_closed_at_the_deadline(start_server, where) -> None:
    server = start_server("--handshake-timeout=0.5")
    port = server.ws_port if where == "ws-port" else server.http_port
    silent, trickling = raw(port), raw(port)
    trickling.sendall(UPGRADE % b"/ws")
    start = time.monotonic()
    while time.monotonic() - start < 3:  # one header line every 0.1 s, for at most 3 s
        try:
            trickling.sendall(b"X-Slow: 1\r\n")
        except OSError:
            break
        time.sleep(0.1)
    took = time.monotonic() - start
    assert took < 2, f"a trickling handshake lived {took:.1f} s"
    data, waited = closed_after(silent, 3)
    assert waited < 2 and data.startswith(b"HTTP/1.1 408"), (waited, data[:80])
    assert metric(server, 'pushsvc_rejected_total{reason="handshake_timeout"}') == 2
    served(server, server.ws_url if where == "ws-port" else f"ws://127.0.0.1:{port}/ws")


def test_one_address_at_its_cap_does_not_affect_others(start_server) -> None:
    server = start_server("--max-per-ip=3", "--max-connections=20")
    held = [raw(port) for port in (server.ws_port, server.http_port) for _ in range(30)]
    until(
        lambda: metric(server, 'pushsvc_rejected_total{reason="too_many_from_ip"}') >= 27,
        what="half-open sockets over the per-IP cap refused",
    )
    # Refused: 429, or closed unanswered while RefusedSocket.LINGER_MAX refused sockets wait.
    # Closed unanswered shows as InvalidMessage, or as a closed connection when the
    # close beats the client's read (seen on a loaded machine).
    with pytest.raises((InvalidStatus, InvalidMessage, ConnectionClosed, OSError)) as refused:
        client_from(server.ws_url, ATTACKER, "attacker")
    if isinstance(refused.value, InvalidStatus):
        assert refused.value.response.status_code == 429
    served(server, server.ws_url)
    served(server, f"ws://127.0.0.1:{server.http_port}/ws")
    for s in held:
        s.close()


def test_backend_and_healthz_answer_when_websocket_descriptors_run_out(start_server) -> None:
    server = start_server(nofile=256)  # --max-connections defaults to 256 - 100
    held = []
    for _ in range(300):
        s = raw(server.ws_port)
        s.sendall(b"GET / HTTP/1.1\r\n")  # and never more
        held.append(s)
    until(
        lambda: metric(server, 'pushsvc_rejected_total{reason="too_many_connections"}') >= 144,
        what="sockets over the total cap refused",
    )
    with server.backend() as b:
        assert b.request('{"uid":"nobody","data":"x"}') == b"fail"  # answered: nobody is there
    with urllib.request.urlopen(server.http_url + "/healthz", timeout=5) as r:
        assert r.status == 200
    log = server.log()
    assert "EMFILE" not in log and "Too many open files" not in log
    for s in held:
        s.close()


def test_a_flood_of_bad_handshakes_writes_a_bounded_log(start_server) -> None:
    server = start_server("--handshake-timeout=0.3", "--max-handshake=1024")
    before = len(server.log())
    silent = [raw(server.ws_port) for _ in range(100)]
    for _ in range(100):
        with raw(server.ws_port) as s:
            s.sendall(b"GET / HTTP/1.1\r\n" + b"X: " + b"a" * 2000)
            closed_after(s, 5)
    for s in silent:
        closed_after(s, 5)
        s.close()
    added = server.log()[before:]
    assert added.count("refused a WebSocket handshake") == 2, added  # one line per kind
    assert len(added.splitlines()) <= 4, added


def test_an_http_request_that_is_not_ws_stops_counting(start_server) -> None:
    """A keep-alive /healthz connection does not hold its address's only WebSocket slot."""
    server = start_server("--max-per-ip=1")
    api = http.client.HTTPConnection(
        "127.0.0.1", server.http_port, timeout=5, source_address=(ATTACKER, 0)
    )
    api.request("GET", "/healthz")
    assert api.getresponse().read() and api.sock is not None  # still open: keep-alive
    uid = new_uid("after-api")
    with client_from(f"ws://127.0.0.1:{server.http_port}/ws", ATTACKER, uid) as c:
        server.push_until_delivered(uid, "counted once")
        assert c.recv(timeout=5) == "counted once"
    api.close()
