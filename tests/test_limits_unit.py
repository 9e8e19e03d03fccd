"""The limit and access building blocks in-process: no server, no sockets, fast."""

from __future__ import annotations

import resource
import time

import pytest
from rawws import TEXT, frame, request
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from pushsvc.auth import UidAuthenticator
from pushsvc.broker.memory import MemoryBroker
from pushsvc.compat import HandshakeReader, HandshakeTooLarge
from pushsvc.history.store import MemoryStore
from pushsvc.node import Node
from pushsvc.policy import (
    ConnectionCaps,
    Deadlines,
    FailureThrottle,
    SendQueueGuard,
    TokenBucket,
    default_max_connections,
    peer_ip,
)
from pushsvc.websocket import PushServerFactory


class HTTPChannelStandIn:
    """What Twisted Web leaves registered on a transport that WebSocketResource takes over."""

    def pauseProducing(self) -> None: ...

    def resumeProducing(self) -> None: ...

    def stopProducing(self) -> None: ...


def connected(max_queue: int, take_over: bool = False):
    node = Node(MemoryBroker(), MemoryStore())
    factory = PushServerFactory(node, UidAuthenticator(), max_queue=max_queue)
    factory.reactor = Clock()
    proto = factory.buildProtocol(None)
    transport = StringTransport()
    if take_over:
        transport.registerProducer(HTTPChannelStandIn(), True)
    proto.makeConnection(transport)
    proto.dataReceived(request())
    assert transport.value().startswith(b"HTTP/1.1 101")
    proto.dataReceived(frame(TEXT, b"unit-uid"))
    assert node.connections_of("unit-uid") == 1
    transport.clear()
    return node, proto, transport


def test_guard_replaces_the_http_channel_producer() -> None:
    _, proto, transport = connected(1000, take_over=True)
    assert isinstance(transport.producer, SendQueueGuard)
    assert transport.streaming


def test_guard_counts_only_while_paused_and_closes_4010_past_the_limit() -> None:
    node, proto, transport = connected(1000)
    guard = transport.producer
    assert guard.state == guard.OPEN  # the push hot path skips the guard entirely
    guard.pauseProducing()
    assert guard.state == guard.PAUSED
    guard.resumeProducing()
    assert guard.state == guard.OPEN
    guard.pauseProducing()
    assert node.push(["unit-uid"], b"x" * 600) == 1  # 604 bytes queued: fine
    assert guard.queued == 604  # the frame: 4 header bytes and the payload
    assert node.push(["unit-uid"], b"x" * 600) == 1  # over 1000: closed
    proto.factory.reactor.advance(0)  # detached a turn later, outside the push loop
    assert node.connections_of("unit-uid") == 0
    assert node.metrics.disconnects["slow_consumer"] == 1
    written = transport.value()
    assert written.endswith(b"\x88\x0f\x0f\xaaslow consumer")  # close 4010, then nothing
    assert node.push(["unit-uid"], b"late") == 0
    proto.sendPing()  # anything written afterwards is dropped
    assert transport.value() == written
    guard.resumeProducing()  # tripped: stays dropped
    assert guard.state == guard.DROPPING


def test_token_bucket() -> None:
    bucket = TokenBucket(rate=0.001, burst=3)
    assert [bucket.take() for _ in range(4)] == [True, True, True, False]
    fast = TokenBucket(rate=1e9, burst=1)
    assert all(fast.take() for _ in range(100))


def test_failure_throttle_blocks_then_forgets() -> None:
    clock = Clock()
    throttle = FailureThrottle(limit=3, window=60, clock=clock)
    for _ in range(2):
        throttle.failed("10.0.0.1", "test")
    assert not throttle.blocked("10.0.0.1")
    throttle.failed("10.0.0.1", "test")
    assert throttle.blocked("10.0.0.1") and not throttle.blocked("10.0.0.2")
    assert throttle.retry_after("10.0.0.1") == 60
    clock.advance(61)
    assert not throttle.blocked("10.0.0.1")
    throttle.failed("10.0.0.1", "test")  # a new window: counting starts again
    assert not throttle.blocked("10.0.0.1")


def test_failure_throttle_table_is_bounded() -> None:
    clock = Clock()
    throttle = FailureThrottle(limit=3, window=60, clock=clock)
    throttle.MAX_ENTRIES = 100
    for i in range(1000):
        throttle.failed(f"10.0.{i // 256}.{i % 256}", "test")
    assert len(throttle._ips) <= 100


