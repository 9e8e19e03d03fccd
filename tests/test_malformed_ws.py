"""Malformed WebSocket input against a real server, over raw sockets.

Each bad input is refused cleanly (a close frame with the right code, or an
HTTP error at the handshake) while a healthy client keeps receiving pushes
throughout; the last test checks that it missed nothing.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest
from conftest import PushServer
from rawws import BINARY, CLOSE, CONTINUATION, PING, TEXT, RawWS, frame, request

MAX_FRAME = 256


class Pusher(threading.Thread):
    """Pushes a sequence number to the healthy client every 20 ms; a reader collects them."""

    def __init__(self, server: PushServer) -> None:
        super().__init__(daemon=True)
        self.server = server
        self.ws = server.ws("fuzz-healthy")
        server.wait_for(lambda s: s["connections"] >= 1)
        self.stop = threading.Event()
        self.sent: list[str] = []
        self.replies: list[bytes] = []
        self.received: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        try:
            for message in self.ws:
                self.received.append(message)
        except Exception:
            pass

    def run(self) -> None:
        with self.server.backend() as b:
            i = 0
            while not self.stop.is_set():
                self.sent.append(str(i))
                self.replies.append(b.request(f'{{"uid":"fuzz-healthy","data":"{i}"}}'))
                i += 1
                time.sleep(0.02)


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[PushServer, Pusher]]:
    server = PushServer(
        tmp_path_factory.mktemp("malformed"),
        f"--max-client-frame={MAX_FRAME}",
        "--auth-timeout=1",
        "--client-rate=0",
    )
    pusher = Pusher(server)
    pusher.start()
    yield server, pusher
    pusher.stop.set()
    pusher.ws.close()
    server.stop()


def opened(server: PushServer, uid: str | None = None) -> RawWS:
    raw = RawWS(server.ws_port)
    assert raw.handshake() == 101
    if uid is not None:
        raw.send_text(uid)
    return raw


BAD_FRAMES = [
    ("unmasked", frame(TEXT, b"hello", mask=False), 1002),
    ("rsv1", frame(TEXT, b"hello", rsv=0x40), 1002),
    ("rsv2-rsv3", frame(BINARY, b"hello", rsv=0x30), 1002),
    ("opcode-3", frame(0x3, b"hello"), 1002),
    ("opcode-0xB", frame(0xB, b""), 1002),
    ("continuation-first", frame(CONTINUATION, b"hello"), 1002),
    ("fragmented-ping", frame(PING, b"x", fin=False), 1002),
    ("long-ping", frame(PING, b"x" * 126), 1002),
    ("bad-utf8", frame(TEXT, b"\xff\xfe\xfd"), 1007),
    ("truncated-utf8", frame(TEXT, b"caf\xc3"), 1007),
    ("oversize", frame(TEXT, b"x" * (MAX_FRAME + 1)), 1009),
    ("huge-length-claim", frame(BINARY, b"", length=1 << 40), 1009),
    (
        "oversize-in-fragments",
        frame(TEXT, b"x" * 200, fin=False) + frame(CONTINUATION, b"x" * 200),
        1009,
    ),
    # A bad close frame is still the client's close: Autobahn answers 1002/1007
    # and drops the TCP connection at once, so the answer may not arrive.
    ("bad-close-code", frame(CLOSE, (999).to_bytes(2, "big")), None),
    ("close-bad-utf8-reason", frame(CLOSE, (1000).to_bytes(2, "big") + b"\xff"), None),
]


@pytest.mark.parametrize(
    ("data", "code"), [b[1:] for b in BAD_FRAMES], ids=[b[0] for b in BAD_FRAMES]
)
@pytest.mark.parametrize("authenticated", [False, True], ids=["before-auth", "after-auth"])
def test_bad_frame_is_closed_with_code(
    fuzzed, data: bytes, code: int | None, authenticated: bool
) -> None:
    server, _ = fuzzed
    raw = opened(server, "fuzz-bad" if authenticated else None)
    raw.send(data)
    got = raw.close_code()
    if code is None:
        assert got is None or got[0] in (1002, 1007), got
    else:
        assert got is not None, "dropped without a close frame"
        assert got[0] == code, got
    raw.close()


def test_fragmented_uid_within_limits_is_fine(fuzzed) -> None:
    server, _ = fuzzed
    raw = opened(server)
    raw.send(frame(TEXT, b"fuzz-", fin=False))
    raw.send(frame(PING, b"in between"))  # control frames may interleave
    raw.send(frame(CONTINUATION, b"frag", fin=False) + frame(CONTINUATION, b"mented"))
    server.wait_for(lambda s: s["connections"] >= 2)
    with server.backend() as b:
        assert b.request('{"uid":"fuzz-fragmented","data":"whole"}') == b"ok"
    frames = [raw.recv_frame() for _ in range(2)]
    assert (0xA, b"in between") in frames and (TEXT, b"whole") in frames
    raw.close()


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b"HELLO\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", 426),  # plain HTTP: upgrade required
        (request().replace(b"Sec-WebSocket-Key: ", b"X-Nope: "), 400),
        (request().replace(b"Version: 13", b"Version: 7"), 400),
        (request().replace(b"GET", b"POST"), 405),
        (request() + b"\x00" * 0, 101),
        (request().replace(b"Upgrade: websocket", b"Upgrade: h2c"), 400),
        (request(headers={"Origin": "http://[bad"}), 400),
    ],
    ids=["garbage", "plain-http", "no-key", "old-version", "post", "fine", "h2c", "bad-origin"],
)
def test_bad_handshakes_get_http_errors(fuzzed, data: bytes, status: int) -> None:
    server, _ = fuzzed
    raw = RawWS(server.ws_port)
    raw.send(data)
    try:
        got = raw.read_status()
    except ConnectionError:
        got = None
    assert got == status or (status >= 400 and got is not None and got >= 400), got
    raw.close()


def test_truncated_slow_handshakes_and_a_flood_of_silent_connections(fuzzed) -> None:
    server, _ = fuzzed
    truncated = socket.create_connection(("127.0.0.1", server.ws_port))
    truncated.sendall(request()[:40])
    truncated.close()  # gone half-way through its request
    slow = RawWS(server.ws_port)
    slow.send(request()[:60])  # and never the rest
    flood = [opened(server) for _ in range(500)]  # never authenticate
    codes = [raw.close_code() for raw in flood]
    assert codes == [(4008, "authentication timeout")] * 500
    for raw in flood:
        raw.close()
    # The opening handshake timeout (5 s at least) ends the slow one.
    assert slow.wait_eof(15) < 15
    slow.close()
    server.wait_for(lambda s: s["pending"] == 0, timeout=10)


def test_healthy_client_received_everything(fuzzed) -> None:
    server, pusher = fuzzed
    time.sleep(0.2)
    pusher.stop.set()
    pusher.join(10)
    assert pusher.sent and set(pusher.replies) == {b"ok"}, set(pusher.replies)
    deadline = time.monotonic() + 10
    while len(pusher.received) < len(pusher.sent) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pusher.received == pusher.sent
    assert "Traceback" not in server.log()
