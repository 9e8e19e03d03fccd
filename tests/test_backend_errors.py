"""Bad input on the backend port: one error reply each, and the connection keeps working."""

from __future__ import annotations

import json

import pytest
from conftest import PushServer

BAD_LINES = [
    (b"{not json", b"error invalid JSON"),
    (b"[1, 2]", b"error request must be a JSON object"),
    (b'"uid1"', b"error request must be a JSON object"),
    (b"null", b"error request must be a JSON object"),
    (b"   ", b"error empty line"),
    (b"", b"error empty line"),
    (b"\xff\xfe{}", b"error invalid UTF-8"),
    (b'{"uid":"\xc3\x28","data":"x"}', b"error invalid UTF-8"),
    (b'{"percent":"88%"}', b"error missing uid"),
    (b'{"uid":42,"data":"x"}', b"error uid must be a non-empty string or a list of them"),
    (b'{"uid":"","data":"x"}', b"error uid must not be empty"),
    (b'{"uid":[],"data":"x"}', b"error uid must be a non-empty string or a list of them"),
    (b'{"uid":["a",1],"data":"x"}', b"error uid must be a non-empty string or a list of them"),
    (b'{"uid":"a"}', b"error missing data"),
    (b'{"cmd":"nope","uid":"a","data":"x"}', b"error unknown command 'nope'"),
    (b'{"cmd":7,"uid":"a","data":"x"}', b"error cmd must be a string"),
]


@pytest.mark.parametrize(("line", "expected"), BAD_LINES, ids=[repr(b[0]) for b in BAD_LINES])
def test_bad_line_gets_one_error_and_connection_survives(
    server: PushServer, line: bytes, expected: bytes
) -> None:
    with server.backend() as b:
        reply = b.request(line)
        assert reply.startswith(expected), reply
        assert b"\n" not in reply
        # Still usable, and no second reply was produced for the bad line.
        assert b.request(b'{"uid":"nobody","data":"x"}') == b"fail"


def test_errors_with_id_are_json(server: PushServer) -> None:
    with server.backend() as b:
        assert b.json('{"id":9,"uid":5,"data":"x"}') == {
            "id": 9,
            "ok": False,
            "error": "uid must be a non-empty string or a list of them",
        }


def test_bad_lines_pipelined_with_good_ones(server: PushServer, ws_clients) -> None:
    ws = server.ws("errs-mixed")
    ws_clients.append(ws)
    server.wait_for(lambda s: s["pending"] == 0)
    good = b'{"uid":"errs-mixed","data":"ok line"}'
    with server.backend() as b:
        b.send(b"\n".join([good, b"{bad", good, b"[]", good]) + b"\n")
        replies = [b.line() for _ in range(5)]
    assert replies[0] == replies[2] == replies[4] == b"ok\n"
    assert replies[1].startswith(b"error invalid JSON")
    assert replies[3].startswith(b"error request must be a JSON object")
    assert [ws.recv(timeout=5) for _ in range(3)] == ["ok line"] * 3


def test_overlong_line_in_one_write_keeps_following_lines(start_server, ws_clients) -> None:
    server = start_server("--max-line=1024")
    ws = server.ws("long")
    ws_clients.append(ws)
    server.wait_for(lambda s: s["pending"] == 0)
    long_line = json.dumps({"uid": "long", "data": "x" * 5000}).encode()
    with server.backend() as b:
        b.send(long_line + b"\n" + b'{"uid":"long","data":"after"}\n')
        assert b.line() == b"error line longer than 1024 bytes\n"
        assert b.line() == b"ok\n"
    assert ws.recv(timeout=5) == "after"


def test_overlong_line_across_many_writes_gets_one_error(start_server) -> None:
    server = start_server("--max-line=1024")
    with server.backend() as b:
        for _ in range(50):
            b.send(b"y" * 1000)  # 50 KB without a newline
        b.send(b"\n")
        b.send(b'{"uid":"nobody","data":"x"}\n')
        assert b.line() == b"error line longer than 1024 bytes\n"
        assert b.line() == b"fail\n"


def test_line_exactly_at_the_limit_is_served(start_server) -> None:
    server = start_server("--max-line=64")
    line = b'{"uid":"nobody","data":"' + b"z" * 30
    line += b"z" * (64 - len(line) - 2) + b'"}'
    assert len(line) == 64
    with server.backend() as b:
        assert b.request(line) == b"fail"
        assert b.request(line[:-2] + b'z"}').startswith(b"error line longer than 64 bytes")


def test_backend_that_vanishes_mid_line_harms_nobody(server: PushServer) -> None:
    b = server.backend()
    b.send(b'{"uid":"nob')
    b.close()
    with server.backend() as b2:
        assert b2.request('{"uid":"nobody","data":"x"}') == b"fail"


def test_backend_that_never_reads_its_replies_is_paused(server: PushServer) -> None:
    """The server stops reading instead of buffering replies without bound."""
    import threading

    line = b'{"uid":"nobody-reads","data":"x"}\n'
    chunk = line * 10_000
    with server.backend() as b:
        b.sock.settimeout(3)
        sent = 0
        with pytest.raises(TimeoutError):
            while sent < 200 * len(chunk):  # ~70 MB of requests, ~10 MB of replies
                b.sock.sendall(chunk)
                sent += len(chunk)
        # Blocked well before everything was accepted: the server paused reading.
        assert sent < 200 * len(chunk)
        lines_sent = sent // len(line)
        replies: list[int] = []

        def drain() -> None:
            count = 0
            while count < lines_sent:
                reply = b.line()
                assert reply == b"fail\n", reply
                count += 1
            replies.append(count)

        reader = threading.Thread(target=drain)
        reader.start()
        reader.join(60)
        assert replies and replies[0] >= lines_sent - 10_000
