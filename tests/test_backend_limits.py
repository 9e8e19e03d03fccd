"""Nothing before authentication holds the backend port: auth timeout, caps, over-long lines."""

from __future__ import annotations

import json

from conftest import Backend, until
from test_http import metrics
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from pushsvc.auth import Secrets
from pushsvc.backend import BackendFactory, BackendGate
from pushsvc.broker.memory import MemoryBroker
from pushsvc.history.store import MemoryStore
from pushsvc.node import Node

SECRET = "backend-secret-0123456789"
AUTH = json.dumps({"cmd": "auth", "secret": SECRET})
ENV = {"PUSHSVC_BACKEND_SECRET": SECRET}


def closed(b: Backend) -> bool:
    return b.line() == b""


def rejected(server, reason: str) -> float:
    return metrics(server).get(f"pushsvc_rejected_total{{reason={reason}}}", 0.0)


def test_auth_timeout_uses_the_reactor_clock() -> None:
    clock = Clock()
    node = Node(MemoryBroker(), MemoryStore())
    gate = BackendGate(Secrets.parse(SECRET.encode(), "test"))
    factory = BackendFactory(node, 1024, gate, auth_timeout=5.0, clock=clock)
    silent, authed = factory.buildProtocol(None), factory.buildProtocol(None)
    silent.makeConnection(StringTransport())
    authed.makeConnection(StringTransport())
    authed.dataReceived(AUTH.encode() + b"\n")
    assert (factory.connections, factory.pending) == (2, 1)
    clock.advance(4.9)
    assert not silent.transport.disconnecting
    clock.advance(0.2)
    assert silent.transport.value() == b"error authentication timeout\n"
    assert silent.transport.disconnecting and not authed.transport.disconnecting
    assert node.metrics.rejected["backend_unauthenticated_timeout"] == 1
    silent.connectionLost()
    assert (factory.connections, factory.pending) == (1, 0)
    assert not clock.getDelayedCalls()  # the authenticated one's timer was cancelled


def test_silent_connection_is_closed_after_the_auth_timeout(start_server) -> None:
    server = start_server("--auth-timeout=0.5", env=ENV)
    with server.backend() as silent, server.backend() as b:
        assert b.request(AUTH) == b"ok"
        assert silent.line() == b"error authentication timeout\n"
        assert closed(silent)
        assert b.request('{"uid":"nobody","data":"x"}') == b"fail"  # still served
    assert rejected(server, "backend_unauthenticated_timeout") == 1


def test_unauthenticated_connections_are_capped(start_server) -> None:
    server = start_server("--max-backend-pending=3", env=ENV)
    with server.backend() as b:
        assert b.request(AUTH) == b"ok"
        waiting = [server.backend() for _ in range(3)]
        try:
            with server.backend() as extra:
                assert extra.line() == b"error too many unauthenticated backend connections\n"
                assert closed(extra)
            assert b.request('{"uid":"nobody","data":"x"}') == b"fail"
            assert waiting[0].request(AUTH) == b"ok"  # one authenticates: room for another
            with server.backend() as late:
                assert late.request(AUTH) == b"ok"
        finally:
            for w in waiting:
                w.close()
    assert rejected(server, "too_many_unauthenticated_backends") == 1


def test_over_long_first_line_closes(start_server) -> None:
    server = start_server("--max-line=100", env=ENV)
    with server.backend() as b:  # a whole line
        b.send(b"x" * 200 + b"\n" + AUTH.encode() + b"\n")
        assert b.line() == b"error line longer than 100 bytes\n"
        assert closed(b)  # the auth line after it is not read
    with server.backend() as b:  # no newline yet
        b.send(b"x" * 5000)
        assert b.line() == b"error line longer than 100 bytes\n"
        assert closed(b)
    with server.backend() as b:  # after authentication: an error, and the connection stays
        assert b.request(AUTH) == b"ok"
        assert b.request(b"x" * 200) == b"error line longer than 100 bytes"
        assert b.request('{"uid":"nobody","data":"x"}') == b"fail"


def test_backend_connections_are_capped_without_a_secret(start_server) -> None:
    server = start_server("--max-backends=2")
    first, second = server.backend(), server.backend()
    try:
        for b in (first, second):  # idle backends stay: persistent ones are normal
            assert b.request('{"cmd":"stats"}').startswith(b"{")
        with server.backend() as extra:
            assert extra.line() == b"error too many backend connections\n"
            assert closed(extra)
        first.close()
        until(lambda: metrics(server)["pushsvc_backend_connections"] == 1, what="first closed")
        with server.backend() as again:
            assert again.request('{"uid":"nobody","data":"x"}') == b"fail"
        assert second.request('{"uid":"nobody","data":"x"}') == b"fail"
    finally:
        first.close()
        second.close()
    assert rejected(server, "too_many_backends") == 1
