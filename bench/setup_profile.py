"""Where one connection set-up's work goes, by owner: Twisted, Autobahn, txaio, pushsvc, stdlib.

The workload is bench/instructions_workload.py's ``connect`` (accept on a
test transport, handshake, 101, uid frame, a ping answered; every
connection held), run in this process after ``--warm`` set-ups:

- **Stages under valgrind** (``--valgrind``): instructions per set-up for
  each step of it — ``buildProtocol`` + ``makeConnection``, the opening
  handshake, the uid frame and the ping — counted exactly as
  bench/instructions.py counts (a run with N set-ups minus a run with none,
  divided by N; here a run that stops after step k minus one that stops after
  step k - 1), for pushsvc's protocol and for Autobahn's own
  ``WebSocketServerProtocol`` with the same options (what the library costs
  without pushsvc: the floor pushsvc cannot go below without changing it);
  then ``compat.compact()`` alone (held connections compacted, or not).
- **Per function** (always): Python calls and bytecodes per set-up by the
  owner of the code that ran them (deterministic), and cProfile's self time
  by owner, a C built-in's time charged to the owner of its caller.  cProfile
  adds a fixed cost per call, so its shares lean towards code with many small
  calls; the bytecode counts do not.

    python bench/setup_profile.py                      # per function
    python bench/setup_profile.py --valgrind           # and the stages (a few minutes)
    python bench/setup_profile.py --top 30             # more functions listed
    python bench/setup_profile.py --checkout ../pushsvc-before --valgrind   # another version
    python bench/setup_profile.py --memory 5000        # memory per idle connection instead

``--memory N`` sets up N connections the same way (their test transports
emptied after the pong), holds them, and prints the Python memory per
connection (``tracemalloc``, started after the first ``--warm``) and the
growth of RSS per connection, the test transport's share listed apart (a
server's TCP transport takes its place).  Nothing is timed.

Needs valgrind for ``--valgrind`` (``apt-get install valgrind``).
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
# The pushsvc measured: --checkout DIR (another version in a git worktree), else this tree.
CHECKOUT = Path(os.environ.get("SETUP_PROFILE_CHECKOUT", HERE.parent)).resolve()
sys.path[:0] = [str(CHECKOUT), str(HERE)]

import instructions_workload as workload  # noqa: E402

COLLECTED = b"Collected : "
STAGES = ("accept", "handshake", "frames")
# Autobahn before Twisted: autobahn/twisted/websocket.py is Autobahn's.
OWNERS = (("autobahn", "Autobahn"), ("txaio", "txaio"), ("twisted", "Twisted"), ("zope", "zope"))
# Entry points whose inclusive time is listed (file suffix, function name).
ENTRIES = (
    ("twisted/websocket.py", "connectionMade"),
    ("websocket/protocol.py", "_connectionMade"),
    ("websocket/protocol.py", "processHandshake"),
    ("websocket/protocol.py", "parseHttpHeader"),
    ("websocket/protocol.py", "succeedHandshake"),
    ("websocket/protocol.py", "processData"),
    ("websocket/protocol.py", "onFrameEnd"),
    ("websocket/protocol.py", "processControlFrame"),
    ("pushsvc/websocket.py", "buildProtocol"),
    ("pushsvc/websocket.py", "connectionMade"),
    ("pushsvc/websocket.py", "onConnect"),
    ("pushsvc/websocket.py", "onOpen"),
    ("pushsvc/websocket.py", "onMessage"),
    ("pushsvc/websocket.py", "sendData"),
    ("pushsvc/compat.py", "compact"),
    ("pushsvc/compat.py", "__getattr__"),
    ("pushsvc/compat.py", "feed"),
    ("internet/defer.py", "maybeDeferred"),
    ("txaio/tx.py", "as_future"),
)
PING = bytes([0x89, 0x81]) + workload.MASK + bytes([ord("p") ^ workload.MASK[0]])


def owner_of(filename: str) -> str:
    """Who owns the code in ``filename``: a library, pushsvc (by module), the stdlib."""
    path = filename.replace("\\", "/")
    if "/twisted/internet/testing.py" in path:
        return "Twisted test transport (StringTransport)"
    for lib, name in OWNERS:
        if f"/{lib}/" in path:
            return name
    if "/pushsvc/" in path:
        return "pushsvc " + path.rsplit("/pushsvc/", 1)[1]
    if path.endswith("setup_profile.py") or path.endswith("instructions_workload.py"):
        return "workload driver"
    return "stdlib"


def factory_for(kind: str) -> Any:
    """The factory of one kind: pushsvc's, or Autobahn's with pushsvc's options (``bare``)."""
    from twisted.internet.task import Clock

    from pushsvc.auth import UidAuthenticator
    from pushsvc.websocket import PushServerFactory

    factory = PushServerFactory(workload.owner(), UidAuthenticator(), ping_interval=0)
    factory.reactor = Clock()
    if kind == "bare":
        from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol

        bare = WebSocketServerFactory(server="pushsvc")
        bare.protocol = WebSocketServerProtocol
        for name in factory.protocol.CONFIG_ATTRS:
            setattr(bare, name, getattr(factory, name))
        bare.reactor = factory.reactor
        return bare
    return factory


