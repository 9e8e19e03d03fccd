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


def test_a_push_to_a_connection_its_peer_reset_is_not_delivered() -> None:
    """A browser gone with a TCP reset: its send() fails, so the push says 0, not 1 (``ok``).

    No reactor turn runs between the reset and the push (as when a push is in
    the same read as the backend's request): only the socket knows.
    """
    import socket
    import struct

    from twisted.internet.protocol import Protocol
    from twisted.internet.task import Clock

    from pushsvc.auth import UidAuthenticator
    from pushsvc.broker.memory import MemoryBroker
    from pushsvc.history.store import MemoryStore
    from pushsvc.node import Node
    from pushsvc.websocket import PushServerFactory

    class Port:
        _realPortNumber = 0

    listener = socket.create_server(("127.0.0.1", 0))
    peer = socket.create_connection(listener.getsockname())
    accepted, address = listener.accept()
    listener.close()
    server = compat.tcp.Server(accepted, Protocol(), address, Port(), 0, reactor)
    node = Node(MemoryBroker(), MemoryStore())
    factory = PushServerFactory(node, UidAuthenticator(), ping_interval=0)
    factory.reactor = Clock()
    conn = factory.buildProtocol(None)
    key = b"\x01\x02\x03\x04"
    try:
        conn.makeConnection(server)
        conn.dataReceived(
            b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        uid = bytes(c ^ key[i % 4] for i, c in enumerate(b"alice"))
        conn.dataReceived(bytes([0x81, 0x80 | 5]) + key + uid)
        assert conn.uid == "alice"
        assert node.push(["alice"], b"before") == 1
        frames_before = node.hub.frames_sent
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        peer.close()  # a reset, not a FIN
        assert node.push(["alice"], b"after") == 0
        assert node.hub.frames_sent == frames_before  # not counted as sent either
    finally:
        conn.transport.stopReading()
        server.stopWriting()
        server.socket.close()
        factory.handshakes.discard(conn)


def test_compact_keeps_what_differs_from_the_class_by_identity() -> None:
    """compact() drops class values and handshake state, keeps everything else as it was."""
    from collections import deque

    class Conn:
        current_frame = None
        state = 3
        closed = False
        send_queue = None
        transport = None  # kept whatever its value, with the rest of the send path
        _perMessageCompress = None

    shared = object()
    conn = Conn()
    conn.__dict__.update(
        state=3,  # the class's own object: dropped
        closed=0,  # equal to the class's False, but not it: kept
        peer=shared,
        http_headers={"host": "x"},  # handshake-only: dropped
        current_frame_masker=object(),  # between frames: dropped
        send_queue=deque(),
    )
    compat.compact(conn)
    assert sorted(vars(conn)) == [
        "_perMessageCompress",
        "closed",
        "peer",
        "send_queue",
        "transport",
    ], vars(conn)
    assert conn.closed == 0 and type(conn.closed) is int and conn.peer is shared
    assert type(conn.send_queue) is compat.SendQueue and conn.state == 3

    conn.current_frame = frame = object()  # inside a frame: the parser's objects stay
    conn.current_frame_masker = masker = object()
    conn.send_queue = deque([b"x"])  # not empty: stays a deque
    compat.compact(conn)
    assert conn.current_frame is frame and conn.current_frame_masker is masker
    assert type(conn.send_queue) is deque


def test_the_failure_log_follows_the_real_loggers_level() -> None:
    """FailureLog reads the txaio logger's methods on each call: a level change applies."""
    import txaio

    real = txaio.make_logger()
    log = compat.FailureLog(real)
    try:
        real.set_log_level("debug")
        assert log.debug == real.debug and log.debug != txaio.tx._no_op
        real.set_log_level("info")
        assert log.debug == real.debug == txaio.tx._no_op and log.info == real.info
    finally:
        real.set_log_level("info", keep=False)
    log.warn(compat.FAIL_FORMAT, code=1002, reason="x")  # dropped, no error
    assert log.emit == real.emit  # anything else through __getattr__


def test_quieted_debug_formatters_return_nothing_for_any_arguments() -> None:
    assert compat._unformatted({"a": [1, 2]}, object(), key="{0}") == ""


def test_compact_by_layout_gives_what_the_loop_gives(monkeypatch: pytest.MonkeyPatch) -> None:
    """The second connection of a class is rebuilt from the first's layout, to the same result.

    A value the layout would drop that is no longer the class's is kept (the loop
    decides then), and every attribute reads as before compacting.
    """
    from twisted.internet.task import Clock
    from twisted.internet.testing import StringTransport

    from pushsvc import websocket
    from pushsvc.auth import UidAuthenticator
    from pushsvc.broker.memory import MemoryBroker
    from pushsvc.history.store import MemoryStore
    from pushsvc.node import Node

    limit = websocket.COMPACT_ABOVE
    monkeypatch.setattr(websocket, "COMPACT_ABOVE", 1 << 30)  # compacted by hand below
    factory = websocket.PushServerFactory(
        Node(MemoryBroker(), MemoryStore()), UidAuthenticator(), ping_interval=0
    )
    factory.reactor = Clock()

    def opened(uid: bytes) -> websocket.PushServerProtocol:
        conn = factory.buildProtocol(None)
        conn.makeConnection(StringTransport())
        key = b"\x01\x02\x03\x04"
        body = bytes(c ^ key[i % 4] for i, c in enumerate(uid))
        conn.dataReceived(
            b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
            + bytes([0x81, 0x80 | len(uid)])
            + key
            + body
        )
        assert conn.uid == uid.decode() and conn.current_frame is None
        return conn

    def compacted(conn: websocket.PushServerProtocol) -> dict:
        reads = {
            name: getattr(conn, name)
            for name in vars(conn)
            if name not in compat.HANDSHAKE_ONLY + compat.FRAME_STATE and name != "send_queue"
        }
        compat.compact(conn, websocket.HOT)
        assert all(getattr(conn, name) is value for name, value in reads.items())
        assert list(vars(conn))[:6] == list(compat._SEND_PATH + websocket.HOT)  # first
        return vars(conn)

    first = compacted(opened(b"a"))  # the loop; the layout learned
    layout = compat._layouts[factory.protocol]
    assert layout is not None and len(first) <= limit
    used = []
    kept = layout.kept
    layout.kept = lambda values: used.append(1) or kept(values)
    second = compacted(opened(b"b"))  # by the layout
    assert used == [1]
    assert list(second) == list(first) and second["uid"] == "b"
    odd = opened(b"c")
    odd.wasClean = True  # the class's False: the layout would drop it
    third = compacted(odd)
    assert third["wasClean"] is True and set(third) - set(first) == {"wasClean"}
