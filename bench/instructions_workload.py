"""The workload bench/instructions.py runs under valgrind: ROUNDS reads of 100 push lines.

Or, for ``connect``, ROUNDS times 100 browser connections set up and held
(accept, handshake, 101, uid frame, a ping answered), on test transports.

Or, for ``spread``, the push lines go to 1,000 browsers in turn, each line to
the next one (as the benchmark's unicast scenario does): what a per-connection
cost that one browser hides (a lookup cache that misses from one connection
to the next) shows here.

Or, for ``cluster`` and ``cluster-spread``, the ``online`` and ``spread``
workloads through a cluster of two nodes in this one process: a
redis-server started here on a free port, two Nodes built by
``tap.make_node`` with ``--redis`` (each its own RedisBroker) on the real
reactor, the browsers on node A and the BackendProtocol on node B, so every
push crosses Redis.  Each read of 100 lines runs the reactor until all 100
replies are ``ok`` and every frame reached its browser.  Redis is another
process: valgrind counts the two nodes only.

Usage: python bench/instructions_workload.py ROUNDS KIND
(KIND: offline, online, spread, connect, cluster or cluster-spread)
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import tempfile
from typing import Any

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

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


class Watched(StringTransport):
    """A test transport that tells ``on_write`` of every write (the cluster's progress)."""

    def __init__(self, on_write: Any) -> None:
        super().__init__()
        self.on_write = on_write

    def write(self, data: bytes) -> None:
        super().write(data)
        self.on_write()


def redis_server(workdir: str) -> tuple[subprocess.Popen, int]:
    """A redis-server on a free port, ready when its log says so (no polling loop)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [shutil.which("redis-server") or "/usr/bin/redis-server", "--port", str(port)]
        + ["--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", workdir],
        stdout=subprocess.PIPE,
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        if b"Ready to accept connections" in line:
            return proc, port
    raise RuntimeError("redis-server did not start")


def cluster(rounds: int, browsers: int) -> None:
    """ROUNDS reads of 100 lines into node B for uids whose browsers are on node A.

    Both nodes are built as ``twistd push --redis URL --redis-timeout 60
    --cluster-heartbeat 60`` builds them: the long timer periods keep the
    watchdog's and the heartbeat's wall-clock ticks (valgrind runs some 50
    times slower than the CPU) out of the count.
    """
    from twisted.internet import defer, reactor

    from pushsvc.tap import PushOptions, make_node

    workdir = tempfile.mkdtemp(prefix="pushsvc-instructions-")
    proc, port = redis_server(workdir)
    options = ["--redis", f"redis://127.0.0.1:{port}", "--redis-timeout", "60"]
    options += ["--cluster-heartbeat", "60"]
    nodes = []
    for _ in range(2):
        config = PushOptions()
        config.parseOptions(options)
        nodes.append(make_node(config))
    node_a, node_b = nodes
    state: dict[str, Any] = {"frames": 0, "want_frames": 0, "done": None}
    uids = [b"b%d" % i for i in range(browsers)]
    lines = [b'{"uid":"%s","percent":"88%%"}\n' % uid for uid in uids]
    replies = Watched(lambda: progress())

    def progress() -> None:
        done = state["done"]
        if (
            done is not None
            and state["frames"] >= state["want_frames"]
            and len(replies.value()) >= 300
        ):
            state["done"] = None
            reactor.callLater(0, done.callback, None)  # outside the write that finished it

    def framed() -> None:
        state["frames"] += 1
        progress()

    def wait_until(condition: Any) -> defer.Deferred[None]:
        """Set-up only: poll the reactor until ``condition()`` holds."""
        d: defer.Deferred[None] = defer.Deferred()

        def check() -> None:
            if condition():
                d.callback(None)
            else:
                reactor.callLater(0.01, check)

        check()
        return d

    @defer.inlineCallbacks
    def drive() -> Any:
        for node in nodes:
            node.startService()
        yield wait_until(lambda: all(n.broker.home.up for n in nodes))
        seen = []
        for uid in uids:
            transport = browser(node_a, uid)
            transport.clear()
            seen.append(transport)
        for uid in uids:
            yield node_a.broker.subscribed(uid.decode())
        # Start counting frames only now: the handshakes wrote to the transports.
        for transport in seen:
            transport.__class__ = Watched
            transport.on_write = framed
        backend = BackendProtocol(node_b, 1 << 20)
        backend.makeConnection(replies)
        for r in range(rounds):
            first = r * 100 % browsers
            batch = b"".join((lines * (1 + 100 // browsers))[first : first + 100])
            state["frames"], state["want_frames"] = 0, 100
            state["done"] = d = defer.Deferred()
            backend.dataReceived(batch)
            progress()
            yield d
            assert replies.value() == b"ok\n" * 100, replies.value()[:80]
            replies.clear()
        for transport in seen[: min(rounds * 100, browsers)]:
            assert transport.value().endswith(b"\x81\x0388%"), transport.value()[-20:]
        yield defer.gatherResults([defer.maybeDeferred(n.stopService) for n in nodes])

    failure: list[Any] = []

    def finished(result: Any) -> None:
        if isinstance(result, Failure):
            failure.append(result)
        reactor.stop()

    reactor.callWhenRunning(lambda: drive().addBoth(finished))
    try:
        reactor.run()
    finally:
        proc.kill()
        proc.wait()
        shutil.rmtree(workdir, ignore_errors=True)
    if failure:
        failure[0].raiseException()


def main() -> None:
    rounds, kind = int(sys.argv[1]), sys.argv[2]
    configure()
    if kind == "connect":
        connect(rounds)
        return
    if kind in ("cluster", "cluster-spread"):
        cluster(rounds, 1 if kind == "cluster" else 1000)
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