def set_up(factory: Any, i: int, upto: int, held: list) -> None:
    """One connection through the first ``upto`` stages (0: none), held."""
    from twisted.internet.testing import StringTransport

    if upto < 1:
        return
    proto = factory.buildProtocol(None)
    transport = StringTransport()
    proto.makeConnection(transport)
    held.append((proto, transport))
    if upto < 2:
        return
    proto.dataReceived(workload.HANDSHAKE)
    if upto < 3:
        return
    uid = b"u%d" % i
    masked = bytes(c ^ workload.MASK[j % 4] for j, c in enumerate(uid))
    proto.dataReceived(bytes([0x81, 0x80 | len(uid)]) + workload.MASK + masked + PING)
    assert transport.value().endswith(b"\x8a\x01p"), transport.value()[-20:]


def run_stages(kind: str, upto: int, count: int, warm: int) -> None:
    """The valgrind child: ``warm`` full set-ups, then ``count`` set-ups through ``upto`` stages.

    Kind ``compact``: every set-up without ``compat.compact``, then (``upto``
    1) that many calls of it, one per held connection, or (0) none.
    """
    workload.configure()
    from pushsvc import compat

    compact = compat.compact
    if kind == "compact":
        compat.compact = lambda *args: None
    factory = factory_for(kind)
    held: list = []
    for i in range(warm):
        set_up(factory, i, 3, held)
    if kind == "compact":
        compact(held[0][0])  # the class's values read once, in both runs
        for i in range(warm, warm + count):
            set_up(factory, i, 3, held)
        if upto:
            for proto, _transport in held[warm:]:
                compact(proto)
        return
    for i in range(warm, warm + count):
        set_up(factory, i, upto, held)


def valgrind(kind: str, upto: int, count: int, warm: int, seed: int) -> int:
    """Instructions callgrind counted for one child run."""
    env = {**os.environ, "PYTHONHASHSEED": str(seed), "SETUP_PROFILE_CHECKOUT": str(CHECKOUT)}
    proc = subprocess.run(
        ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null"]
        + [os.path.realpath(sys.executable), __file__, "--child", kind, str(upto)]
        + ["--connections", str(count), "--warm", str(warm)],
        env=env,
        capture_output=True,
        check=True,
    )
    tail = proc.stderr.split(COLLECTED, 1)[1]
    return int(tail.split(maxsplit=1)[0])


