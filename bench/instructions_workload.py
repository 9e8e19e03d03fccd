"""The workload bench/instructions.py runs under valgrind: ROUNDS reads of 100 push lines.

Or, for ``connect``, ROUNDS times 100 browser connections set up and held
(accept, handshake, 101, uid frame, a ping answered), on test transports.

Or, for ``spread``, the push lines go to 1,000 browsers in turn, each line to
the next one (as the benchmark's unicast scenario does): what a per-connection
cost that one browser hides (a lookup cache that misses from one connection
to the next) shows here.

Usage: python bench/instructions_workload.py ROUNDS offline|online|spread|connect
"""

from __future__ import annotations

import sys

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from pushsvc.auth import UidAuthenticator
from pushsvc.backend import BackendProtocol
from pushsvc.websocket import PushServerFactory

HANDSHAKE = (
    b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)
MASK = b"\x01\x02\x03\x04"
PING = bytes([0x89, 0x81]) + MASK + bytes([ord("p") ^ MASK[0]])


def owner() -> object:
    """The object both frontends share: the node, or before the redesign the registry."""
    try:
        from pushsvc.broker.memory import MemoryBroker
        from pushsvc.history.store import MemoryStore
        from pushsvc.node import Node
    except ImportError:
        from pushsvc.registry import Registry

        return Registry()
    return Node(MemoryBroker(), MemoryStore())


def browser(shared: object, uid: bytes) -> StringTransport:
    """One browser through the real WebSocket protocol, identified as ``uid``.

    Its ping after the uid frame arrives in a read of its own, as it would
    from a real browser: the connection is then as an idle one is held
    (compacted, where the checkout does that).
    """
    factory = PushServerFactory(shared, UidAuthenticator(), ping_interval=0)
    factory.reactor = Clock()
    proto = factory.buildProtocol(None)
    transport = StringTransport()
    proto.makeConnection(transport)
    masked = bytes(c ^ MASK[i % 4] for i, c in enumerate(uid))
    proto.dataReceived(HANDSHAKE + bytes([0x81, 0x80 | len(uid)]) + MASK + masked)
    proto.dataReceived(PING)
    assert transport.value().endswith(b"\x8a\x01p"), transport.value()[-20:]
    transport.clear()
    return transport


def configure() -> None:
    """Set up as ``makeService`` does in that checkout.

    Autobahn's debug formatting off and, where the checkout has one, its
    garbage collector policy started (its timer never fires here), so that a
    full collection over what the workload holds does not land in one run's
    window and not in another's.
    """
    import txaio

    from pushsvc import compat

    txaio.set_global_log_level("info")
    compat.quiet_autobahn_debug()
    try:
        from pushsvc.gcpolicy import FullCollections
    except ImportError:
        pass
    else:
        policy = FullCollections(60)
        policy.clock = Clock()
        policy.startService()


def connect(rounds: int) -> None:
    """ROUNDS x 100 connection set-ups, all held to the end (as a server holds them)."""
    shared = owner()
    factory = PushServerFactory(shared, UidAuthenticator(), ping_interval=0)
    factory.reactor = Clock()
    held = []
    for i in range(rounds * 100):
        uid = b"u%d" % i
        proto = factory.buildProtocol(None)
        transport = StringTransport()
        proto.makeConnection(transport)
        proto.dataReceived(HANDSHAKE)
        masked = bytes(c ^ MASK[j % 4] for j, c in enumerate(uid))
        proto.dataReceived(bytes([0x81, 0x80 | len(uid)]) + MASK + masked + PING)
        assert transport.value().endswith(b"\x8a\x01p"), transport.value()[-20:]
        held.append((proto, transport))


def spread(shared: object, backend: BackendProtocol, rounds: int) -> None:
    """ROUNDS reads of 100 push lines, each line to the next of 1,000 browsers."""
    browsers = [browser(shared, b"b%d" % i) for i in range(1000)]
    lines = [b'{"uid":"b%d","percent":"88%%"}\n' % i for i in range(1000)]
    for r in range(rounds):
        first = r * 100 % 1000
        backend.dataReceived(b"".join(lines[first : first + 100]))
        assert backend.transport.value() == b"ok\n" * 100, backend.transport.value()[:80]
        backend.transport.clear()
    for seen in browsers[: min(rounds * 100, 1000)]:
        assert seen.value().endswith(b"\x81\x0388%"), seen.value()[-20:]


def main() -> None:
    rounds, kind = int(sys.argv[1]), sys.argv[2]
    configure()
    if kind == "connect":
        connect(rounds)
        return
    shared = owner()
    backend = BackendProtocol(shared, 1 << 20)
    backend.makeConnection(StringTransport())
    if kind == "spread":
        spread(shared, backend, rounds)
        return
    uid = b"online" if kind == "online" else b"nobody"
    seen = browser(shared, uid) if kind == "online" else None
    data = (b'{"uid":"' + uid + b'","percent":"88%"}\n') * 100
    reply = (b"ok\n" if seen is not None else b"fail\n") * 100
    for _ in range(rounds):
        backend.dataReceived(data)
        assert backend.transport.value() == reply, backend.transport.value()[:80]
        backend.transport.clear()
        if seen is not None:
            assert seen.value().endswith(b"\x81\x0388%")
            seen.clear()


if __name__ == "__main__":
    main()
