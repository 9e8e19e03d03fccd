"""pushsvc.client against a real server (and, for failure timing, a scripted one)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from conftest import PushServer, child_env, free_port, new_uid

from pushsvc.client import (
    Client,
    ProtocolError,
    PushConnectionError,
    PushError,
    PushTimeout,
    RequestRejected,
    parse_address,
)


@pytest.fixture
def client(server: PushServer) -> Iterator[Client]:
    with Client("127.0.0.1", server.text_port) as c:
        yield c


# -- pushes -----------------------------------------------------------------------


def test_push_to_an_online_uid(server: PushServer, client: Client, ws_clients) -> None:
    user = new_uid("c")
    ws = server.online(user, ws_clients)
    assert client.push(user, "hello") == 1
    assert client.push(user, {"task": 7, "percent": 88}) == 1
    assert client.push([user, user + "-offline"], [1, 2]) == 1
    assert [ws.recv(timeout=5) for _ in range(3)] == ["hello", '{"task":7,"percent":88}', "[1,2]"]


def test_push_to_an_offline_uid_is_not_an_error(client: Client) -> None:
    assert client.push(new_uid("c"), "x") == 0
    assert client.request({"uid": new_uid("c"), "data": "x"}) == {"ok": False, "delivered": 0}


def test_pipelined_batch_of_500(server: PushServer, client: Client, ws_clients) -> None:
    user = new_uid("c")
    ws = server.online(user, ws_clients)
    pushes = [(user if i % 3 else "offline-" + user, str(i)) for i in range(500)]
    assert client.push_many(pushes) == [1 if i % 3 else 0 for i in range(500)]
    assert [ws.recv(timeout=5) for i in range(500) if i % 3] == [
        str(i) for i in range(500) if i % 3
    ]
    # The generic form mixes commands; replies come back in order, without ids.
    replies = client.pipeline(
        [{"cmd": "online", "uid": user}, {"uid": user, "data": "last"}, {"cmd": "stats"}]
    )
    assert replies[0] == {"ok": True, "online": {user: True}}
    assert replies[1] == {"ok": True, "delivered": 1}
    assert replies[2]["ok"] is True and replies[2]["connections"] >= 1
    assert ws.recv(timeout=5) == "last"


def test_one_write_per_batch(server: PushServer) -> None:
    class CountingSocket:
        def __init__(self, sock: socket.socket) -> None:
            self.sock, self.writes = sock, 0

        def sendall(self, data: bytes) -> None:
            self.writes += 1
            self.sock.sendall(data)

        def __getattr__(self, name: str):
            return getattr(self.sock, name)

    with Client(port=server.text_port) as c:
        c.connect()
        counting = c._sock = CountingSocket(c._sock)  # type: ignore[assignment,arg-type]
        c.push_many([(new_uid("c"), i) for i in range(500)])
        assert counting.writes == 1


def test_online_and_stats(start_server, ws_clients) -> None:
    server = start_server()  # its own server: the counts are exact
    user, nobody = new_uid("c"), new_uid("c")
    server.online(user, ws_clients)
    ws_clients.append(server.ws())  # connected, not identified yet
    server.wait_for(lambda s: s["pending"] == 1)
    with Client(port=server.text_port) as client:
        assert client.online([user, nobody]) == {user: True, nobody: False}
        assert client.online((user,)) == {user: True}
        assert client.is_online(user) and not client.is_online(nobody)
        stats = client.stats()
    assert "ok" not in stats
    assert (stats["uids"], stats["connections"], stats["pending"]) == (1, 1, 1)


def test_broadcast(start_server) -> None:
    server = start_server()
    with Client(port=server.text_port) as c:
        assert c.broadcast("nobody yet") == 0
        clients = [server.ws(f"b{i}") for i in range(3)]
        server.wait_for(lambda s: s["connections"] == 3)
        assert c.broadcast({"n": 1}) == 3
    try:
        assert [w.recv(timeout=5) for w in clients] == ['{"n":1}'] * 3
    finally:
        for w in clients:
            w.close()


# -- errors -----------------------------------------------------------------------


def test_rejected_request_raises_and_keeps_the_connection(client: Client) -> None:
    client.stats()
    sock = client._sock
    with pytest.raises(RequestRejected) as info:
        client.request({"cmd": "no-such-command"})
    assert info.value.reason == "unknown command 'no-such-command'"
    assert str(info.value) == info.value.reason
    assert info.value.request is not None and info.value.request["cmd"] == "no-such-command"
    with pytest.raises(RequestRejected, match="uid must not be empty"):
        client.push("", "x")
    with pytest.raises(RequestRejected, match="missing uid"):
        client.request({"data": "x"})
    assert isinstance(info.value, PushError)
    client.stats()
    assert client._sock is sock  # still the same connection


def test_rejected_request_in_a_batch(server: PushServer, client: Client, ws_clients) -> None:
    user = new_uid("c")
    ws = server.online(user, ws_clients)
    batch = [{"uid": user, "data": "a"}, {"uid": 5, "data": "b"}, {"uid": user, "data": "c"}]
    with pytest.raises(RequestRejected) as info:
        client.pipeline(batch)
    assert info.value.index == 1
    assert info.value.reason == "uid must be a non-empty string or a list of them"
    assert [r["ok"] for r in info.value.replies] == [True, False, True]
    replies = client.pipeline(batch, raise_on_error=False)
    assert replies[1] == {"ok": False, "error": info.value.reason}
    assert [ws.recv(timeout=5) for _ in range(4)] == ["a", "c", "a", "c"]


def test_overlong_line_is_rejected(start_server) -> None:
    """pushsvc answers an over-long line with a bare error (no id): still this request's."""
    server = start_server("--max-line=200")
    with Client(port=server.text_port) as c:
        with pytest.raises(RequestRejected, match="line longer than 200 bytes"):
            c.push(new_uid("c"), "x" * 500)
        assert c.push(new_uid("c"), "short") == 0