def stages(count: int, warm: int, seeds: int) -> None:
    """Instructions per set-up, stage by stage, pushsvc's protocol and Autobahn's alone."""
    rows = {}
    for kind in ("pushsvc", "bare"):
        per_seed = []
        for seed in range(seeds):
            totals = [valgrind(kind, upto, count, warm, seed) for upto in range(4)]
            per_seed.append([(totals[k + 1] - totals[k]) / count for k in range(3)])
        per_seed.sort(key=sum)
        rows[kind] = per_seed[len(per_seed) // 2]
    out = sys.stdout.write
    out(f"\ninstructions per set-up (valgrind, {count} set-ups after {warm}, median of")
    out(f" {seeds} hash seeds by total)\n\n")
    out("| stage | pushsvc | Autobahn alone, same options | pushsvc's own |\n")
    out("|---|---:|---:|---:|\n")
    for k, name in enumerate(STAGES):
        ours, bare = rows["pushsvc"][k], rows["bare"][k]
        out(f"| {name} | {ours:,.0f} | {bare:,.0f} | {ours - bare:+,.0f} |\n")
    ours, bare = sum(rows["pushsvc"]), sum(rows["bare"])
    out(f"| **total** | **{ours:,.0f}** | **{bare:,.0f}** | **{ours - bare:+,.0f}** |\n")
    calls = sorted(
        (valgrind("compact", 1, count, warm, seed) - valgrind("compact", 0, count, warm, seed))
        / count
        for seed in range(seeds)
    )
    out(f"\ncompat.compact() alone: {calls[len(calls) // 2]:,.0f} instructions per call\n")


class OpcodeCounter:
    """Python calls and bytecodes executed, by code object (sys.settrace with opcode events)."""

    def __init__(self) -> None:
        self.opcodes: Counter = Counter()
        self.calls: Counter = Counter()

    def trace(self, frame: Any, event: str, arg: Any) -> Any:
        if event == "call":
            frame.f_trace_opcodes = True
            self.calls[frame.f_code] += 1
        elif event == "opcode":
            self.opcodes[frame.f_code] += 1
        return self.trace


def per_function(count: int, warm: int, top: int) -> None:
    """Calls, bytecodes and cProfile self time per set-up, by owner and by function."""
    workload.configure()
    factory = factory_for("pushsvc")
    held: list = []
    for i in range(warm):
        set_up(factory, i, 3, held)
    counter = OpcodeCounter()
    sys.settrace(counter.trace)
    for i in range(warm, warm + count):
        set_up(factory, i, 3, held)
    sys.settrace(None)
    profiler = cProfile.Profile()
    profiler.enable()
    for i in range(warm + count, warm + 2 * count):
        set_up(factory, i, 3, held)
    profiler.disable()
    stats = pstats.Stats(profiler).stats  # {(file, line, name): (cc, nc, tt, ct, callers)}

    by_owner_time: Counter = Counter()
    by_function_time: Counter = Counter()
    for (filename, line, name), (_cc, _nc, tottime, _ct, callers) in stats.items():
        if filename == "~":  # a C built-in: its time to the owners of its callers
            total = sum(c[2] for c in callers.values()) or 1.0
            for (cfile, _cline, _cname), caller in callers.items():
                by_owner_time[owner_of(cfile)] += tottime * caller[2] / total
            by_function_time[("C", name)] += tottime
        else:
            by_owner_time[owner_of(filename)] += tottime
            by_function_time[(owner_of(filename), f"{name} ({Path(filename).name}:{line})")] += (
                tottime
            )
    by_owner_ops: Counter = Counter()
    by_owner_calls: Counter = Counter()
    for code, n in counter.opcodes.items():
        by_owner_ops[owner_of(code.co_filename)] += n
    for code, n in counter.calls.items():
        by_owner_calls[owner_of(code.co_filename)] += n
    total_time = sum(by_owner_time.values())
    total_ops = sum(by_owner_ops.values())
    out = sys.stdout.write
    out(f"per set-up ({count} set-ups after {warm} held; workload driver included)\n\n")
    out("| owner | Python calls | bytecodes | bytecode share | cProfile self time share |\n")
    out("|---|---:|---:|---:|---:|\n")
    owners = sorted(set(by_owner_ops) | set(by_owner_time), key=lambda o: -by_owner_time[o])
    for o in owners:
        out(
            f"| {o} | {by_owner_calls[o] / count:.1f} | {by_owner_ops[o] / count:,.0f} | "
            f"{by_owner_ops[o] / total_ops:.1%} | {by_owner_time[o] / total_time:.1%} |\n"
        )
    out(
        f"| **total** | **{sum(by_owner_calls.values()) / count:.1f}** | "
        f"**{total_ops / count:,.0f}** | 100 % | 100 % |\n"
    )
    out("\ninclusive (cProfile cumulative time, the calls below included)\n\n")
    out("| share | function | calls per set-up |\n|---:|---|---:|\n")
    for (filename, line, name), (_cc, nc, _tt, cumtime, _callers) in sorted(
        stats.items(), key=lambda item: -item[1][3]
    ):
        if any(filename.endswith(f) and name == n for f, n in ENTRIES):
            where = f"{owner_of(filename)}: {name} ({Path(filename).name}:{line})"
            out(f"| {cumtime / total_time:.1%} | {where} | {nc / count:.1f} |\n")
    out(f"\ntop {top} functions by cProfile self time (C built-ins by name)\n\n")
    out("| share | owner | function | bytecodes per set-up |\n|---:|---|---|---:|\n")
    ops_by_name: Counter = Counter()
    for code, n in counter.opcodes.items():
        key = (
            owner_of(code.co_filename),
            f"{code.co_name} ({Path(code.co_filename).name}:{code.co_firstlineno})",
        )
        ops_by_name[key] += n
    for (o, name), t in by_function_time.most_common(top):
        ops = ops_by_name.get((o, name))
        shown = f"{ops / count:,.0f}" if ops else ""
        out(f"| {t / total_time:.1%} | {o} | {name} | {shown} |\n")


def memory(count: int, warm: int) -> None:
    """Python memory and RSS per idle connection, ``count`` set up and held."""
    import gc
    import tracemalloc

    workload.configure()
    factory = factory_for("pushsvc")
    held: list = []
    for i in range(warm):
        set_up(factory, i, 3, held)
    for _proto, transport in held:
        transport.clear()
    gc.collect()
    rss_before = rss_kib()
    tracemalloc.start()
    start = tracemalloc.take_snapshot()
    for i in range(warm, warm + count):
        set_up(factory, i, 3, held)
        held[-1][1].clear()  # the 101 and the pong, read by the peer
    gc.collect()
    grown = tracemalloc.take_snapshot().compare_to(start, "filename")
    tracemalloc.stop()
    gc.collect()
    total = sum(d.size_diff for d in grown)
    test_transport = sum(
        d.size_diff
        for d in grown
        if owner_of(d.traceback[0].filename).startswith(("Twisted test", "workload"))
    )
    out = sys.stdout.write
    out(f"{count} connections set up and held (after {warm}), per connection:\n")
    out(f"  Python memory (tracemalloc): {total / count:,.0f} bytes")
    out(f" ({test_transport / count:,.0f} of them the test transport and the list)\n")
    for d in grown[:8]:
        out(f"    {d.size_diff / count:8,.0f}  {d.traceback[0].filename}\n")
    # RSS in a second run of the same size, without tracemalloc's own memory.
    held2: list = []
    gc.collect()
    rss_before = rss_kib()
    for i in range(warm + count, warm + 2 * count):
        set_up(factory, i, 3, held2)
        held2[-1][1].clear()
    gc.collect()
    out(f"  RSS growth (no tracemalloc): {(rss_kib() - rss_before) / count:.2f} KiB\n")


def rss_kib() -> int:
    """This process's resident set size."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--connections", type=int, default=1000, help="set-ups measured")
    parser.add_argument("--warm", type=int, default=100, help="set-ups before, held")
    parser.add_argument("--top", type=int, default=25, help="functions listed")
    parser.add_argument("--valgrind", action="store_true", help="also count the stages")
    parser.add_argument("--seeds", type=int, default=3, help="hash seeds per valgrind count")
    parser.add_argument("--memory", type=int, metavar="N", help="memory per connection instead")
    parser.add_argument("--checkout", type=Path, help="the pushsvc checkout (default: this tree)")
    parser.add_argument("--child", nargs=2, metavar=("KIND", "UPTO"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.checkout and args.checkout.resolve() != CHECKOUT:  # again, with it first on sys.path
        env = {**os.environ, "SETUP_PROFILE_CHECKOUT": str(args.checkout.resolve())}
        argv = [a for a in sys.argv[1:]]
        os.execve(sys.executable, [sys.executable, __file__, *argv], env)
    if args.child:
        run_stages(args.child[0], int(args.child[1]), args.connections, args.warm)
        return
    if args.memory:
        memory(args.memory, args.warm)
        return
    per_function(args.connections, args.warm, args.top)
    if args.valgrind:
        stages(args.connections, args.warm, args.seeds)


if __name__ == "__main__":
    main()
