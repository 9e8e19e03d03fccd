"""Every place pushsvc touches a library's internals, and nowhere else.

Each shortcut here was found by profiling or needed for correctness, and each
relies on something a library does not promise.  ``problems()`` checks that
every internal is still there; tests/test_compat.py runs it, so an upgrade
that breaks one fails with a message naming it instead of a strange error in
production.  The version pins in pyproject.toml follow from this module.

Tested with Twisted 23.10 - 26.10, Autobahn 23.1 - 26.11.
"""

from __future__ import annotations

import inspect
import re
from collections import deque
from collections.abc import Callable
from operator import attrgetter, itemgetter
from typing import Any

from twisted.internet import tcp

# -- Twisted: write a frame at once (tcp.Server._tempDataLen, dataBuffer, _writeDisconnected)


def write_now(transport: Any, data: bytes) -> bool:
    """``transport.write(data)``, but sent at once when nothing is queued ahead of it.

    Twisted's TCP transport queues every write, asks epoll to report the
    socket writable, sends on the next reactor turn and unregisters again:
    two ``epoll_ctl`` system calls per frame on top of the ``send()``.  Like
    asyncio, try ``send()`` first when the transport holds nothing, and hand
    Twisted only what the kernel did not take (and any error, which its own
    write path then reports as usual).

    False when the ``send()`` failed because the connection is gone (the
    peer reset it): the bytes will never arrive, and a push must not count
    them as delivered.  True when they were sent or queued.
    """
    if (
        type(transport) is tcp.Server
        and not transport._tempDataLen
        and not transport.dataBuffer
        and transport.connected
        and not transport._writeDisconnected
    ):
        try:
            sent = transport.socket.send(data)
        except BlockingIOError:  # the kernel's buffer is full: Twisted queues it
            sent = 0
        except OSError:  # ECONNRESET, EPIPE: Twisted's own write finds it and closes
            transport.write(data)
            return False
        if sent == len(data):
            return True
        data = data[sent:]
    transport.write(data)
    return True


# -- Twisted: a transport's producer slot (FileDescriptor.producer / _producer) --------


def replace_producer(transport: Any, producer: Any) -> None:
    """Register ``producer`` on ``transport``, replacing one left by a previous owner.

    Under ``WebSocketResource`` the HTTP channel registered itself as the
    transport's producer before handing the transport over; it no longer
    writes to it, and a transport takes one producer only.  TLS transports
    keep it as ``_producer``.
    """
    if (
        getattr(transport, "producer", None) is not None
        or getattr(transport, "_producer", None) is not None
    ):
        transport.unregisterProducer()
    transport.registerProducer(producer, True)


# -- Autobahn: module-level debug formatting helpers (pformat, hltype, hlval) ----------


# ``"".format(...)`` is "" whatever it is given, and a C call: Autobahn calls
# these ~15 times per connection set-up, and a Python function here cost each
# call a frame.
_unformatted = "".format


DEBUG_FORMATTERS = ("pformat", "hltype", "hlval")


def quiet_autobahn_debug() -> None:
    """Stop Autobahn from formatting debug-log arguments that nobody will read.

    Autobahn writes ``self.log.debug("...", attrs=pformat(...))`` and
    ``func=hltype(...)``: the arguments are built before the (disabled) debug
    call returns, which cost a third of the CPU of each new connection
    (``pformat`` of 29 options) and an eighth of each sent frame (colour
    formatting).  Those helpers only feed debug lines, so with debug logging
    off they are replaced by a no-op in Autobahn's WebSocket modules.
    """
    for module in _autobahn_modules():
        for name in DEBUG_FORMATTERS:
            if hasattr(module, name):
                setattr(module, name, _unformatted)


def _autobahn_modules() -> list[Any]:
    import autobahn.twisted.websocket as twisted_websocket
    import autobahn.websocket.protocol as websocket_protocol

    return [websocket_protocol, twisted_websocket]


# -- Autobahn: options on the protocol class (WebSocketServerProtocol.CONFIG_ATTRS) ----