def test_invalid_values_are_refused_before_sending(client: Client) -> None:
    with pytest.raises(ValueError):
        client.push(new_uid("c"), float("nan"))
    with pytest.raises(TypeError):
        client.push(new_uid("c"), object())
    with pytest.raises(TypeError):
        client.push(new_uid("c"))  # no data
    assert client.push(new_uid("c"), None) == 0  # null is data


def test_unreachable_service(tmp_path) -> None:
    port = free_port()
    c = Client(port=port, retry_delay=0)
    with pytest.raises(PushConnectionError) as info:
        c.push("u", "x")
    assert isinstance(info.value, ConnectionError) and isinstance(info.value, PushError)
    assert f"127.0.0.1:{port}" in str(info.value)
    with pytest.raises(PushConnectionError):
        c.connect()


# -- reconnecting -----------------------------------------------------------------


def test_reconnects_after_a_restart_on_the_same_port(start_server, ws_clients) -> None:
    first = start_server()
    port = first.text_port
    user = new_uid("c")
    ws_clients.append(first.ws(user))
    first.wait_for(lambda s: s["pending"] == 0)
    # retries=0: the dead connection must be noticed before writing, not
    # after a request was lost on it.
    strict = Client(port=port, retries=0)
    lenient = Client(port=port)
    assert strict.push(user, "before") == 1
    assert lenient.push(user, "before") == 1
    first.stop()

    second = start_server(f"--text-port=tcp:{port}:interface=127.0.0.1")
    assert second.text_port == port
    ws = second.ws(user)
    ws_clients.append(ws)
    second.wait_for(lambda s: s["pending"] == 0)
    assert strict.push(user, "after") == 1
    assert lenient.push(user, "again") == 1
    assert [ws.recv(timeout=5), ws.recv(timeout=5)] == ["after", "again"]
    strict.close()
    lenient.close()


