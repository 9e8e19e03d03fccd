"""Property-based tests of the backend line parser and the command model, in-process.

Whatever bytes arrive, in whatever chunks: exactly one reply line per request
line, in a known shape, and no exception escapes the protocol.
"""

from __future__ import annotations

import json

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.testing import StringTransport

from pushsvc import commands
from pushsvc.backend import BackendProtocol
from pushsvc.broker.memory import MemoryBroker
from pushsvc.history.store import MemoryStore
from pushsvc.node import Node

MAX_LINE = 512
FIELDS = ["cmd", "uid", "group", "data", "percent", "id", "exclude", "limit", "after", "code"]
FIELDS += ["reason", "secret"]


class FakeConn:
    """A hub connection that records what it was sent."""

    def __init__(self) -> None:
        self.frames = 0
        self.closed: list[tuple[int | None, str | None]] = []

    def deliver(self, frame: object) -> bool:
        self.frames += 1
        return True

    def close(self, code: int, reason: str) -> None:
        self.closed.append((code, reason))

    def go_away(self) -> None:
        self.closed.append((1001, None))


def backend() -> tuple[BackendProtocol, StringTransport]:
    node = Node(MemoryBroker(), MemoryStore())
    for uid, groups in (("u1", ["g1"]), ("u1", []), ("u2", ["g1", "g2"])):
        conn = FakeConn()
        node.attach(conn)
        node.identify(conn, uid, groups)
    node.join(["u2"], ["g3"])
    proto = BackendProtocol(node, MAX_LINE)
    transport = StringTransport()
    proto.makeConnection(transport)
    return proto, transport


def check_reply(line: bytes) -> None:
    """A reply is ok, fail, an error line, or a JSON object."""
    assert line in (b"ok", b"fail") or line.startswith(b"error ") or line.startswith(b"{"), line
    if line.startswith(b"{"):
        assert isinstance(orjson.loads(line), dict)


def replies(transport: StringTransport) -> list[bytes]:
    out = transport.value()
    assert out == b"" or out.endswith(b"\n")
    lines = out.split(b"\n")[:-1]
    for line in lines:
        check_reply(line)
    return lines


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:], strict=False)]


line_bytes = st.binary(max_size=2 * MAX_LINE).map(lambda b: b.replace(b"\n", b""))

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(lines=st.lists(line_bytes, max_size=20), cuts=st.lists(st.integers(0, 1 << 16)))
def test_arbitrary_bytes_one_reply_per_line(lines: list[bytes], cuts: list[int]) -> None:
    proto, transport = backend()
    for piece in chunked(b"".join(line + b"\n" for line in lines), cuts):
        proto.dataReceived(piece)
    assert len(replies(transport)) == len(lines)


json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(1 << 70), 1 << 70)
    | st.floats(allow_nan=False)
    | st.text(max_size=30)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
names = st.sampled_from(["u1", "u2", "u3", "g1", "g2", "g3", ""])
field_values = (
    json_values
    | names
    | st.lists(names, max_size=4)
    | st.sampled_from(sorted(commands.COMMANDS) + ["auth", "nope"])
    | st.integers(-5, 5000)
)
requests = st.dictionaries(st.sampled_from(FIELDS), field_values, max_size=6)


@FUZZ
@given(batch=st.lists(requests | json_values, min_size=1, max_size=10))
def test_json_shapes_one_reply_each_with_the_id(batch: list[object]) -> None:
    proto, transport = backend()
    data = b"".join(json.dumps(r).encode() + b"\n" for r in batch)
    proto.dataReceived(data)
    lines = replies(transport)
    assert len(lines) == len(batch)
    for request, line in zip(batch, lines, strict=True):
        rid = commands.request_id(request)
        encoded = json.dumps(request).encode()
        if rid is not None and len(encoded) <= MAX_LINE and _orjson_accepts(encoded):
            assert orjson.loads(line)["id"] == rid, (request, line)


def _orjson_accepts(line: bytes) -> bool:
    try:
        orjson.loads(line)
    except orjson.JSONDecodeError:
        return False
    return True


@FUZZ
@given(data=st.binary(max_size=4 * MAX_LINE))
def test_unterminated_garbage_answers_at_most_once(data: bytes) -> None:
    """Bytes without a final newline: nothing is answered twice, nothing escapes."""
    proto, transport = backend()
    proto.dataReceived(data)
    proto.dataReceived(b"\n")
    assert len(replies(transport)) == data.count(b"\n") + 1
