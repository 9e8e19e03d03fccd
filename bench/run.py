"""Benchmark runner: pushsvc against a reference server, same run, same machine.

Why one command: figures on a shared, noisy two-core machine only mean
something next to a baseline taken minutes apart, so the runner starts each
server itself (pinned to core 0 with ``taskset``), drives it from this process
(pinned to core 1), tears it down, repeats, and prints medians side by side
with the ratio.

    python bench/run.py            # full run, 3 repetitions (a few minutes)
    python bench/run.py --quick    # regression check, well under a minute
    python bench/run.py --max      # also connect as many clients as fds allow
    python bench/run.py --profile /tmp/pushsvc-profile   # plus a py-spy profile

``--server-cmd`` measures any implementation of the protocol instead of
pushsvc; ``{ws_port}`` and ``{text_port}`` are substituted and the command
must exec the server itself (no shell wrapper), so that its pid is the one
measured.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import loadgen  # noqa: E402

HOST = "127.0.0.1"
LoopFactory = Callable[[], asyncio.AbstractEventLoop]
BENCH_DIR = Path(__file__).resolve().parent
PROJECT_DIR = BENCH_DIR.parent
# Servers get the project root on PYTHONPATH: Twisted's plugin scan does not
# see twisted/plugins through an editable install's import hook, and the
# benchmark should measure this tree's pushsvc anyway.
SERVER_ENV = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT_DIR), os.environ.get("PYTHONPATH")])),
}
PUSHSVC_CMD = (
    "taskset -c 0 twistd -n --pidfile= push"
    " --ws-port tcp:{ws_port}:interface=127.0.0.1"
    " --text-port tcp:{text_port}:interface=127.0.0.1"
)
REFERENCE_CMD = (
    f"taskset -c 0 {shlex.quote(sys.executable)}"
    f" {shlex.quote(str(BENCH_DIR / 'reference_server.py'))}"
    " --ws-port {ws_port} --text-port {text_port}"
)


# --------------------------------------------------------------------------
# Environment
# --------------------------------------------------------------------------


def raise_fd_limit() -> int:
    """Raise RLIMIT_NOFILE's soft limit to the hard limit; children inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def max_clients(fd_limit: int, cap: int) -> int:
    """Connections both sides can hold: fds and ephemeral ports, minus slack."""
    low, high = 32768, 60999
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except OSError:
        pass
    return max(0, min(fd_limit - 200, high - low + 1 - 500, cap))


def machine() -> dict[str, str]:
    """What the figures were measured on."""
    model = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    commit = subprocess.run(
        ["git", "-C", str(PROJECT_DIR), "describe", "--always", "--dirty"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    return {
        "commit": commit or "unknown",
        "nproc": str(os.cpu_count()),
        "cpu": model,
        "python": platform.python_version(),
        "kernel": platform.release(),
    }


def free_port() -> int:
    """A port that was free a moment ago on 127.0.0.1."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def pushsvc_available() -> bool:
    """True when ``twistd`` knows the ``push`` plugin (``pip install -e .``)."""
    if shutil.which("twistd") is None:
        return False
    out = subprocess.run(
        ["twistd", "--help"], capture_output=True, text=True, env=SERVER_ENV
    ).stdout
    return any(line.split()[:1] == ["push"] for line in out.splitlines())


# --------------------------------------------------------------------------
# Server processes
# --------------------------------------------------------------------------


@dataclass
class Server:
    """A running server under test and where its output goes."""

    proc: subprocess.Popen[bytes]
    target: loadgen.Target
    log_path: Path

    def log_bytes(self) -> int:
        """Bytes the server has written to stdout/stderr so far."""
        return self.log_path.stat().st_size

    def log_tail(self) -> str:
        """Last lines of the server's output, for error messages."""
        lines = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(lines[-15:])


def start_server(template: str, log_dir: Path, name: str) -> Server:
    """Start a server on fresh ports and wait until both ports accept."""
    ws_port, text_port = free_port(), free_port()
    while text_port == ws_port:
        text_port = free_port()
    argv = shlex.split(template.format(ws_port=ws_port, text_port=text_port))
    log_path = log_dir / f"{name}-{ws_port}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=SERVER_ENV)
    server = Server(proc, loadgen.Target(HOST, ws_port, text_port, proc.pid), log_path)
    deadline = time.monotonic() + 30
    for port in (ws_port, text_port):
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n{server.log_tail()}")
            if time.monotonic() > deadline:
                stop_server(server)
                raise RuntimeError(f"{name} did not listen on {port} within 30 s")
            try:
                socket.create_connection((HOST, port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.05)
    return server


def stop_server(server: Server) -> None:
    """SIGTERM, then SIGKILL if it lingers."""
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGTERM)
        try:
            server.proc.wait(15)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait()


# --------------------------------------------------------------------------
# Running sessions
# --------------------------------------------------------------------------


def new_loop_factory(kind: str) -> LoopFactory:
    """Event loop for the generator: uvloop when available (cheaper per event)."""
    if kind in ("auto", "uvloop"):
        try:
            import uvloop

            return uvloop.new_event_loop
        except ImportError:
            if kind == "uvloop":
                raise
    return asyncio.new_event_loop


def run_session(
    template: str, name: str, session: str, cfg: loadgen.Config, log_dir: Path, loop: LoopFactory
) -> dict[str, Any]:
    """One fresh server, one session of scenarios, then teardown."""
    server = start_server(template, log_dir, name)
    try:
        time.sleep(0.3)  # let start-up work finish before the baseline readings
        log_before = server.log_bytes()
        with asyncio.Runner(loop_factory=loop) as runner:
            results = runner.run(loadgen.SESSIONS[session](server.target, cfg))
        connects = sum(r["count"] for k, r in results.items() if k.startswith("connect"))
        results[f"{session}_log_bytes_per_conn"] = (server.log_bytes() - log_before) / connects
        if server.proc.poll() is not None:
            raise RuntimeError(f"{name} died:\n{server.log_tail()}")
        return results
    except (loadgen.BenchError, OSError, asyncio.TimeoutError) as exc:
        raise RuntimeError(f"{name} / {session}: {exc!r}\n{server.log_tail()}") from exc
    finally:
        stop_server(server)


# --------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------

# (result key, figure key, label, format, higher is better)
Row = tuple[str, str, str, str, bool]


def table_rows(cfg: loadgen.Config) -> list[tuple[str, list[Row]]]:
    """Which figures the table shows, grouped by scenario."""
    groups: list[tuple[str, list[Row]]] = []
    connects = [f"connect_{cfg.clients}", f"connect_{cfg.fanout_clients}"]
    if cfg.max_clients:
        connects.append("connect_max")
    for key in connects:
        n = cfg.max_clients if key == "connect_max" else int(key.split("_")[1])
        groups.append(
            (
                f"connect {n:,} clients",
                [
                    (key, "conn_per_s", "connections/s", ",.0f", True),
                    (key, "server_cpu_us_per_conn", "server CPU µs/connection", ",.0f", False),
                    (key, "rss_kib_per_conn", "server RSS KiB/connection", ",.1f", False),
                ],
            )
        )
    for key, title in (
        ("unicast_1", f"unicast, 1 backend conn → {cfg.clients:,} clients"),
        ("unicast_8", f"unicast, 8 backend conns → {cfg.clients:,} clients"),
        ("offline", "offline uid (reply fail), 1 backend conn"),
    ):
        groups.append(
            (
                title,
                [
                    (key, "push_per_s", "pushes/s", ",.0f", True),
                    (key, "server_cpu_us_per_push", "server CPU µs/push", ",.1f", False),
                ],
            )
        )
    groups.append(
        (
            f"latency at {cfg.latency_rate:,} pushes/s → {cfg.clients:,} clients",
            [
                ("latency", "p50_ms", "p50 ms", ".2f", False),
                ("latency", "p90_ms", "p90 ms", ".2f", False),
                ("latency", "p99_ms", "p99 ms", ".2f", False),
                ("latency", "server_cpu_us_per_push", "server CPU µs/push", ",.0f", False),
            ],
        )
    )
    groups.append(
        (
            f"broadcast → {cfg.fanout_clients:,} clients",
            [
                ("broadcast", "frame_per_s", "frames delivered/s", ",.0f", True),
                ("broadcast", "server_cpu_us_per_frame", "server CPU µs/frame", ",.1f", False),
            ],
        )
    )
    return groups


# A rate measured while the server had less than this share of its core says
# more about the machine (or the generator) than about the server.
SATURATED_PCT = 80.0


def median_cell(runs: list[dict[str, Any]], key: str, fig: str) -> tuple[float | None, str]:
    """Median over repetitions, with a marker when the figure is not the server's.

    "generator-bound": some repetition had the generator at ~100 % of its
    core.  "server <80 % busy": a rate taken while the server was not
    saturated (it waited on something else, or lost its core to another
    process), so it is not the server's capacity.
    """
    runs = [r[key] for r in runs if key in r]
    if not runs:
        return None, ""
    marks = []
    if any(r.get("generator_bound") for r in runs):
        marks.append("generator-bound")
    is_rate = fig.endswith("_per_s") and key != "latency"
    if is_rate and statistics.median(r["server_cpu_pct"] for r in runs) < SATURATED_PCT:
        marks.append(f"server <{SATURATED_PCT:.0f} % busy")
    marker = f" ({', '.join(marks)})" if marks else ""
    return statistics.median(r[fig] for r in runs), marker


def render_table(
    results: dict[str, list[dict[str, Any]]], names: list[str], cfg: loadgen.Config
) -> str:
    """Markdown table: each server's medians and the first-over-second ratio."""
    a, b = names
    lines = [
        f"| scenario | figure | {a} | {b} | {a} / {b} |",
        "|---|---|---:|---:|---:|",
    ]
    for title, rows in table_rows(cfg):
        for i, (key, fig, label, fmt, higher) in enumerate(rows):
            va, ma = median_cell(results[a], key, fig)
            vb, mb = median_cell(results[b], key, fig)
            ca = "not measured" if va is None else format(va, fmt) + ma
            cb = "not measured" if vb is None else format(vb, fmt) + mb
            ratio = f"{va / vb:.2f}" if va is not None and vb else "–"
            arrow = "↑" if higher else "↓"
            lines.append(f"| {title if i == 0 else ''} | {label} {arrow} | {ca} | {cb} | {ratio} |")
    return "\n".join(lines)


def render_busy(results: dict[str, list[dict[str, Any]]], names: list[str]) -> str:
    """CPU share of server and generator per scenario, to judge who was the bottleneck."""
    lines = [
        "| scenario | "
        + " | ".join(f"{n}: server % / generator % / frames per client read" for n in names)
        + " |"
    ]
    lines.append("|---|" + "---:|" * len(names))
    keys: list[str] = []
    for runs in results.values():
        for run in runs:
            keys += [k for k, v in run.items() if isinstance(v, dict) and k not in keys]
    for key in keys:
        cells = []
        for name in names:
            runs = [r[key] for r in results[name] if key in r]
            if not runs:
                cells.append("not measured")
                continue
            srv = statistics.median(r["server_cpu_pct"] for r in runs)
            gen = statistics.median(r["gen_cpu_pct"] for r in runs)
            cell = f"{srv:.0f} / {gen:.0f}"
            if "frames_per_read" in runs[0]:
                cell += f" / {statistics.median(r['frames_per_read'] for r in runs):.2f}"
            cells.append(cell)
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render_logs(results: dict[str, list[dict[str, Any]]], names: list[str]) -> str:
    """Bytes of server output per connection (anything but ~0 is per-connection logging)."""
    parts = []
    for name in names:
        counts = Counter[str]()
        for run in results[name]:
            for k, v in run.items():
                if k.endswith("_log_bytes_per_conn"):
                    counts[k.removesuffix("_log_bytes_per_conn")] = v
        if counts:
            figures = ", ".join(f"{k} {v:,.0f}" for k, v in counts.items())
            parts.append(f"{name}: server output bytes per connection: {figures}")
    return "\n".join(parts)


# --------------------------------------------------------------------------
# Profiling
# --------------------------------------------------------------------------


def profile_pushsvc(
    template: str, cfg: loadgen.Config, log_dir: Path, out_dir: Path, loop: LoopFactory
) -> str:
    """Sample the server with py-spy per phase (connect, unicast, broadcast).

    Writes py-spy's collapsed stacks (``--format raw``, readable by
    flamegraph.pl and speedscope) to ``out_dir`` and returns the top frames.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    server = start_server(template, log_dir, "profile")
    pid = str(server.proc.pid)
    raws: list[tuple[str, Path]] = []

    async def sampled(phase: str, work: Awaitable[Any]) -> Any:
        raw = out_dir / f"pushsvc-{phase}.txt"
        spy = subprocess.Popen(
            ["py-spy", "record", "--pid", pid, "--rate", "250", "--format", "raw", "-o", str(raw)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        await asyncio.sleep(1.0)  # py-spy attaches; idle samples are dropped below
        result = await work
        spy.send_signal(signal.SIGINT)
        await asyncio.get_running_loop().run_in_executor(None, spy.wait)
        raws.append((phase, raw))
        return result

    async def load() -> None:
        target = server.target
        hub = loadgen.Hub(HOST, target.ws_port)
        connect = loadgen.scenario_connect(target, hub, cfg.fanout_clients, cfg)
        _, clients = await sampled("connect", connect)
        try:
            few = clients[: cfg.clients]

            async def unicast() -> None:
                for backends in (1, 8):
                    await loadgen.scenario_unicast(target, hub, few, backends, cfg)

            await sampled("unicast", unicast())
            await sampled("broadcast", loadgen.scenario_broadcast(target, hub, clients, cfg))
        finally:
            loadgen.close_clients(clients)

    try:
        with asyncio.Runner(loop_factory=loop) as runner:
            runner.run(load())
    finally:
        stop_server(server)
    parts = []
    for phase, raw in raws:
        parts.append(f"### {phase} ({raw.name})\n\n{summarize_profile(raw)}")
    return "\n\n".join(parts)


# Known costs of a Twisted + Autobahn server, matched by substring in any frame
# of a sample: their inclusive share tells where the time goes at a glance.
HOT_SPOTS = {
    "socket send (Connection.writeSomeData)": ("Connection.writeSomeData (",),
    "epoll_ctl per write (addWriter/removeWriter)": ("addWriter (", "removeWriter ("),
    "Autobahn debug-log arguments built per send (hltype/hlval)": ("hltype (", "hlval ("),
    "Autobahn debug-log pformat per connection": ("pformat (pprint",),
    "Autobahn opening handshake (processHandshake)": ("processHandshake (",),
    "backend request incl. its push (BackendProtocol.lineReceived)": (
        "BackendProtocol.lineReceived (",
    ),
}


def summarize_profile(raw: Path, top: int = 15) -> str:
    """Self and inclusive sample shares per function from py-spy's collapsed stacks."""
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    spots: Counter[str] = Counter()
    samples = 0
    busy = 0
    for line in raw.read_text().splitlines():
        stack, _, count_s = line.rpartition(" ")
        count = int(count_s)
        frames = stack.split(";")
        samples += count
        if "doPoll" in frames[-1]:
            continue  # idle in epoll: not work
        busy += count
        own[frames[-1]] += count
        for frame in set(frames):
            total[frame] += count
        for label, needles in HOT_SPOTS.items():
            if any(n in frame for frame in frames for n in needles):
                spots[label] += count
    lines = [f"{samples} samples, {100 * busy / max(samples, 1):.0f}% not waiting in epoll", ""]
    lines += ["| inclusive % | known hot spot |", "|---:|---|"]
    for label, hits in spots.most_common():
        lines.append(f"| {100 * hits / busy:.1f} | {label} |")
    lines.append("")
    lines += ["| self % | function |", "|---:|---|"]
    lines += [f"| {100 * c / busy:.1f} | `{f}` |" for f, c in own.most_common(top)]
    lines += ["", "| inclusive % | function |", "|---:|---|"]
    skip = (
        "<module>", "run (", "runApp", "mainLoop", "startReactor", "postApplication",
        "runReactorWithLogging", "doPoll", "callWithLogger", "callWithContext",
    )  # fmt: skip
    inclusive = [(f, c) for f, c in total.most_common() if not any(s in f for s in skip)]
    lines += [f"| {100 * c / busy:.1f} | `{f}` |" for f, c in inclusive[:top]]
    return "\n".join(lines)


# --------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------


def build_config(args: argparse.Namespace, fd_limit: int) -> loadgen.Config:
    """Scenario sizes for full or quick mode."""
    if args.quick:
        cfg = loadgen.Config(
            clients=500,
            fanout_clients=2000,
            unicast_pushes=10000,
            offline_pushes=20000,
            broadcasts=5,
            min_seconds=0.5,
            latency_seconds=1.0,
            timeout=30.0,
        )
    else:
        cfg = loadgen.Config(
            clients=1000,
            fanout_clients=10000,
            unicast_pushes=20000,
            offline_pushes=50000,
            broadcasts=5,
            min_seconds=2.0,
            latency_seconds=5.0,
        )
    if args.max:
        cfg.max_clients = max_clients(fd_limit, args.max_cap)
    return cfg


def main() -> None:
    """Parse options, run every session against every server, print the tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small N, one repetition")
    parser.add_argument(
        "--reps", type=int, help="repetitions (default 3, quick 1; 0 with --profile: profile only)"
    )
    parser.add_argument("--max", action="store_true", help="add the fd-limited connect test")
    parser.add_argument("--max-cap", type=int, default=50000, help="upper bound for --max")
    parser.add_argument("--server-cmd", help="measure this command instead of pushsvc")
    parser.add_argument("--server-name", help="column name for --server-cmd")
    parser.add_argument("--loop", choices=("auto", "uvloop", "asyncio"), default="auto")
    parser.add_argument("--json", type=Path, help="write all raw results here")
    parser.add_argument("--profile", type=Path, metavar="DIR", help="py-spy profile of pushsvc")
    args = parser.parse_args()

    fd_limit = raise_fd_limit()
    if (os.cpu_count() or 1) >= 2:
        os.sched_setaffinity(0, {1})  # generator on core 1, servers on core 0
    else:
        print("warning: one CPU only; generator and server share it", file=sys.stderr)
    cfg = build_config(args, fd_limit)
    reps = args.reps if args.reps is not None else (1 if args.quick else 3)
    loop = new_loop_factory(args.loop)

    candidate = args.server_name or ("custom" if args.server_cmd else "pushsvc")
    servers = {"reference": REFERENCE_CMD}
    if args.server_cmd:
        servers = {candidate: args.server_cmd, **servers}
    elif pushsvc_available():
        servers = {candidate: PUSHSVC_CMD, **servers}
    else:
        print("pushsvc is not installed (pip install -e .): not measured", file=sys.stderr)
    names = [candidate, "reference"]

    info = machine()
    print(
        f"# {info['nproc']} CPUs, {info['cpu']}, Python {info['python']}; "
        f"project at {info['commit']}; {time.strftime('%Y-%m-%d %H:%M %Z')}; "
        f"fd limit {fd_limit}; generator loop {loop.__module__.split('.')[0]}; "
        f"{reps} repetition(s); "
        f"load average at start {Path('/proc/loadavg').read_text().split()[0]}",
        flush=True,
    )
    sessions = ["unicast", "fanout"] + (["max"] if cfg.max_clients else [])
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory(prefix="pushbench-") as tmp:
        log_dir = Path(tmp)
        for rep in range(reps):
            for name, template in servers.items():
                merged: dict[str, Any] = {}
                for session in sessions:
                    t0 = time.monotonic()
                    merged.update(run_session(template, name, session, cfg, log_dir, loop))
                    took = time.monotonic() - t0
                    print(f"  rep {rep + 1} {name} {session}: {took:.1f} s", flush=True)
                results[name].append(merged)
        profile = None
        if args.profile and candidate in servers:
            profile = profile_pushsvc(servers[candidate], cfg, log_dir, args.profile, loop)

    if reps == 0:
        if profile:
            print(f"\npy-spy profile of {candidate} ({args.profile}):\n\n{profile}")
        return
    print()
    print(render_table(results, names, cfg))
    print()
    print("CPU busy during each measured window (median). In the throughput rows the")
    print("server should be near 100 %; much less means it waited for the generator or")
    print("lost core 0 to another process (re-run on a quieter machine). Frames per")
    print("client read > 1 means the server sent several frames to a client at once:")
    print()
    print(render_busy(results, names))
    print()
    print(render_logs(results, names))
    if profile:
        print(f"\npy-spy profile of {candidate} ({args.profile}):\n")
        print(profile)
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "results": results}, indent=1))


if __name__ == "__main__":
    main()