class ScriptedServer:
    """A line server on a real socket whose replies a test scripts per connection.

    ``script(n, lines, new, conn)`` is called with the connection's number, every
    request read on it so far and those read just now; it may reply on ``conn``,
    and returns False to close it.
    """

    Script = Callable[[int, list[dict], list[dict], socket.socket], bool]

    def __init__(self, script: Script) -> None:
        self.script = script
        self.received: list[list[dict]] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            lines: list[dict] = []
            self.received.append(lines)
            buf = b""
            with conn:
                while True:
                    data = conn.recv(65536)
                    if not data:
                        break
                    buf += data
                    *complete, buf = buf.split(b"\n")
                    new = [json.loads(line) for line in complete]
                    lines.extend(new)
                    if new and not self.script(len(self.received) - 1, lines, new, conn):
                        break

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def scripted() -> Iterator[Callable[..., ScriptedServer]]:
    servers: list[ScriptedServer] = []

    def make(script) -> ScriptedServer:
        servers.append(ScriptedServer(script))
        return servers[-1]

    yield make
    for s in servers:
        s.close()


def answer(conn: socket.socket, requests: list[dict], id_offset: int = 0) -> None:
    conn.sendall(
        b"".join(
            json.dumps({"id": r["id"] + id_offset, "ok": True, "delivered": 1}).encode() + b"\n"
            for r in requests
        )
    )


def test_only_unanswered_requests_are_resent(scripted) -> None:
    def script(n: int, lines: list[dict], new: list[dict], conn: socket.socket) -> bool:
        if n == 0:
            if len(lines) < 5:
                return True
            answer(conn, lines[:2])  # then the connection breaks
            return False
        answer(conn, new)
        return True

    server = scripted(script)
    with Client(port=server.port) as c:
        assert c.push_many([("u", i) for i in range(5)]) == [1] * 5
    assert [r["data"] for r in server.received[0]] == [0, 1, 2, 3, 4]
    assert [r["data"] for r in server.received[1]] == [2, 3, 4]
    assert [r["id"] for r in server.received[1]] == [r["id"] for r in server.received[0][2:]]


def test_gives_up_after_one_reconnect(scripted) -> None:
    def script(n: int, lines: list[dict], new: list[dict], conn: socket.socket) -> bool:
        if len(lines) < 3 - n:
            return True
        answer(conn, lines[:1])  # answer one, then drop the connection
        return False

    server = scripted(script)
    with Client(port=server.port, retry_delay=0) as c:
        with pytest.raises(PushConnectionError) as info:
            c.push_many([("u", i) for i in range(3)])
    assert "lost the connection" in str(info.value)
    assert info.value.replies == [{"ok": True, "delivered": 1}] * 2
    assert len(server.received) == 2


def test_mismatched_id_is_a_protocol_error(scripted) -> None:
    def script(n: int, lines: list[dict], new: list[dict], conn: socket.socket) -> bool:
        answer(conn, new, id_offset=1 if n == 0 else 0)
        return True

    server = scripted(script)
    with Client(port=server.port) as c:
        with pytest.raises(ProtocolError, match="does not match"):
            c.push("u", "x")
        assert c._sock is None  # out of sync: dropped
        assert c.push("u", "x") == 1  # a new connection
    assert len(server.received) == 2


def test_garbage_reply_is_a_protocol_error(scripted) -> None:
    def script(n: int, lines: list[dict], new: list[dict], conn: socket.socket) -> bool:
        conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        return True

    server = scripted(script)
    with Client(port=server.port) as c, pytest.raises(ProtocolError, match="backend port"):
        c.stats()


# -- a peer that is not pushsvc's backend port ---------------------------------------


class Peer:
    """A TCP server on a real socket that is not pushsvc: it sends ``greeting`` on
    accept, then ``answer`` for everything it reads, until the client hangs up."""

    def __init__(self, greeting: bytes, answer: bytes) -> None:
        self.greeting, self.answer = greeting, answer
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with conn:
                try:
                    conn.sendall(self.greeting)
                    while conn.recv(65536):
                        conn.sendall(self.answer)
                except OSError:
                    pass

    def close(self) -> None:
        self.listener.close()


def fails_fast(port: int, batch: int = 1) -> ProtocolError:
    """The ProtocolError a client with the default 5 s timeout gets within a second."""
    started = time.monotonic()
    with Client(port=port, retry_delay=0) as c, pytest.raises(ProtocolError) as info:
        c.push_many([(new_uid("c"), "x" * 50)] * batch)
    assert time.monotonic() - started < 1, "not within a second"
    assert c._sock is None  # out of sync: dropped
    return info.value


