"""Pushes, tabs, broadcast and pipelining over real sockets."""

from __future__ import annotations

import json

from conftest import PushServer, new_uid
from test_commands import http_post


def online(server: PushServer, user: str) -> bool:
    with server.backend() as b:
        return b.json(json.dumps({"cmd": "online", "uid": user}))["online"][user]


def test_every_tab_of_a_uid_receives(server: PushServer, ws_clients) -> None:
    user = new_uid("u")
    tabs = [server.ws(user) for _ in range(3)]
    ws_clients.extend(tabs)
    server.wait_for(lambda s: s["pending"] == 0)
    with server.backend() as b:
        reply = b.json(json.dumps({"id": 1, "uid": user, "data": "hello"}))
    assert reply == {"id": 1, "ok": True, "delivered": 3}
    assert [t.recv(timeout=5) for t in tabs] == ["hello"] * 3


def test_closing_tabs_is_noticed(server: PushServer) -> None:
    user = new_uid("u")
    tabs = [server.ws(user) for _ in range(2)]
    server.wait_for(lambda s: s["pending"] == 0)
    tabs[0].close()
    with server.backend() as b:
        assert b.request(json.dumps({"uid": user, "data": "x"})) == b"ok"
    assert tabs[1].recv(timeout=5) == "x"
    tabs[1].close()
    # The close handshake completes before close() returns, so the node
    # has forgotten the connection by the time the next request arrives.
    with server.backend() as b:
        assert b.request(json.dumps({"uid": user, "data": "y"})) == b"fail"
    assert not online(server, user)


def test_abrupt_disconnect_is_noticed(server: PushServer) -> None:
    user = new_uid("u")
    ws = server.ws(user)
    server.wait_for(lambda s: s["pending"] == 0)
    assert online(server, user)
    ws.socket.close()  # no close frame: a browser whose network vanished
    import time

    deadline = time.monotonic() + 5
    while online(server, user):
        assert time.monotonic() < deadline
        time.sleep(0.02)


def test_payload_forms(server: PushServer, ws_clients) -> None:
    user = new_uid("u")
    ws = server.ws(user)
    ws_clients.append(ws)
    server.wait_for(lambda s: s["pending"] == 0)
    cases = [
        ({"uid": user, "data": "plain text"}, "plain text"),
        ({"uid": user, "data": {"task": 7, "percent": 88}}, '{"task":7,"percent":88}'),
        ({"uid": user, "data": [1, 2]}, "[1,2]"),
        ({"uid": user, "data": 42}, "42"),
        ({"uid": user, "data": "ünïcødé ✓"}, "ünïcødé ✓"),
        ({"uid": [user, "offline-" + user], "data": "to a list"}, "to a list"),
        ({"uid": user, "percent": 88}, "88"),
    ]
    with server.backend() as b:
        for request, _ in cases:
            assert b.request(json.dumps(request)) == b"ok"
    assert [ws.recv(timeout=5) for _ in cases] == [text for _, text in cases]


def test_list_of_uids_counts_every_connection(server: PushServer, ws_clients) -> None:
    a, b_ = new_uid("u"), new_uid("u")
    ws_clients.extend([server.ws(a), server.ws(a), server.ws(b_)])
    server.wait_for(lambda s: s["pending"] == 0)
    with server.backend() as b:
        reply = b.json(json.dumps({"id": "x", "uid": [a, b_, a, new_uid("u")], "data": "m"}))
    assert reply == {"id": "x", "ok": True, "delivered": 3}


def test_broadcast_reaches_every_connection(start_server) -> None:
    server = start_server()
    clients = [server.ws(f"b{i}") for i in range(4)] + [server.ws("b0")]
    server.wait_for(lambda s: s["connections"] == 5)
    with server.backend() as b:
        assert b.request('{"cmd":"broadcast","data":"to all"}') == b"ok"
        assert b.json('{"id":2,"cmd":"broadcast","data":{"n":1}}') == {
            "id": 2,
            "ok": True,
            "delivered": 5,
        }
    for c in clients:
        assert c.recv(timeout=5) == "to all"
        assert c.recv(timeout=5) == '{"n":1}'
        c.close()


def test_broadcast_with_nobody_connected_fails(start_server) -> None:
    server = start_server()
    with server.backend() as b:
        assert b.request('{"cmd":"broadcast","data":"x"}') == b"fail"


def test_unauthenticated_connection_gets_nothing(start_server, ws_clients) -> None:
    server = start_server()
    ws = server.ws()  # connected, but never says who it is
    ws_clients.append(ws)
    server.wait_for(lambda s: s["pending"] == 1)
    with server.backend() as b:
        assert b.request('{"cmd":"broadcast","data":"x"}') == b"fail"  # reached nobody
    # Once it has identified itself, a marker broadcast is its first frame:
    # the broadcast before it was not sent to it.
    ws.send("late")
    server.wait_for(lambda s: s["pending"] == 0 and s["connections"] == 1)
    with server.backend() as b:
        assert b.request('{"cmd":"broadcast","data":"marker"}') == b"ok"
    assert ws.recv(timeout=5) == "marker"


