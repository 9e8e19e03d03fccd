"""The Workerman recipe's snippets, byte for byte, against pushsvc."""

from __future__ import annotations

import json
import socket

from conftest import PushServer


def php_push(port: int, data: dict) -> bytes:
    """The recipe's PHP backend: stream_socket_client, one fwrite, one fread(8192)."""
    client = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        client.sendall(json.dumps(data).encode() + b"\n")
        return client.recv(8192)
    finally:
        client.close()


def test_seed_exchange(server: PushServer, ws_clients) -> None:
    # The recipe's browser JS: open, send the uid, wait for messages.
    ws = server.ws("seed-uid1")
    ws_clients.append(ws)
    server.wait_for(lambda s: s["connections"] >= 1 and s["pending"] == 0)
    assert php_push(server.text_port, {"uid": "seed-uid1", "percent": "88%"}) == b"ok\n"
    assert ws.recv(timeout=5) == "88%"


def test_seed_offline_uid_fails(server: PushServer) -> None:
    assert php_push(server.text_port, {"uid": "nobody-here", "percent": "88%"}) == b"fail\n"


def test_exact_bytes_of_the_seed_line(server: PushServer, ws_clients) -> None:
    ws = server.ws("seed-uid2")
    ws_clients.append(ws)
    server.wait_for(lambda s: s["pending"] == 0)
    with server.backend() as b:
        # PHP's json_encode output, written with its "\n".
        b.send(b'{"uid":"seed-uid2","percent":"88%"}\n')
        assert b.sock.recv(8192) == b"ok\n"
    assert ws.recv(timeout=5) == "88%"


def test_the_recipe_is_unchanged_under_history_ttl(start_server, ws_clients) -> None:
    """A bare-uid page gets plain texts even for kept pushes; a JSON hello gets envelopes."""
    server = start_server("--history-ttl=60")
    seed = server.ws("ttl-seed")
    hello = server.ws(json.dumps({"uid": "ttl-hello"}))
    ws_clients.extend([seed, hello])
    server.wait_for(lambda s: s["connections"] == 2 and s["pending"] == 0)
    assert php_push(server.text_port, {"uid": "ttl-seed", "percent": "88%"}) == b"ok\n"
    assert seed.recv(timeout=5) == "88%"
    assert php_push(server.text_port, {"uid": "ttl-hello", "percent": "88%"}) == b"ok\n"
    envelope = json.loads(hello.recv(timeout=5))
    assert (envelope["pushsvc"], envelope["ch"], envelope["data"]) == ("msg", "u:ttl-hello", "88%")
    # A push with its own ttl, a group push and a broadcast: the same rule.
    with server.backend() as b:
        b.request(json.dumps({"cmd": "join", "uid": ["ttl-seed", "ttl-hello"], "group": "g"}))
        assert b.request(json.dumps({"uid": "ttl-seed", "data": {"n": 1}, "ttl": 5})) == b"ok"
        assert b.request(json.dumps({"group": "g", "data": "to the group"})) == b"ok"
    assert seed.recv(timeout=5) == '{"n":1}'
    assert seed.recv(timeout=5) == "to the group"
    group = json.loads(hello.recv(timeout=5))
    assert (group["ch"], group["data"]) == ("g:g", "to the group")