@pytest.mark.parametrize("batch", [1, 20000], ids=["one", "more-than-the-socket-buffers"])
def test_the_http_port_is_a_protocol_error_at_once(server: PushServer, batch: int) -> None:
    """pushsvc's own HTTP port answers the client's \\r\\n-ended line with a 400 and hangs up."""
    error = fails_fast(server.http_port, batch)
    assert f"127.0.0.1:{server.http_port} sent 'HTTP/1.1 400 Bad Request" in str(error)
    assert "not pushsvc's backend port" in str(error)


@pytest.mark.parametrize(
    ("greeting", "answer", "shown"),
    [
        (b"\x16\x03\x01\x00\xa5\x01garbage", b"", r"'\x16\x03\x01\x00\xa5\x01garbage'"),
        (b"220 mail.example.com ESMTP\r\n", b"", r"'220 mail.example.com ESMTP\r\n'"),
        (b"", b"-ERR unknown command\r\n", r"'-ERR unknown command\r\n'"),
        (b"", b"x" * 100, "'" + "x" * 60 + "'..."),
    ],
    ids=["binary-banner-no-newline", "smtp-banner", "redis-like-error", "long-no-newline"],
)
def test_a_peer_that_is_not_pushsvc_is_named(greeting, answer, shown) -> None:
    peer = Peer(greeting, answer)
    try:
        error = fails_fast(peer.port)
    finally:
        peer.close()
    assert str(error) == (
        f"127.0.0.1:{peer.port} sent {shown}, not a pushsvc reply (is it pushsvc's backend port?)"
    )


def test_a_silent_port_times_out_and_says_nothing_came_back(server: PushServer) -> None:
    """The WebSocket port waits for a handshake's blank line: only a timeout can tell."""
    with Client(port=server.ws_port, timeout=0.5) as c:
        started = time.monotonic()
        with pytest.raises(PushTimeout, match="nothing came back at all"):
            c.push(new_uid("c"), "x")
        assert time.monotonic() - started < 3


def test_read_timeout_is_not_retried(scripted) -> None:
    server = scripted(lambda n, lines, new, conn: True)  # reads, never answers
    with Client(port=server.port, timeout=0.3) as c:
        started = time.monotonic()
        with pytest.raises(PushTimeout) as info:
            c.push("u", "x")
        assert time.monotonic() - started < 3
    assert isinstance(info.value, TimeoutError) and isinstance(info.value, PushConnectionError)
    assert len(server.received) == 1 and len(server.received[0]) == 1


# -- the client object --------------------------------------------------------------


def test_addresses(server: PushServer) -> None:
    assert parse_address("tcp://127.0.0.1:5678") == ("127.0.0.1", 5678)
    assert parse_address("example.com:80") == ("example.com", 80)
    assert parse_address("localhost") == ("localhost", 5678)
    assert parse_address("[::1]:9") == ("::1", 9)
    for bad in ("http://h:1", "tcp://h:99999", "tcp://:5", "h:1/path"):
        with pytest.raises(ValueError):
            parse_address(bad)
    with pytest.raises(ValueError):
        Client(url="tcp://127.0.0.1:1", port=2)
    with Client(url=f"tcp://127.0.0.1:{server.text_port}") as c:
        assert c.port == server.text_port
        assert c.stats()["pending"] >= 0


def test_context_manager_and_close(server: PushServer) -> None:
    with Client(port=server.text_port) as c:
        c.stats()
        assert c._sock is not None
    assert c._sock is None
    c.stats()  # usable again: reconnects on demand
    c.close()


def test_threads_may_share_a_client(server: PushServer, client: Client, ws_clients) -> None:
    user = new_uid("c")
    ws = server.online(user, ws_clients)
    results: dict[int, list[int]] = {}

    def work(n: int) -> None:
        results[n] = [client.push(user if i % 2 else new_uid("c"), i) for i in range(50)]

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r == [i % 2 for i in range(50)] for r in results.values())
    received = [ws.recv(timeout=5) for _ in range(8 * 25)]
    assert sorted(received, key=int) == sorted([str(i) for i in range(50) if i % 2] * 8, key=int)