def protocol_with_options(factory: Any) -> type:
    """A protocol class of ``factory``'s own that holds its options as class attributes.

    Autobahn copies every option from the factory onto each connection unless
    the protocol class already has it; with the options on the class, a
    connection stores none (less memory and set-up per connection).  Callables
    such as ``perMessageCompressionAccept`` stay plain functions.  The class
    also holds the values every open connection starts with
    (:func:`connection_defaults`), so that :func:`compact` can drop them from
    each connection.
    """
    base = factory.protocol
    options = {
        name: staticmethod(value) if callable(value) else value
        for name in base.CONFIG_ATTRS
        for value in [getattr(factory, name)]
    }
    defaults = {k: v for k, v in connection_defaults().items() if not hasattr(base, k)}
    return type(base.__name__, (base,), {**defaults, **options})


# -- Autobahn: per-connection state after the opening handshake (_connectionMade,
# processHandshake, succeedHandshake, send_queue).  Tested with Autobahn 23.1 - 26.11:
# _connectionMade sets ~60 attributes on each connection, processHandshake ~15 more, so
# CPython gives each connection a dict of its own (no key sharing past 30 keys) of
# 1,584 bytes, and send_queue is a deque of 760 bytes that is empty nearly always.

# Read by Autobahn only while it parses the request and writes the 101 response.
HANDSHAKE_ONLY = (
    "http_request_data",
    "http_headers",
    "http_response_data",
    "http_status_line",
    "http_request_uri",
    "http_request_path",
    "http_request_params",
    "http_request_host",
    "websocket_origin",
    "websocket_protocols",
    "websocket_extensions",
    "_wskey",
)
# The frame parser's per-frame objects: set again at each frame (or message) before use.
FRAME_STATE = ("current_frame_masker", "utf8validateLast")
_SCALARS = (type(None), bool, int, float, str, bytes)
_defaults: dict[str, object] = {}


class SendQueue(list):
    """Autobahn's send queue as a list (56 bytes empty, a deque is 760): append, popleft, len.

    It holds the chunks of a write Autobahn chops or syncs, rarely more than a few.
    """

    __slots__ = ()

    def popleft(self) -> Any:
        return self.pop(0)


def connection_defaults() -> dict[str, object]:
    """The scalar attributes (flags, counters, None) of a freshly opened server connection."""
    if not _defaults:
        proto = _opened_probe()
        found = {k: v for k, v in vars(proto).items() if type(v) in _SCALARS}
        found.pop("peer", None)
        _defaults.update(found)
        _defaults.update(dict.fromkeys(HANDSHAKE_ONLY + FRAME_STATE))
    return _defaults


def compact(conn: Any, hot: tuple[str, ...] = ()) -> None:
    """Shrink an open connection's state: drop what its class holds and what the handshake used.

    Attributes equal to the class's value (see :func:`protocol_with_options`),
    the handshake-only ones and, between frames, the parser's per-frame objects
    go; an empty deque send queue becomes a :class:`SendQueue`.  The dict is
    rebuilt, as a dict never shrinks when keys are deleted.  Autobahn sets an
    attribute again when it changes it.  What every push reads (what
    :func:`send_prepared` reads, and the caller's ``hot`` attributes) stays in
    the dict, first, whatever its value: CPython 3.11 reads an instance
    attribute through a cached slot, but one that only its class holds
    through a lookup along the class's long MRO.

    Connections of one class reach this point with the same ~75 keys in the
    same order, so the first one compacted between frames leaves a
    :class:`_Layout`; the next ones with that layout are rebuilt from it by
    position (C-level lookups instead of a Python loop over every key),
    provided each value it would drop is still the class's.
    """
    cls = type(conn)
    state = conn.__dict__
    first = _SEND_PATH + hot
    between_frames = conn.current_frame is None
    if between_frames:
        layout = _layouts.get(cls)
        if layout is not None and layout.first == first and tuple(state) == layout.keys:
            values = tuple(state.values())
            if layout.dropped(values) == layout.defaults:
                kept = {name: getattr(conn, name) for name in first}
                kept.update(zip(layout.names, layout.kept(values), strict=True))
                _finish(conn, kept)
                return
    defaults = _class_values.get(cls)
    if defaults is None:
        defaults = _class_values[cls] = _scalar_class_values(cls)
    drop = _DROP_BETWEEN_FRAMES if between_frames else _DROP
    # Identity, not equality: Autobahn assigns the same None, True, False, small
    # ints and empty bytes objects the class holds (CPython caches them).
    kept = {name: getattr(conn, name) for name in first}
    for name, value in state.items():
        if name not in drop and defaults.get(name, _ABSENT) is not value:
            kept[name] = value
    if between_frames and cls not in _layouts:
        _layouts[cls] = _Layout.learn(state, kept, defaults, first)
    _finish(conn, kept)


