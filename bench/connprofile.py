"""Where connection set-up CPU and idle-connection memory go, inside one pushsvc process.

The server is the real service (``pushsvc.tap.makeService``, as ``twistd
push`` builds it) run in this process on 127.0.0.1, pinned to core 0; the
clients are bench/loadgen.py's simulated browsers in a child process pinned
to core 1 (handshake, uid frame, registered when the pong to a ping after it
arrives; 48 set-ups in flight).  The child connects in steps and reports
after each, so the server's CPU per connection is read step by step as the
number held grows, next to the time the garbage collector took in that step
(``gc.callbacks``) and its collections per generation.

Then, with everybody connected: RSS growth per connection, the Python
memory per connection by allocating line (``tracemalloc``, started after
start-up; ``--no-trace`` to leave it off for the CPU figures) and the
objects one idle connection holds with their ``sys.getsizeof``.

    python bench/connprofile.py --clients 10000
    python bench/connprofile.py --tree /path/to/other/checkout   # another version

Prints text; ``--json FILE`` keeps the figures.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent

CLIENT = """
import asyncio, sys
sys.path.insert(0, {bench!r})
import loadgen

async def main(port, total, step):
    hub = loadgen.Hub("127.0.0.1", port)
    held = []
    for start in range(0, total, step):
        uids = [f"p{{i}}" for i in range(start, min(total, start + step))]
        held += await loadgen.connect_clients(hub, "127.0.0.1", port, uids, 48)
        print(len(held), flush=True)
        sys.stdin.readline()
    sys.stdin.readline()

asyncio.run(main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])))
"""


def free_port() -> int:
    """A port nobody listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_kib() -> int:
    """This process's resident set size."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


class GcClock:
    """Time spent in the garbage collector, per generation, since the last ``take()``."""

    def __init__(self) -> None:
        self.seconds = [0.0, 0.0, 0.0]
        self.runs = [0, 0, 0]
        self._t0 = 0.0
        gc.callbacks.append(self._tick)

    def _tick(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._t0 = time.process_time()
        else:
            gen = info["generation"]
            self.seconds[gen] += time.process_time() - self._t0
            self.runs[gen] += 1

    def take(self) -> tuple[list[float], list[int]]:
        """Seconds and collections per generation since the last take."""
        out = (self.seconds, self.runs)
        self.seconds, self.runs = [0.0, 0.0, 0.0], [0, 0, 0]
        return out


def service(ws_port: int, text_port: int, extra: list[str]) -> Any:
    """The real service, as ``twistd push`` would build it."""
    from pushsvc.tap import PushOptions, makeService

    opts = PushOptions()
    opts.parseOptions(
        [
            f"--ws-port=tcp:{ws_port}:interface=127.0.0.1",
            f"--text-port=tcp:{text_port}:interface=127.0.0.1",
            "--http-port=off",
            "--trim-interval=0",
            *extra,
        ]
    )
    return makeService(opts)


def one_connection(factory_protocols: list[Any]) -> list[tuple[str, int]]:
    """What one idle, authenticated connection holds, by object (shallow sizes)."""
    proto = factory_protocols[0]
    rows = [
        ("protocol object", sys.getsizeof(proto)),
        (f"protocol __dict__ ({len(vars(proto))} attributes)", sys.getsizeof(vars(proto))),
    ]
    seen = {id(proto), id(vars(proto))}
    values = 0
    big = []
    for name, value in vars(proto).items():
        if id(value) in seen or value is proto.transport or isinstance(value, (bool, type(None))):
            continue
        if isinstance(value, int) and -5 <= value <= 256:
            continue
        seen.add(id(value))
        size = sys.getsizeof(value)
        if hasattr(value, "__dict__") and not isinstance(value, type):
            size += sys.getsizeof(vars(value))
        values += size
        big.append((size, name))
    rows.append(("values of the protocol's attributes (shallow)", values))
    rows += [(f"    of which .{name}", size) for size, name in sorted(big, reverse=True)[:12]]
    transport = proto.transport
    rows.append(("transport object (tcp.Server)", sys.getsizeof(transport)))
    rows.append(
        (f"transport __dict__ ({len(vars(transport))} attributes)", sys.getsizeof(vars(transport)))
    )
    tvalues = 0
    for value in vars(transport).values():
        if value is proto or id(value) in seen or isinstance(value, (bool, type(None), int)):
            continue
        seen.add(id(value))
        tvalues += sys.getsizeof(value)
    rows.append(("values of the transport's attributes (shallow, incl. socket)", tvalues))
    return rows


def live_protocols() -> list[Any]:
    """Every open PushServerProtocol in the heap."""
    from pushsvc.websocket import PushServerProtocol

    return [o for o in gc.get_objects() if isinstance(o, PushServerProtocol)]


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Serve, let the child connect step by step, measure; returns the figures."""
    from twisted.internet import reactor

    os.sched_setaffinity(0, {0})
    ws_port, text_port = free_port(), free_port()
    svc = service(ws_port, text_port, args.server_arg)
    svc.startService()
    out: dict[str, Any] = {"clients": args.clients, "steps": []}
    clock = GcClock()
    child = subprocess.Popen(
        ["taskset", "-c", "1", sys.executable, "-c", CLIENT.format(bench=str(HERE))]
        + [str(ws_port), str(args.clients), str(args.step)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    state = {"cpu": 0.0, "wall": 0.0, "rss0": 0, "trace": None}

    def start() -> None:
        gc.collect()
        if args.freeze:
            gc.freeze()
        if args.gc_threshold:
            gc.set_threshold(*args.gc_threshold)
        state["rss0"] = rss_kib()
        if args.trace:
            tracemalloc.start(args.frames)
            state["trace"] = tracemalloc.take_snapshot()
        clock.take()
        state["cpu"], state["wall"] = time.process_time(), time.perf_counter()
        reactor.addReader(Reader(child.stdout, step))

    def step(line: str) -> None:
        held = int(line)
        cpu, wall = time.process_time(), time.perf_counter()
        gc_s, gc_n = clock.take()
        prev = out["steps"][-1]["held"] if out["steps"] else 0
        n = held - prev
        out["steps"].append(
            {
                "held": held,
                "cpu_us_per_conn": (cpu - state["cpu"]) / n * 1e6,
                "gc_us_per_conn": sum(gc_s) / n * 1e6,
                "gc_us_by_gen": [s / n * 1e6 for s in gc_s],
                "gc_runs": gc_n,
                "seconds": wall - state["wall"],
            }
        )
        if held >= args.clients:
            finish()
        state["cpu"], state["wall"] = cpu, wall
        child.stdin.write("\n")
        child.stdin.flush()

    def finish() -> None:
        out["rss_kib_per_conn"] = (rss_kib() - state["rss0"]) / args.clients
        if state["trace"] is not None:
            snap = tracemalloc.take_snapshot()
            diff = snap.compare_to(state["trace"], "lineno")
            total = sum(d.size_diff for d in diff)
            out["traced_bytes_per_conn"] = total / args.clients
            out["traced_top"] = [
                (str(d.traceback[0]), d.size_diff / args.clients, d.count_diff / args.clients)
                for d in diff[: args.top]
            ]
            tracemalloc.stop()
        t0 = time.perf_counter()
        gc.collect()
        out["full_collection_ms"] = (time.perf_counter() - t0) * 1e3
        out["tracked_objects"] = len(gc.get_objects())
        out["one_connection"] = one_connection(live_protocols())
        reactor.callLater(0, reactor.stop)

    reactor.callWhenRunning(start)
    reactor.run()
    child.stdin.close()
    child.wait(10)
    return out


class Reader:
    """Lines from the child's stdout, read by the reactor."""

    def __init__(self, stream: Any, on_line: Any) -> None:
        self.stream, self.on_line = stream, on_line

    def fileno(self) -> int:
        return self.stream.fileno()

    def doRead(self) -> None:
        line = self.stream.readline()
        if line:
            self.on_line(line)

    def logPrefix(self) -> str:
        return "child"

    def connectionLost(self, reason: object) -> None:
        pass


def report(out: dict[str, Any]) -> str:
    """The figures as text."""
    lines = ["held | server CPU µs/conn | of it GC µs (gen0/1/2) | GC runs (gen0/1/2) | s"]
    for s in out["steps"]:
        by_gen = "/".join(f"{v:.1f}" for v in s["gc_us_by_gen"])
        runs = "/".join(str(v) for v in s["gc_runs"])
        lines.append(
            f"{s['held']:,} | {s['cpu_us_per_conn']:.0f} | {s['gc_us_per_conn']:.1f} ({by_gen})"
            f" | {runs} | {s['seconds']:.2f}"
        )
    lines.append(f"\nRSS growth per connection: {out['rss_kib_per_conn']:.2f} KiB")
    lines.append(
        f"One full collection with everybody connected: {out['full_collection_ms']:.0f} ms"
        f" ({out['tracked_objects']:,} tracked objects, frozen ones not counted)"
    )
    if "traced_bytes_per_conn" in out:
        lines.append(
            f"Python memory (tracemalloc) per connection: {out['traced_bytes_per_conn']:.0f} B"
        )
        top = out["traced_top"]
        lines += [f"  {size:7.0f} B {count:5.1f} blocks  {where}" for where, size, count in top]
    lines.append("\nOne idle connection's objects (sys.getsizeof, shallow):")
    lines += [f"  {size:6d} B  {what}" for what, size in out["one_connection"]]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=10000)
    parser.add_argument("--step", type=int, default=1000, help="connections per reading")
    parser.add_argument("--no-trace", dest="trace", action="store_false", help="no tracemalloc")
    parser.add_argument("--frames", type=int, default=1, help="tracemalloc frames per block")
    parser.add_argument("--top", type=int, default=25, help="allocating lines shown")
    parser.add_argument("--freeze", action="store_true", help="gc.freeze() before connecting")
    parser.add_argument("--gc-threshold", type=int, nargs=3, help="gc.set_threshold() before")
    parser.add_argument("--server-arg", action="append", default=[], help="extra service option")
    parser.add_argument("--tree", type=Path, default=HERE.parent, help="pushsvc checkout")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    sys.path.insert(0, str(args.tree.resolve()))
    out = run(args)
    import pushsvc

    out["pushsvc"] = str(Path(pushsvc.__file__).parent.parent)
    sys.stdout.write(f"# pushsvc from {out['pushsvc']}\n{report(out)}\n")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