def test_frames_after_auth_are_ignored(server: PushServer, ws_clients) -> None:
    user = new_uid("u")
    ws = server.ws(user)
    ws_clients.append(ws)
    ws.send("another-uid")  # does not re-identify the connection
    ws.send(b"\x00\x01binary")
    with server.backend() as b:
        assert b.request(json.dumps({"uid": "another-uid", "data": "x"})) == b"fail"
        assert b.request(json.dumps({"uid": user, "data": "still here"})) == b"ok"
    assert ws.recv(timeout=5) == "still here"


def test_pipelining_1000_lines_in_one_write(server: PushServer, ws_clients) -> None:
    user = new_uid("u")
    ws = server.ws(user)
    ws_clients.append(ws)
    server.wait_for(lambda s: s["pending"] == 0)
    lines = []
    for i in range(1000):
        target = user if i % 3 else "offline-" + user
        lines.append(json.dumps({"uid": target, "data": str(i)}))
    with server.backend() as b:
        b.send("\n".join(lines) + "\n")
        replies = [b.line() for _ in range(1000)]
    assert replies == [b"ok\n" if i % 3 else b"fail\n" for i in range(1000)]
    received = [ws.recv(timeout=5) for i in range(1000) if i % 3]
    assert received == [str(i) for i in range(1000) if i % 3]


def test_pipelined_ids_come_back_in_order(server: PushServer) -> None:
    with server.backend() as b:
        b.send(
            "".join(json.dumps({"id": i, "uid": "nobody", "data": "x"}) + "\n" for i in range(200))
        )
        ids = [json.loads(b.line())["id"] for _ in range(200)]
    assert ids == list(range(200))


def test_crlf_line_endings_are_accepted(server: PushServer) -> None:
    with server.backend() as b:
        b.send(b'{"uid":"nobody","data":"x"}\r\n')
        assert b.line() == b"fail\n"


def test_stats_and_online(start_server, ws_clients) -> None:
    server = start_server()  # its own server: the counts are exact
    user = new_uid("u")
    ws_clients.extend([server.ws(user), server.ws(user), server.ws()])
    server.wait_for(lambda s: s["pending"] == 1 and s["connections"] == 2)
    with server.backend() as b:
        reply = b.json(json.dumps({"cmd": "online", "uid": [user, "nobody"]}))
        assert reply == {"ok": True, "online": {user: True, "nobody": False}}
        stats = b.json('{"cmd":"stats"}')
    # Two tabs of one uid, and one connection that has not said who it is.
    assert (stats["uids"], stats["connections"], stats["pending"]) == (1, 2, 1)


MIB = 1 << 20


def seed_line(user: str, size: int) -> bytes:
    """The seed's request line (no id: a bare ok/fail reply), ``size`` bytes without newline."""
    empty = json.dumps({"uid": user, "percent": ""}).encode()
    return json.dumps({"uid": user, "percent": "p" * (size - len(empty))}).encode()


def test_a_one_mib_push_with_default_options(server: PushServer, ws_clients) -> None:
    """The default --max-line is 1 MiB: a document-sized push is delivered whole."""
    user = new_uid("u")
    ws = server.ws(user, max_size=2 * MIB)
    ws_clients.append(ws)
    server.wait_for(lambda s: s["pending"] == 0)
    line = seed_line(user, MIB)
    assert len(line) == MIB
    with server.backend() as b:
        assert b.request(line) == b"ok"
        assert b.request(seed_line(user, MIB + 1)) == b"error line longer than 1048576 bytes"
        assert b.request(json.dumps({"uid": user, "data": "after"})) == b"ok"
    assert ws.recv(timeout=10) == json.loads(line)["percent"]
    assert ws.recv(timeout=5) == "after"  # the over-long line reached nobody


def test_integers_of_any_size_arrive_exactly(server: PushServer, ws_clients) -> None:
    """Beyond 64 bits orjson would make them floats (2**64 as 1.8446744073709552e+19)."""
    user = new_uid("u")
    ws = server.ws(user)
    ws_clients.append(ws)
    server.wait_for(lambda s: s["pending"] == 0)
    forty = "1234567890" * 4
    texts = [
        str(2**64),
        str(-(2**70)),
        '{"n":{"deep":[' + forty + ",-" + forty + ']},"small":7,"x":1.5}',
        "[18446744073709551615,-9223372036854775808]",  # the edges orjson holds itself
    ]
    with server.backend() as b:
        for text in texts:
            assert b.request(f'{{"uid":"{user}","data":{text}}}') == b"ok"
        # An id beyond 64 bits is echoed exactly too.
        big_id = str(2**80)
        reply = b.request(f'{{"id":{big_id},"uid":"{user}","data":{big_id}}}')
        assert reply == b'{"id":' + big_id.encode() + b',"ok":true,"delivered":1}'
    # Through the HTTP API as well.
    body = f'{{"uid":"{user}","data":{{"v":-{forty}}}}}'.encode()
    assert http_post(server, "/api/push", body)[:2] == (200, b'{"ok":true,"delivered":1}\n')
    received = [ws.recv(timeout=5) for _ in range(len(texts) + 2)]
    assert received == [*texts, big_id, f'{{"v":-{forty}}}']