def test_a_forked_child_uses_its_own_connection(server: PushServer) -> None:
    script = f"""
import os, sys
from pushsvc.client import Client
c = Client(port={server.text_port})
c.stats()
parent_sock = c._sock
c._lock.acquire()  # as if another thread were in a call when the process forked
pid = os.fork()
if pid != 0:
    c._lock.release()
if pid == 0:
    c.stats()
    os._exit(0 if c._sock is not parent_sock else 3)
_, status = os.waitpid(pid, 0)
c.stats()
assert c._sock is parent_sock, "the parent's connection was replaced"
sys.exit(os.waitstatus_to_exitcode(status))
"""
    if not hasattr(socket, "AF_UNIX"):  # pragma: no cover - no fork there
        pytest.skip("no fork")
    proc = subprocess.run([sys.executable, "-c", script], env=child_env(), timeout=30)
    assert proc.returncode == 0


# -- commands being added to the service ----------------------------------------------


def test_groups_and_exclude(server: PushServer, client: Client, ws_clients) -> None:
    a, b, group = new_uid("c"), new_uid("c"), "g-" + new_uid("c")
    ws_a = server.online(a, ws_clients)
    ws_b = server.online(b, ws_clients)
    client.join([a, b], group)
    assert client.push(group=group, data="to the group") == 2
    assert client.push(group=group, data="not to a", exclude=a) == 1
    assert client.push([a, b], "not to b", exclude=[b]) == 1
    client.leave(b, group)
    assert client.push(group=group, data="only a") == 1
    assert [ws_a.recv(timeout=5) for _ in range(3)] == ["to the group", "not to b", "only a"]
    assert [ws_b.recv(timeout=5) for _ in range(2)] == ["to the group", "not to a"]
    assert client.members(group) == {"uids": [a], "next": None, "total": 1, "online": 1}
    with pytest.raises(RequestRejected, match="not both"):
        client.push(a, "x", group=group)


def test_broadcast_with_exclude(start_server) -> None:
    server = start_server()
    clients = [server.ws(f"x{i}") for i in range(3)]
    server.wait_for(lambda s: s["connections"] == 3)
    try:
        with Client(port=server.text_port) as c:
            assert c.broadcast("hi", exclude=["x0", "x1"]) == 1
        assert clients[2].recv(timeout=5) == "hi"
    finally:
        for w in clients:
            w.close()


def test_disconnect(server: PushServer, client: Client) -> None:
    from websockets.exceptions import ConnectionClosed

    user = new_uid("c")
    tabs = [server.ws(user), server.ws(user)]
    server.wait_for(lambda s: s["pending"] == 0)
    assert client.disconnect(user, code=4100, reason="bye") == 2
    for tab in tabs:
        with pytest.raises(ConnectionClosed):
            tab.recv(timeout=5)
        assert tab.close_code == 4100 and tab.close_reason == "bye"
    assert client.disconnect(user) == 0


def test_list_pages(start_server) -> None:
    server = start_server()
    users = sorted(f"l{i:02}" for i in range(7))
    clients = [server.ws(u) for u in users]
    server.wait_for(lambda s: s["uids"] == 7)
    try:
        with Client(port=server.text_port) as c:
            page = c.list_uids(limit=3)
            assert page["uids"] == users[:3] and page["next"] == users[2]
            assert c.list_uids(after=page["next"], limit=3)["uids"] == users[3:6]
            assert list(c.iter_uids(limit=3)) == users
            group = "everyone"
            c.join(users, group)
            assert list(c.iter_members(group, limit=2)) == users
    finally:
        for w in clients:
            w.close()


def test_push_with_ttl_is_kept_for_a_later_connection(server: PushServer, client: Client) -> None:
    user = "client-ttl-user"
    assert client.push(user, "kept", ttl=60) == 0  # nobody online: stored, not delivered
    ws = server.ws(json.dumps({"uid": user, "since": {f"u:{user}": [0, None]}}))
    frame = json.loads(ws.recv(timeout=5))
    assert (frame["pushsvc"], frame["data"], frame["off"]) == ("msg", "kept", 1)
    ws.close()