def _finish(conn: Any, kept: dict[str, Any]) -> None:
    queue = kept.get("send_queue")
    if type(queue) is deque and not queue:
        kept["send_queue"] = SendQueue()
    conn.__dict__ = kept


class _Layout:
    """The key order of one compacted connection, and which of its positions were dropped.

    A later connection with the same keys in the same order (and the same
    attributes kept first) drops the same positions when their values equal
    (``==``, which tries ``is`` first) the class's values held here, and keeps
    every other position, whatever its value; otherwise :func:`compact` falls
    back to its loop.
    """

    __slots__ = ("defaults", "dropped", "first", "keys", "kept", "names")

    def __init__(
        self, keys: tuple, names: tuple, kept: list, dropped: list, defaults: tuple, first: tuple
    ) -> None:
        self.keys = keys
        self.names = names
        self.kept = itemgetter(*kept)
        self.dropped = itemgetter(*dropped)
        self.defaults = defaults
        self.first = first

    @classmethod
    def learn(
        cls, state: dict[str, Any], kept: dict[str, Any], defaults: dict, first: tuple
    ) -> _Layout | None:
        """The layout of ``state`` compacted to ``kept``; None if too small to hold one."""
        keys = tuple(state)
        keep = [i for i, name in enumerate(keys) if name in kept]
        # Dropped because the value was the class's: checked again each time.
        # The rest were dropped whatever their value (handshake, frame state).
        check = [
            i
            for i, name in enumerate(keys)
            if name not in kept and name not in _DROP_BETWEEN_FRAMES
        ]
        if len(keep) < 2 or len(check) < 2:  # itemgetter of one index gives no tuple
            return None
        names = tuple(keys[i] for i in keep)
        defaults_kept = tuple(defaults[keys[i]] for i in check)
        return cls(keys, names, keep, check, defaults_kept, first)


_layouts: dict[type, _Layout | None] = {}
_ABSENT = object()  # no class value: never the connection's value
_SEND_PATH = ("_perMessageCompress", "send_queue", "transport")
_DROP = frozenset(HANDSHAKE_ONLY)
_DROP_BETWEEN_FRAMES = frozenset(HANDSHAKE_ONLY + FRAME_STATE)
_class_values: dict[type, dict[str, object]] = {}


def _scalar_class_values(cls: type) -> dict[str, object]:
    """The class's scalar attributes (its own, its bases', the connection defaults)."""
    names = set(connection_defaults())
    for klass in cls.__mro__:
        names.update(name for name, value in vars(klass).items() if type(value) in _SCALARS)
    values = {name: getattr(cls, name, _class_values) for name in names}
    return {name: value for name, value in values.items() if type(value) in _SCALARS}


# -- Autobahn: connection state (_perMessageCompress, send_queue, sendCloseFrame, wasClean,
# wasNotCleanReason, sendHttpErrorResponse)