def test_peer_ip() -> None:
    assert peer_ip("tcp4:1.2.3.4:5555") == "1.2.3.4"
    assert peer_ip("tcp6:::1:5555") == "::1"
    assert peer_ip("203.0.113.9") == "203.0.113.9"  # from a trusted X-Forwarded-For
    assert peer_ip("unix:/run/push.sock") == "unix"
    assert peer_ip(None) == "?"


def test_default_max_connections_leaves_room_for_the_rest() -> None:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert default_max_connections() == max(1, soft - 100)


def test_overflow_inside_a_fan_out_loop() -> None:
    """Tripping the guard mid-push or mid-broadcast must not disturb the hub's loop."""
    node, first, t1 = connected(100)
    second = first.factory.buildProtocol(None)
    t2 = StringTransport()
    second.makeConnection(t2)
    second.dataReceived(request() + frame(TEXT, b"unit-uid"))
    third = first.factory.buildProtocol(None)
    third.makeConnection(StringTransport())
    third.dataReceived(request() + frame(TEXT, b"other-uid"))
    for t in (t1, t2):
        t.producer.pauseProducing()
    assert node.push(["unit-uid"], b"x" * 200) == 2
    assert node.broadcast(b"y" * 200) == 3
    first.factory.reactor.advance(0)
    assert node.connections_of("unit-uid") == 0
    assert node.connections_of("other-uid") == 1
    assert node.metrics.disconnects["slow_consumer"] == 2


def test_connection_caps_refuse_without_counting() -> None:
    caps = ConnectionCaps(total=4, per_ip=2)
    assert [caps.acquire("a") for _ in range(3)] == [None, None, "too_many_from_ip"]
    assert caps.acquire("b") is None and caps.acquire("c") is None
    assert caps.acquire("d") == "too_many_connections"  # the refused "a" took no slot
    caps.release("a")
    assert caps.refusal("a") is None and caps.acquire("d") is None


def test_deadlines_sweep_only_the_expired_in_order() -> None:
    clock = Clock()
    deadlines = Deadlines(5.0, clock=clock.seconds)
    deadlines.add("first")
    clock.advance(2)
    deadlines.add("second")
    deadlines.add("third")
    deadlines.discard("third")
    clock.advance(3)
    assert deadlines.expired() == ["first"]
    deadlines.add("second")  # restarted: a keep-alive connection's next request
    clock.advance(4.9)
    assert deadlines.expired() == [] and len(deadlines) == 1
    clock.advance(0.1)
    assert deadlines.expired() == ["second"] and len(deadlines) == 0


def test_handshake_reader_finds_the_end_across_reads_and_bounds_the_size() -> None:
    reader = HandshakeReader(64)
    assert reader.feed(b"GET / HTTP/1.1\r") is None
    assert reader.feed(b"\n\r") is None
    assert reader.feed(b"\nrest") == b"GET / HTTP/1.1\r\n\r\nrest"
    reader = HandshakeReader(64)
    assert reader.feed(b"x" * 64) is None
    with pytest.raises(HandshakeTooLarge):
        reader.feed(b"x")
    with pytest.raises(HandshakeTooLarge):  # complete, but over the limit
        HandshakeReader(16).feed(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")


def test_handshake_reader_work_is_linear_in_the_bytes_received() -> None:
    """A megabyte in 1-byte reads: a rescan per read would be ~10^12 byte comparisons."""
    reader = HandshakeReader(1 << 21)
    start = time.process_time()
    for _ in range(1 << 20):
        reader.feed(b"a")
    assert time.process_time() - start < 5


@pytest.mark.parametrize("split", [False, True], ids=["one read", "byte by byte"])
def test_the_handshake_byte_limit_holds_for_a_head_in_one_read_or_many(split: bool) -> None:
    """The first read takes a short cut when it holds the whole head; the limit still applies."""
    factory = PushServerFactory(
        Node(MemoryBroker(), MemoryStore()), UidAuthenticator(), ping_interval=0
    )
    factory.reactor = Clock()
    small = request()
    factory.max_handshake = len(small) + 1  # what buildProtocol gives each connection
    for head, opened in ((small, True), (request(headers={"X-Pad": "a" * 9000}), False)):
        conn = factory.buildProtocol(None)
        transport = StringTransport()
        conn.makeConnection(transport)
        for chunk in [head[i : i + 1] for i in range(len(head))] if split else [head]:
            conn.dataReceived(chunk)
        status = transport.value().split(b"\r\n", 1)[0]
        assert status.startswith(b"HTTP/1.1 101" if opened else b"HTTP/1.1 431"), status
        if opened:
            assert conn not in factory.handshakes._since  # its deadline ended at onConnect
        else:
            assert transport.disconnecting
