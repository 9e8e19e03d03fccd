"""One table of requests, run against both transports: the backend port and the HTTP API."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable

import jwt
import pytest
from conftest import PushServer

Call = Callable[[dict], tuple[int, dict]]


def line_call(server: PushServer) -> Call:
    backend = server.backend()

    def call(request: dict) -> tuple[int, dict]:
        reply = backend.json(json.dumps({**request, "id": "case"}))
        assert reply.pop("id") == "case"
        if reply.get("ok") is False and "error" in reply:
            return (404 if reply["error"].startswith("unknown command") else 400), reply
        return 200, reply

    return call


def http_post(server: PushServer, path: str, body: bytes, headers: dict | None = None):
    req = urllib.request.Request(server.http_url + path, data=body, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read(), resp.headers
    except urllib.error.HTTPError as e:
        return e.code, e.read(), e.headers


def http_call(server: PushServer) -> Call:
    def call(request: dict) -> tuple[int, dict]:
        body = {k: v for k, v in request.items() if k != "cmd"}
        status, data, headers = http_post(
            server, f"/api/{request.get('cmd', 'push')}", json.dumps(body).encode()
        )
        assert headers["content-type"] == "application/json"
        return status, json.loads(data)

    return call


# (request, expected status, expected reply); run in order against the same
# state: alice has two tabs, bob one, carol none.
CASES: list[tuple[dict, int, dict]] = [
    ({"uid": "alice", "data": "a"}, 200, {"ok": True, "delivered": 2}),
    ({"uid": ["alice", "bob"], "data": "b"}, 200, {"ok": True, "delivered": 3}),
    ({"uid": "carol", "data": "c"}, 200, {"ok": False, "delivered": 0}),
    ({"uid": ["alice", "bob"], "data": "d", "exclude": "alice"}, 200, {"ok": True, "delivered": 1}),
    ({"cmd": "join", "uid": ["alice", "bob", "carol"], "group": "g1"}, 200, {"ok": True}),
    ({"group": "g1", "data": "e"}, 200, {"ok": True, "delivered": 3}),
    ({"group": ["g1", "nope"], "data": "f", "exclude": ["bob"]}, 200, {"ok": True, "delivered": 2}),
    ({"group": "empty", "data": "g"}, 200, {"ok": False, "delivered": 0}),
    (
        {"cmd": "members", "group": "g1"},
        200,
        {"ok": True, "uids": ["alice", "bob", "carol"], "next": None, "total": 3, "online": 2},
    ),
    (
        {"cmd": "members", "group": "g1", "limit": 2},
        200,
        {"ok": True, "uids": ["alice", "bob"], "next": "bob", "total": 3, "online": 2},
    ),
    (
        {"cmd": "members", "group": "g1", "after": "bob"},
        200,
        {"ok": True, "uids": ["carol"], "next": None, "total": 3, "online": 2},
    ),
    ({"cmd": "leave", "uid": "bob", "group": "g1"}, 200, {"ok": True}),
    ({"group": "g1", "data": "h"}, 200, {"ok": True, "delivered": 2}),
    ({"cmd": "broadcast", "data": "i"}, 200, {"ok": True, "delivered": 3}),
    ({"cmd": "broadcast", "data": "j", "exclude": "alice"}, 200, {"ok": True, "delivered": 1}),
    (
        {"cmd": "online", "uid": ["alice", "carol"]},
        200,
        {"ok": True, "online": {"alice": True, "carol": False}},
    ),
    (
        {"cmd": "stats"},
        200,
        {"ok": True, "uids": 2, "connections": 3, "pending": 0, "groups": 1},
    ),
    (
        {"cmd": "list", "limit": 1},
        200,
        {"ok": True, "uids": ["alice"], "next": "alice", "total": 2},
    ),
    (
        {"cmd": "list", "after": "alice"},
        200,
        {"ok": True, "uids": ["bob"], "next": None, "total": 2},
    ),
    # errors
    ({"data": "x"}, 400, {"ok": False, "error": "missing uid"}),
    (
        {"uid": "a", "group": "g", "data": "x"},
        400,
        {"ok": False, "error": "give uid or group, not both"},
    ),
    ({"uid": "alice"}, 400, {"ok": False, "error": "missing data"}),
    (
        {"uid": 7, "data": "x"},
        400,
        {"ok": False, "error": "uid must be a non-empty string or a list of them"},
    ),
    ({"cmd": "join", "uid": "a"}, 400, {"ok": False, "error": "missing group"}),
    ({"cmd": "members"}, 400, {"ok": False, "error": "group must be a non-empty string"}),
    (
        {"cmd": "list", "limit": 0},
        400,
        {"ok": False, "error": "limit must be an integer from 1 to 1000"},
    ),
    ({"cmd": "list", "after": 3}, 400, {"ok": False, "error": "after must be a string"}),
    (
        {"cmd": "disconnect", "uid": "bob", "code": 1001},
        400,
        {"ok": False, "error": "code must be 1000 or an integer from 3000 to 4999"},
    ),
    (
        {"cmd": "disconnect", "uid": "bob", "code": 1000.0},
        400,
        {"ok": False, "error": "code must be 1000 or an integer from 3000 to 4999"},
    ),
    ({"cmd": "frobnicate"}, 404, {"ok": False, "error": "unknown command 'frobnicate'"}),
    # last: changes who is online
    (
        {"cmd": "disconnect", "uid": "bob", "code": 4100, "reason": "banned"},
        200,
        {"ok": True, "closed": 1},
    ),
]


@pytest.mark.parametrize("transport", [line_call, http_call], ids=["line", "http"])
def test_case_table(start_server, transport) -> None:
    server = start_server()
    alice = [server.ws("alice"), server.ws("alice")]
    bob = server.ws("bob")
    server.wait_for(lambda s: s["connections"] == 3 and s["pending"] == 0)
    call = transport(server)
    for request, status, expected in CASES:
        assert call(request) == (status, expected), request
    with pytest.raises(Exception) as info:
        while True:
            bob.recv(timeout=5)
    assert info.value.rcvd.code == 4100 and info.value.rcvd.reason == "banned"
    # What alice's tabs received, in order: every delivering case that included her,
    # and nothing else before a marker pushed now.
    server.push_until_delivered("alice", "marker", connections=2)
    for tab in alice:
        assert [tab.recv(timeout=5) for _ in range(7)] == ["a", "b", "e", "f", "h", "i", "marker"]
        tab.close()


def test_token_groups_claim(start_server) -> None:
    secret = "groups-secret-0123456789-abcdefghijkl"
    server = start_server(env={"PUSHSVC_SECRET": secret})
    exp = int(time.time()) + 60
    ws = server.ws(jwt.encode({"sub": "dana", "exp": exp, "groups": ["room1"]}, secret))
    other = server.ws(jwt.encode({"sub": "eve", "exp": exp}, secret))
    server.wait_for(lambda s: s["connections"] == 2)
    with server.backend() as b:
        assert b.request('{"group":"room1","data":"to the room"}') == b"ok"
        members = b.json('{"cmd":"members","group":"room1"}')
        assert members["uids"] == ["dana"] and members["online"] == 1
    assert ws.recv(timeout=5) == "to the room"
    server.push_until_delivered("eve", "marker")
    assert other.recv(timeout=5) == "marker"  # the room's push came before: not to eve
    ws.close()
    other.close()
    server.wait_for(lambda s: s["groups"] == 0)


def test_bad_groups_claim_is_refused(start_server) -> None:
    secret = "groups-secret-0123456789-abcdefghijkl"
    server = start_server(env={"PUSHSVC_SECRET": secret})
    token = jwt.encode({"sub": "x", "exp": int(time.time()) + 60, "groups": "room1"}, secret)
    ws = server.ws(token)
    with pytest.raises(Exception) as info:
        ws.recv(timeout=5)
    assert info.value.rcvd.code == 4001


def test_joined_group_covers_future_connections(server: PushServer) -> None:
    with server.backend() as b:
        assert b.json('{"cmd":"join","uid":"later","group":"watchers"}') == {"ok": True}
        assert b.request('{"group":"watchers","data":"x"}') == b"fail"
        ws = server.ws("later")
        server.wait_for(lambda s: s["pending"] == 0)
        assert b.request('{"group":"watchers","data":"now"}') == b"ok"
        assert ws.recv(timeout=5) == "now"
        ws.close()
        assert b.json('{"cmd":"members","group":"watchers"}')["uids"] == ["later"]


def test_a_connection_in_two_targeted_groups_gets_one_copy(server: PushServer) -> None:
    ws = server.ws("twice")
    server.wait_for(lambda s: s["pending"] == 0)
    with server.backend() as b:
        b.json('{"cmd":"join","uid":"twice","group":["ga","gb"]}')
        assert b.json('{"id":1,"group":["ga","gb"],"data":"once"}')["delivered"] == 1
    assert ws.recv(timeout=5) == "once"
    server.push_until_delivered("twice", "marker")
    assert ws.recv(timeout=5) == "marker"  # not a second "once"
    ws.close()