def send_prepared(conn: Any, prepared: Any, direct: bool) -> bool:
    """Send a prepared frame; straight to the socket when ``direct`` and nothing is in the way.

    Autobahn's own path (``sendData``) builds debug-log arguments and queues
    the write for the next reactor turn; an open, uncompressed connection
    with nothing in Autobahn's send queue needs none of that.  The caller
    says whether it may go direct (not while its send-queue guard counts).
    False when the socket said the connection is gone (``write_now``).
    """
    if direct and conn._perMessageCompress is None and not conn.send_queue:
        return write_now(conn.transport, prepared.payloadHybi)
    conn.sendPreparedMessage(prepared)
    return True


def send_response_now(conn: Any, data: bytes) -> bool:
    """Send the opening handshake's response (101, or an HTTP error) at once; False if queued.

    Autobahn writes it through Twisted's queued write: an ``epoll_ctl`` pair and
    a reactor turn per connection before the ``send()``.  Its traffic counter
    is kept as Autobahn keeps it.
    """
    if conn.send_queue:
        return False
    write_now(conn.transport, data)
    conn.trafficStats.preopenOutgoingOctetsWireLevel += len(data)
    return True


def close_with(conn: Any, code: int, reason: bytes) -> None:
    """Send a close frame with a code ``sendClose`` refuses (1001, 1008: only 1000, 3000-4999)."""
    conn.sendCloseFrame(code, reason, isReply=False)


def unclean_drop(conn: Any) -> str | None:
    """Why Autobahn is about to drop a connection uncleanly; None for a clean or repeated drop."""
    if conn.wasClean or conn.state == conn.STATE_CLOSED:
        return None
    return conn.wasNotCleanReason or "connection dropped"


def refuse_handshake(conn: Any, code: int, reason: str, headers: Any) -> None:
    """Answer the opening handshake with an HTTP error and drop, as an orderly end.

    Autobahn's ``failHandshake`` logs two lines per refusal; this sends the
    same response (``sendHttpErrorResponse``) and marks the drop clean, so
    nothing is logged per connection.
    """
    conn.wasNotCleanReason = reason
    conn.sendHttpErrorResponse(code, reason, headers)
    conn.wasClean = True
    conn.dropConnection(abort=False)


def drop_quietly(conn: Any, drop: Callable[[bool], None], abort: bool) -> None:
    """Run Autobahn's ``dropConnection`` without its warning line per connection.

    It warns when ``wasClean`` is False; the caller has already logged the
    drop (rate-limited), so ``wasClean`` is set only while the drop runs.
    """
    conn.wasClean = True
    try:
        drop(abort)
    finally:
        conn.wasClean = False


# -- Autobahn: the opening handshake (WebSocketServerProtocol.processHandshake, self.data)
# Tested with Autobahn 23.1 - 26.11: while STATE_CONNECTING, _dataReceived appends
# every read to self.data and processHandshake searches all of it for the blank
# line again, with no size limit (until openHandshakeTimeout).


class HandshakeTooLarge(Exception):
    """The request line and headers passed the byte limit without ending."""


