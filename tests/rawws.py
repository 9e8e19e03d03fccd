"""A WebSocket client on a bare socket, for what a well-behaved library will not send.

It can skip masking, set reserved bits, use unknown opcodes, claim huge
lengths, stop reading, or stop half-way through the handshake.
"""

from __future__ import annotations

import base64
import os
import socket
import struct
import time

TEXT, BINARY, CLOSE, PING, PONG, CONTINUATION = 0x1, 0x2, 0x8, 0x9, 0xA, 0x0
KEY = base64.b64encode(b"0123456789abcdef").decode()


def request(path: str = "/", headers: dict[str, str] | None = None) -> bytes:
    lines = [
        f"GET {path} HTTP/1.1",
        "Host: 127.0.0.1",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {KEY}",
        "Sec-WebSocket-Version: 13",
        *(f"{k}: {v}" for k, v in (headers or {}).items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def frame(
    opcode: int,
    payload: bytes = b"",
    *,
    fin: bool = True,
    mask: bool = True,
    rsv: int = 0,
    length: int | None = None,
) -> bytes:
    """One frame; ``length`` overrides the length field (to lie about it)."""
    n = len(payload) if length is None else length
    head = bytes([(0x80 if fin else 0) | rsv | opcode])
    bit = 0x80 if mask else 0
    if n < 126:
        head += bytes([bit | n])
    elif n < 1 << 16:
        head += bytes([bit | 126]) + struct.pack("!H", n)
    else:
        head += bytes([bit | 127]) + struct.pack("!Q", n)
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


class RawWS:
    """One raw connection to the WebSocket port."""

    def __init__(self, port: int, rcvbuf: int | None = None, timeout: float = 10.0) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(timeout)
        self.sock.connect(("127.0.0.1", port))
        self.buf = b""

    def handshake(self, path: str = "/", headers: dict[str, str] | None = None) -> int:
        """Send the opening handshake; return the HTTP status of the answer."""
        self.sock.sendall(request(path, headers))
        return self.read_status()

    def read_status(self) -> int:
        while b"\r\n\r\n" not in self.buf:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError(f"closed during the handshake: {self.buf!r}")
            self.buf += data
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        return int(head.split(b" ", 2)[1])

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send_text(self, text: str) -> None:
        self.sock.sendall(frame(TEXT, text.encode()))

    def _need(self, n: int) -> bool:
        while len(self.buf) < n:
            data = self.sock.recv(1 << 20)
            if not data:
                return False
            self.buf += data
        return True

    def recv_frame(self) -> tuple[int, bytes] | None:
        """The next frame as (opcode, payload), or None at end of stream."""
        if not self._need(2):
            return None
        b0, b1 = self.buf[0], self.buf[1]
        n, pos = b1 & 0x7F, 2
        if n == 126:
            if not self._need(4):
                return None
            n, pos = struct.unpack("!H", self.buf[2:4])[0], 4
        elif n == 127:
            if not self._need(10):
                return None
            n, pos = struct.unpack("!Q", self.buf[2:10])[0], 10
        if not self._need(pos + n):
            return None
        payload = self.buf[pos : pos + n]
        self.buf = self.buf[pos + n :]
        return b0 & 0x0F, payload

    def close_code(self, answer: bool = True) -> tuple[int, str] | None:
        """Read until a close frame; its (code, reason), or None if the stream just ended."""
        while True:
            try:
                got = self.recv_frame()
            except ConnectionResetError:
                return None
            if got is None:
                return None
            opcode, payload = got
            if opcode == CLOSE:
                if answer:
                    try:
                        self.sock.sendall(frame(CLOSE, payload[:2]))
                    except OSError:
                        pass
                code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
                return code, payload[2:].decode("utf-8", "replace")

    def wait_eof(self, timeout: float) -> float:
        """Seconds until the server closes the TCP connection (reading and dropping data)."""
        started = time.monotonic()
        self.sock.settimeout(timeout)
        while True:
            try:
                if not self.sock.recv(65536):
                    return time.monotonic() - started
            except ConnectionResetError:
                return time.monotonic() - started

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass
