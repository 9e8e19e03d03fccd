"""Every library internal pushsvc relies on is still there (pushsvc/compat.py).

An upgrade of Twisted or Autobahn that removes one fails here,
naming it, instead of as a strange error in production.  The other tests
prove the check can fail: with an internal taken away, problems() names it.
"""

from __future__ import annotations

import gc
import warnings
from collections.abc import Iterator

import pytest
from autobahn.twisted.websocket import WebSocketServerProtocol
from reactor_helper import LeftInReactor, clear_leftovers
from twisted.internet import abstract, reactor

from pushsvc import compat


@pytest.fixture(autouse=True)
def _clear_reactor() -> Iterator[None]:
    """Clear what a test left in the global reactor.

    problems() leaves a live Autobahn connection's handshake timer and a TCP
    transport in the global reactor (test_the_check_leaves_nothing_in_the_reactor);
    the tests that run the reactor later must not inherit them.
    """
    yield
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LeftInReactor)
        clear_leftovers()


def test_every_internal_compat_relies_on_is_there() -> None:
    missing = compat.problems()
    assert missing == [], (
        "pushsvc/compat.py relies on library internals that this environment lacks "
        "(pin the library, or change compat.py and its caller):\n" + "\n".join(missing)
    )


def remove(monkeypatch: pytest.MonkeyPatch, owner: type, name: str) -> None:
    """Take ``name`` away from ``owner`` for one test, from the class that defines it."""
    defining = next(cls for cls in owner.__mro__ if name in vars(cls))
    monkeypatch.delattr(defining, name)


# Internals that can be taken away without breaking the library's own code that
# compat.problems() runs (Autobahn's own calls to pformat and hltype would fail first).
@pytest.mark.parametrize(
    ("owner", "name", "named"),
    [
        (abstract.FileDescriptor, "dataBuffer", "tcp.Server.dataBuffer"),
        (abstract.FileDescriptor, "_writeDisconnected", "tcp.Server._writeDisconnected"),
        (WebSocketServerProtocol, "sendCloseFrame", "WebSocketServerProtocol.sendCloseFrame"),
        (WebSocketServerProtocol, "dropConnection", "WebSocketServerProtocol.dropConnection"),
    ],
    ids=["dataBuffer", "_writeDisconnected", "sendCloseFrame", "dropConnection"],
)
def test_a_missing_internal_is_named(
    monkeypatch: pytest.MonkeyPatch, owner: type, name: str, named: str
) -> None:
    remove(monkeypatch, owner, name)
    found = compat.problems()
    assert [line for line in found if named in line], found


def test_protocol_options_of_another_shape_are_named(monkeypatch: pytest.MonkeyPatch) -> None:
    options = tuple(WebSocketServerProtocol.CONFIG_ATTRS)
    monkeypatch.setattr(WebSocketServerProtocol, "CONFIG_ATTRS", options)
    found = compat.problems()
    assert [line for line in found if "CONFIG_ATTRS" in line], found


def test_the_check_closes_the_sockets_it_opens() -> None:
    """problems() looks at a real TCP transport over a socket pair; both ends must be closed."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        compat.problems()
        gc.collect()
    unclosed = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
    assert not unclosed, unclosed


def test_the_check_leaves_nothing_in_the_reactor() -> None:
    """The live transport and connection problems() inspects must not stay in the reactor."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LeftInReactor)
        clear_leftovers()
    registered = {*reactor.getReaders(), *reactor.getWriters()}  # the reactor's own
    compat.problems()
    calls = reactor.getDelayedCalls()
    selectables = {*reactor.getReaders(), *reactor.getWriters()} - registered
    assert not calls and not selectables, (
        f"problems() left delayed calls {calls} and registered sockets {selectables}"
    )


def test_a_send_queue_of_another_kind_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    from autobahn.websocket import protocol

    monkeypatch.setattr(protocol, "deque", list)  # what _connectionMade builds it from
    found = compat.problems()
    assert [line for line in found if "send_queue" in line], found


def test_an_idle_connection_keeps_a_small_dict_and_still_works() -> None:
    """After the handshake, the uid frame and a ping: a small dict, then a push and a close."""
    import sys

    from autobahn.websocket.protocol import PreparedMessage
    from twisted.internet.task import Clock
    from twisted.internet.testing import StringTransport

    from pushsvc.auth import UidAuthenticator
    from pushsvc.broker.memory import MemoryBroker
    from pushsvc.history.store import MemoryStore
    from pushsvc.node import Node
    from pushsvc.websocket import COMPACT_ABOVE, HOT, PushServerFactory

    def masked(opcode: int, payload: bytes) -> bytes:
        key = b"\x01\x02\x03\x04"
        body = bytes(c ^ key[i % 4] for i, c in enumerate(payload))
        return bytes([0x80 | opcode, 0x80 | len(payload)]) + key + body

    node = Node(MemoryBroker(), MemoryStore())
    factory = PushServerFactory(node, UidAuthenticator(), ping_interval=0)
    factory.reactor = Clock()
    conn = factory.buildProtocol(None)
    transport = StringTransport()
    conn.makeConnection(transport)
    conn.dataReceived(
        b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    assert transport.value().startswith(b"HTTP/1.1 101")
    conn.dataReceived(masked(0x1, b"alice") + masked(0x9, b"p"))
    assert conn.uid == "alice" and transport.value().endswith(b"\x8a\x01p")  # the pong
    assert not set(compat.HANDSHAKE_ONLY) & set(vars(conn))  # released once open
    assert len(vars(conn)) <= COMPACT_ABOVE, sorted(vars(conn))
    assert sys.getsizeof(vars(conn)) <= 500  # Autobahn's own: 1,584 bytes (74 attributes)
    assert type(conn.send_queue) is compat.SendQueue
    # What a push reads is the connection's own, even where its class holds the same value.
    assert set(compat._SEND_PATH + HOT) <= set(vars(conn)), sorted(vars(conn))
    conn.sendPreparedMessage(PreparedMessage(b"hi", False, False, False))  # Autobahn's path
    assert transport.value().endswith(b"\x81\x02hi")
    assert node.push(["alice"], b"yo") == 1
    assert transport.value().endswith(b"\x81\x02yo")
    conn.dataReceived(masked(0x8, b"\x03\xe8"))  # close 1000: answered, then dropped
    assert transport.value().endswith(b"\x88\x02\x03\xe8")
    assert conn.state == conn.STATE_CLOSED or transport.disconnecting


def test_the_101_response_leaves_before_the_next_reactor_turn() -> None:
    """On a real TCP transport the 101 is in the peer's socket without Twisted's queued write."""
    from twisted.internet.task import Clock

    from pushsvc.auth import UidAuthenticator
    from pushsvc.broker.memory import MemoryBroker
    from pushsvc.history.store import MemoryStore
    from pushsvc.node import Node
    from pushsvc.websocket import PushServerFactory

    node = Node(MemoryBroker(), MemoryStore())
    factory = PushServerFactory(node, UidAuthenticator(), ping_interval=0)
    factory.reactor = Clock()
    server, peer = compat._tcp_server()
    conn = factory.buildProtocol(None)
    try:
        conn.makeConnection(server)
        conn.dataReceived(
            b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        assert not server.dataBuffer and not server._tempDataLen  # nothing left for a later turn
        peer.settimeout(0)
        assert peer.recv(4096).startswith(b"HTTP/1.1 101")  # no reactor turn ran
        assert conn.state == conn.STATE_OPEN
    finally:
        conn.transport.stopReading()
        server.stopWriting()
        server.socket.close()
        peer.close()
        factory.handshakes.discard(conn)