class HandshakeReader:
    """Collects an opening handshake with a byte limit and linear work per received byte.

    Autobahn's own buffering costs a copy of the whole buffer and a search
    from its start on every read (quadratic: one endless header used a core
    and 31 MB in 10 s).  Here each read is appended to one bytearray and only
    the new bytes (and three before them) are searched; the complete head is
    then handed to Autobahn in one ``dataReceived``, which parses it once.
    """

    __slots__ = ("_buffer", "_scanned", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._buffer = bytearray()
        self._scanned = 0

    def feed(self, data: bytes) -> bytes | None:
        """The whole buffer once it holds the end of the headers; None while it does not.

        Raises HandshakeTooLarge once the headers (up to their blank line)
        pass ``limit`` bytes.
        """
        buffer = self._buffer
        buffer += data
        end = buffer.find(b"\r\n\r\n", max(0, self._scanned - 3))
        if end < 0:
            self._scanned = len(buffer)
            if len(buffer) > self.limit:
                raise HandshakeTooLarge(len(buffer))
            return None
        if end + 4 > self.limit:
            raise HandshakeTooLarge(end + 4)
        head = bytes(buffer)
        self._buffer = bytearray()
        return head


# -- the check ---------------------------------------------------------------------------


def problems() -> list[str]:
    """What is missing of the internals above, one line each (empty when all is well)."""
    from autobahn.twisted.websocket import WebSocketServerProtocol

    found = []
    server, peer = _tcp_server()
    for name in ("_tempDataLen", "dataBuffer", "_writeDisconnected", "connected", "socket"):
        if not hasattr(server, name):
            found.append(f"twisted.internet.tcp.Server.{name} (used by compat.write_now)")
    server.stopReading()
    server.socket.close()
    peer.close()
    modules = _autobahn_modules()
    for name in DEBUG_FORMATTERS:
        if not any(hasattr(m, name) for m in modules):
            found.append(f"autobahn.websocket.protocol.{name} (compat.quiet_autobahn_debug)")
    found += _handshake_problems()
    found += _compact_problems()
    if not isinstance(getattr(WebSocketServerProtocol, "CONFIG_ATTRS", None), list):
        found.append("WebSocketServerProtocol.CONFIG_ATTRS (compat.protocol_with_options)")
    if not hasattr(_opened_probe().trafficStats, "preopenOutgoingOctetsWireLevel"):
        found.append("TrafficStats.preopenOutgoingOctetsWireLevel (compat.send_response_now)")
    for name in (
        "sendCloseFrame",
        "dropConnection",
        "sendHttpErrorResponse",
        "_perMessageCompress",
        "send_queue",
        "wasClean",
        "wasNotCleanReason",
    ):
        if not hasattr(WebSocketServerProtocol, name) and name not in _instance_attrs():
            found.append(f"WebSocketServerProtocol.{name} (compat)")
    return found + _failure_problems()


def _handshake_problems() -> list[str]:
    """HandshakeReader relies on Autobahn parsing a complete head given in one read."""
    from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
    from twisted.internet.testing import StringTransport

    proto = WebSocketServerProtocol()
    proto.factory = WebSocketServerFactory()
    proto.factory.setProtocolOptions(openHandshakeTimeout=0)
    transport = StringTransport()
    proto.makeConnection(transport)
    if proto.state != WebSocketServerProtocol.STATE_CONNECTING:
        return ["WebSocketServerProtocol.STATE_CONNECTING at connect (compat.HandshakeReader)"]
    proto.dataReceived(
        b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    if proto.state != WebSocketServerProtocol.STATE_OPEN:
        return ["Autobahn did not open on a complete head in one read (compat.HandshakeReader)"]
    return []


def _tcp_server() -> tuple[tcp.Server, Any]:
    """A real accepted-connection transport over a socket pair, to look at its attributes."""
    import socket

    from twisted.internet import reactor
    from twisted.internet.protocol import Protocol

    class Port:
        _realPortNumber = 0

    mine, theirs = socket.socketpair()
    return tcp.Server(mine, Protocol(), ("127.0.0.1", 0), Port(), 0, reactor), theirs


def _opened_probe() -> Any:
    """A server connection through Autobahn's opening handshake, on a test transport."""
    from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
    from twisted.internet.testing import StringTransport

    proto = WebSocketServerProtocol()
    proto.factory = WebSocketServerFactory()
    proto.factory.setProtocolOptions(openHandshakeTimeout=0, autoPingInterval=0)
    proto.makeConnection(StringTransport())
    proto.dataReceived(
        b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    # A masked text frame "a", then a masked ping: the parser's state between frames.
    proto.dataReceived(b"\x81\x81\x01\x02\x03\x04\x60\x89\x80\x01\x02\x03\x04")
    return proto


def _compact_problems() -> list[str]:
    """What :func:`compact` relies on: the handshake-only names, a deque send queue."""
    from autobahn.websocket import protocol

    proto = _opened_probe()
    found = []
    if proto.state != proto.STATE_OPEN:
        found.append("Autobahn did not open the probe connection (compat.compact)")
    missing = [name for name in HANDSHAKE_ONLY if name not in vars(proto)]
    if missing:
        found.append(f"WebSocketServerProtocol.{missing} after the handshake (compat.compact)")
    if proto.current_frame is not None or any(name not in vars(proto) for name in FRAME_STATE):
        found.append(f"WebSocketProtocol.{FRAME_STATE} between frames (compat.compact)")
    if type(vars(proto).get("send_queue")) is not deque:
        found.append("WebSocketProtocol.send_queue is no longer a deque (compat.SendQueue)")
    source = inspect.getsource(protocol.WebSocketProtocol)
    uses = set(re.findall(r"self\.send_queue\.(\w+)", source))
    if not uses <= {"append", "popleft"}:
        found.append(f"send_queue used with {sorted(uses)} (compat.SendQueue)")
    return found


def _instance_attrs() -> set[str]:
    """Attributes Autobahn sets per connection (in ``_connectionMade``), read from a live one."""
    from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
    from twisted.internet.testing import StringTransport

    proto = WebSocketServerProtocol()
    proto.factory = WebSocketServerFactory()
    proto.factory.setProtocolOptions(openHandshakeTimeout=0)  # no timer left behind
    proto.makeConnection(StringTransport())
    return set(vars(proto))


# == Issue 11 part B: Autobahn's warning per failed connection ==========================
# (WebSocketProtocol._fail_connection's log line; failedByMe, localCloseCode,
# localCloseReason).  Tested with Autobahn 23.1 - 26.11.

FAIL_FORMAT = 'failing WebSocket connection (code={code}): "{reason}"'


class FailureLog:
    """A protocol class's ``log`` without Autobahn's warning per failed connection.

    ``_fail_connection`` (a protocol violation: 1002, invalid UTF-8: 1007, a
    frame too big: 1009) warns through the class's txaio logger for every
    connection, with the peer's reason text; a flood of bad frames would be a
    flood of lines.  This logger drops that one line (the protocol counts and
    logs failures itself, rate-limited: :func:`failure_of`) and passes
    everything else on.
    """

    __slots__ = ("_real",)

    def __init__(self, real: Any) -> None:
        self._real = real

    # Autobahn calls ``self.log.debug(...)`` ~15 times per connection set-up.
    # The real logger's method is read through a property in C, not through
    # ``__getattr__``, which CPython calls only after a failed lookup has raised
    # an AttributeError.  Read on each call, so a level change (txaio rebinds
    # these methods) still applies.
    critical = property(attrgetter("_real.critical"))
    error = property(attrgetter("_real.error"))
    failure = property(attrgetter("_real.failure"))
    info = property(attrgetter("_real.info"))
    debug = property(attrgetter("_real.debug"))
    trace = property(attrgetter("_real.trace"))

    def warn(self, format: str | None = None, **kwargs: object) -> None:
        if format == FAIL_FORMAT:
            return
        self._real.warn(format, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


def failure_of(conn: Any) -> tuple[int, str] | None:
    """The close code and reason Autobahn failed ``conn`` with; None if it did not fail it."""
    if not getattr(conn, "failedByMe", False):
        return None
    reason = conn.localCloseReason or b""
    return conn.localCloseCode or 0, reason.decode("utf-8", "replace")


def _failure_problems() -> list[str]:
    """The internals of this section that are gone (part of :func:`problems`)."""
    import inspect

    from autobahn.websocket.protocol import WebSocketProtocol

    found = []
    try:
        source = inspect.getsource(WebSocketProtocol._fail_connection)
    except (AttributeError, OSError, TypeError):
        source = ""
    if FAIL_FORMAT not in source:
        found.append("WebSocketProtocol._fail_connection's warning (compat.FailureLog)")
    attrs = _instance_attrs()
    for name in ("failedByMe", "localCloseCode", "localCloseReason"):
        if name not in attrs and not hasattr(WebSocketProtocol, name):
            found.append(f"WebSocketProtocol.{name} (compat.failure_of)")
    return found
