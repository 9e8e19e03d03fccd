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
    python bench/run.py --cluster  # two nodes and Redis next to one node
    python bench/run.py --targets  # 1,000 connections at once; RSS over connect/close cycles

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
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, replace
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
# No HTTP port: its default (8080) would collide with anything else running.
# The WebSocket endpoint names no backlog, so pushsvc gives it 1,024
# (pushsvc.tap.LISTEN_BACKLOG); the burst comparison also runs Twisted's 50.
PUSHSVC_CMD = (
    "taskset -c 0 twistd -n --pidfile= push"
    " --ws-port tcp:{ws_port}:interface=127.0.0.1"
    " --text-port tcp:{text_port}:interface=127.0.0.1 --http-port off"
)
PUSHSVC_BACKLOG50_CMD = (
    "taskset -c 0 twistd -n --pidfile= push"
    " --ws-port tcp:{ws_port}:interface=127.0.0.1:backlog=50"
    " --text-port tcp:{text_port}:interface=127.0.0.1 --http-port off"
)
# A cluster node: CPUS, REDIS_PORT filled in first; no HTTP port (two nodes).
NODE_CMD = (
    "taskset -c CPUS twistd -n --pidfile= push"
    " --ws-port tcp:{ws_port}:interface=127.0.0.1"
    " --text-port tcp:{text_port}:interface=127.0.0.1"
    " --http-port off --redis redis://127.0.0.1:REDIS_PORT"
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


def start_server(
    template: str,
    log_dir: Path,
    name: str,
    ports: tuple[int, int] | None = None,
    env: dict[str, str] | None = None,
) -> Server:
    """Start a server on fresh ports (or ``ports``, shared) and wait until both ports accept."""
    ws_port, text_port = ports or (free_port(), free_port())
    while text_port == ws_port:
        text_port = free_port()
    argv = shlex.split(template.format(ws_port=ws_port, text_port=text_port))
    log_path = log_dir / f"{name}-{ws_port}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env or SERVER_ENV)
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
# Cluster: two nodes and Redis, next to one node
# --------------------------------------------------------------------------


def start_redis(log_dir: Path, cpus: str) -> tuple[subprocess.Popen[bytes], int]:
    """A throw-away ``redis-server`` (no persistence) on a free port, pinned to ``cpus``."""
    port = free_port()
    argv = ["taskset", "-c", cpus, "redis-server", "--port", str(port), "--bind", HOST]
    argv += ["--save", "", "--appendonly", "no"]
    with open(log_dir / f"redis-{port}.log", "wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 15
    while True:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"redis-server did not start on port {port}")
        try:
            socket.create_connection((HOST, port), timeout=1).close()
            return proc, port
        except OSError:
            time.sleep(0.05)


def stop_proc(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL if it lingers."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def wait_subscribed(redis_port: int, expected: int, timeout: float = 30.0) -> None:
    """Wait until the nodes have SUBSCRIBEd ``expected`` uid channels.

    A client is registered on its node when its pong arrives, but the node's
    SUBSCRIBE is batched and asynchronous; a push through another node before
    it lands would rightly be answered ``fail``.
    """
    deadline = time.monotonic() + timeout
    while True:
        reader, writer = await asyncio.open_connection(HOST, redis_port)
        writer.write(b"PUBSUB NUMPAT\r\nPUBSUB CHANNELS pushsvc:u:*\r\n")
        await reader.readline()  # NUMPAT's integer
        head = await reader.readline()  # "*<count>" of the channel list
        writer.close()
        if int(head[1:]) >= expected:
            return
        if time.monotonic() > deadline:
            raise loadgen.BenchError(f"only {int(head[1:])} of {expected} uids subscribed")
        await asyncio.sleep(0.05)


@contextmanager
def affinity(cpus: set[int]) -> Iterator[None]:
    """Run the generator on ``cpus`` for a while."""
    old = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, old)


# Requests in flight in all in the cluster comparison (see unicast_session).
CLUSTER_WINDOW = 1000
# Seconds after the last reply a missing frame counts as lost: twice the
# nodes' --redis-timeout, after which a node drops a message.
LOSS_WAIT = 2.0


@asynccontextmanager
async def spying(profile: tuple[Path, list[int]] | None, scenario: str) -> AsyncIterator[None]:
    """py-spy on each node (``cluster-node{A,B}-{scenario}.txt``) while the block runs."""
    if profile is None:
        yield
        return
    out_dir, pids = profile
    out_dir.mkdir(parents=True, exist_ok=True)
    spies = []
    for k, pid in enumerate(pids):
        raw = out_dir / f"cluster-node{'AB'[k]}-{scenario}.txt"
        argv = ["py-spy", "record", "--pid", str(pid), "--rate", "250"]
        argv += ["--format", "raw", "-o", str(raw)]
        spies.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    await asyncio.sleep(1.0)
    try:
        yield
    finally:
        for spy in spies:
            spy.send_signal(signal.SIGINT)
            await asyncio.get_running_loop().run_in_executor(None, spy.wait)


async def unicast_session(
    target: loadgen.Target,
    cfg: loadgen.Config,
    connect_to: list[int],
    redis_port: int | None,
    which: tuple[str, ...],
    profile: tuple[Path, list[int]] | None = None,
) -> dict[str, Any]:
    """Clients spread over the ``connect_to`` WebSocket ports, then unicast/latency scenarios."""
    hub = loadgen.Hub(HOST, connect_to[0])
    results: dict[str, Any] = {}
    clients: list[loadgen.WsClient] = []
    try:
        share = cfg.clients // len(connect_to)
        for k, port in enumerate(connect_to):
            part = loadgen.Target(HOST, port, target.text_port, target.pid, target.extra_pids)
            res, got = await loadgen.scenario_connect(part, hub, share, cfg, prefix=f"n{k}u")
            clients += got
            results.setdefault("connect", res)
        if redis_port is not None:
            await wait_subscribed(redis_port, len(clients))
        if "unicast_1" in which:
            async with spying(profile, "unicast"):
                results["unicast_1"] = await loadgen.scenario_unicast(
                    target, hub, clients, 1, cfg, loss_wait=LOSS_WAIT
                )
        if "unicast_8" in which:
            # 1,000 requests in flight in all, as with one backend connection:
            # 8 x 1,000 through a cluster on one core outlast --redis-timeout.
            few = replace(cfg, pipeline_window=CLUSTER_WINDOW // 8)
            async with spying(profile, "unicast8"):
                results["unicast_8"] = await loadgen.scenario_unicast(
                    target, hub, clients, 8, few, loss_wait=LOSS_WAIT
                )
        if "pipelined" in which:
            # The seed's PHP loop in a bulk job: every line written at once, no
            # cap on requests in flight; every reply must still be true.
            uncapped = replace(cfg, pipeline_window=cfg.unicast_pushes)
            results["pipelined"] = await loadgen.scenario_unicast(
                target, hub, clients, 1, uncapped, loss_wait=LOSS_WAIT
            )
        if "latency" in which:
            results["latency"] = await loadgen.scenario_latency(target, hub, clients, cfg)
    finally:
        loadgen.close_clients(clients)
    return results


def run_cluster_setup(
    setup: str, cfg: loadgen.Config, log_dir: Path, loop: LoopFactory, profile: Path | None = None
) -> dict:
    """One fresh set of processes for ``setup``, its scenarios, teardown.

    - ``single``: one pushsvc (no Redis) on core 0, generator on core 1.
    - ``cluster``: nodes A and B and Redis all on core 0, generator on core 1;
      clients on A, backends through B: every push crosses Redis.
    - ``one_process``: one pushsvc on core 0, generator free to use both cores.
    - ``node_per_core``: node 0 on core 0, node 1 on core 1, Redis and the
      generator free to use both; clients and backends spread over both nodes.
    - ``reuse_port``: as ``node_per_core``, but both nodes on the same ports
      with --reuse-port: the kernel spreads clients and backend connections.
    """
    servers: list[Server] = []
    redis: subprocess.Popen[bytes] | None = None
    redis_port: int | None = None
    all_cores = {0, 1}
    try:
        if setup in ("single", "one_process"):
            servers.append(start_server(PUSHSVC_CMD, log_dir, setup))
        else:
            redis, redis_port = start_redis(log_dir, "0" if setup == "cluster" else "0,1")
            cpus = ("0", "0") if setup == "cluster" else ("0", "1")
            for k, cpu in enumerate(cpus):
                node = NODE_CMD.replace("CPUS", cpu).replace("REDIS_PORT", str(redis_port))
                shared = None
                if setup == "reuse_port":
                    node += " --reuse-port"
                    shared = (servers[0].target.ws_port, servers[0].target.text_port) if k else None
                servers.append(start_server(node, log_dir, f"{setup}-node{k}", shared))
        time.sleep(0.3)
        first, last = servers[0].target, servers[-1].target
        extra = tuple(s.proc.pid for s in servers[1:]) + ((redis.pid,) if redis else ())
        target = loadgen.Target(HOST, first.ws_port, last.text_port, first.pid, extra)
        connect_to = [first.ws_port]
        which: tuple[str, ...] = ("unicast_1", "unicast_8", "pipelined", "latency")
        if setup == "node_per_core":
            target.backend_ports = tuple(s.target.text_port for s in servers)
            connect_to = [s.target.ws_port for s in servers]
        if setup in ("one_process", "node_per_core", "reuse_port"):
            which = ("unicast_8",)
        spied = None
        if profile is not None and setup == "cluster":
            spied = (profile, [s.proc.pid for s in servers])
        session = unicast_session(target, cfg, connect_to, redis_port, which, spied)
        with affinity(all_cores if setup in SPREAD_SETUPS else {1}):
            with asyncio.Runner(loop_factory=loop) as runner:
                results = runner.run(session)
        for server in servers:
            if server.proc.poll() is not None:
                raise RuntimeError(f"{setup}: a node died:\n{server.log_tail()}")
        return results
    except (loadgen.BenchError, OSError, asyncio.TimeoutError) as exc:
        tails = "\n".join(s.log_tail() for s in servers)
        raise RuntimeError(f"{setup}: {exc!r}\n{tails}") from exc
    finally:
        for server in servers:
            stop_server(server)
        if redis is not None:
            stop_proc(redis)


CLUSTER_SETUPS = ("single", "cluster", "one_process", "node_per_core", "reuse_port")
# Setups whose generator shares both cores with the servers.
SPREAD_SETUPS = ("one_process", "node_per_core", "reuse_port")


def cluster_rows(cfg: loadgen.Config) -> list[tuple[str, list[Row]]]:
    """Rows of the cluster table (single node vs two nodes through Redis)."""
    pushes = [
        ("pushes/s (replies)", "push_per_s", ",.0f", True),
        ("server CPU µs/push (all processes)", "server_cpu_us_per_push", ",.1f", False),
        ("% answered ok but never delivered", "lost_pct", ".2f", False),
    ]
    return [
        (
            f"connect {cfg.clients:,} clients",
            [("connect", "server_cpu_us_per_conn", "server CPU µs/connection", ",.0f", False)],
        ),
        (
            f"unicast, 1 backend conn → {cfg.clients:,} clients",
            [("unicast_1", f, label, fmt, hi) for label, f, fmt, hi in pushes],
        ),
        (
            f"unicast, 8 backend conns × {CLUSTER_WINDOW // 8} in flight → {cfg.clients:,} clients",
            [("unicast_8", f, label, fmt, hi) for label, f, fmt, hi in pushes],
        ),
        (
            f"unicast, 1 backend conn, all {cfg.unicast_pushes:,} lines at once → "
            f"{cfg.clients:,} clients",
            [("pipelined", f, label, fmt, hi) for label, f, fmt, hi in pushes],
        ),
        (
            f"latency at {cfg.latency_rate:,} pushes/s",
            [
                ("latency", "p50_ms", "p50 ms", ".2f", False),
                ("latency", "p90_ms", "p90 ms", ".2f", False),
                ("latency", "p99_ms", "p99 ms", ".2f", False),
                ("latency", "server_cpu_us_per_push", "server CPU µs/push", ",.0f", False),
            ],
        ),
    ]


def render_pair(
    runs_a: list[dict[str, Any]],
    runs_b: list[dict[str, Any]],
    heads: tuple[str, str],
    groups: list[tuple[str, list[Row]]],
) -> str:
    """Markdown table of two setups' medians and the second-over-first ratio."""
    a, b = heads
    lines = [f"| scenario | figure | {a} | {b} | {b} / {a} |", "|---|---|---:|---:|---:|"]
    for title, rows in groups:
        for i, (key, fig, label, fmt, higher) in enumerate(rows):
            va, ma = median_cell(runs_a, key, fig)
            vb, mb = median_cell(runs_b, key, fig)
            ca = "not measured" if va is None else format(va, fmt) + ma
            cb = "not measured" if vb is None else format(vb, fmt) + mb
            ratio = f"{vb / va:.2f}" if va and vb is not None else "–"
            arrow = "↑" if higher else "↓"
            lines.append(f"| {title if i == 0 else ''} | {label} {arrow} | {ca} | {cb} | {ratio} |")
    return "\n".join(lines)


def render_cluster(results: dict[str, list[dict[str, Any]]], cfg: loadgen.Config) -> str:
    """The cluster report: tables, CPU split per process, busy shares."""
    out = [
        "Single node vs cluster (clients on node A, backends through node B, every push"
        " through Redis). Servers on core 0 (the cluster: A, B and Redis all on core 0),"
        " generator on core 1:",
        "",
        render_pair(
            results["single"], results["cluster"], ("1 node", "2 nodes + Redis"), cluster_rows(cfg)
        ),
        "",
        "Cluster CPU µs/push by process (node A / node B / Redis), median, and pushes per"
        " context switch of each (how many pushes one wake-up of the process handled;"
        " the 1 node column's: single):",
        "",
    ]
    for key in ("unicast_1", "unicast_8", "latency"):
        runs = [r[key] for r in results["cluster"] if key in r]
        if runs:
            parts = [
                statistics.median(r["server_cpu_us_per_push_by_process"][k] for r in runs)
                for k in range(3)
            ]
            batches = [
                statistics.median(r["pushs_per_switch_by_process"][k] for r in runs)
                for k in range(3)
            ]
            single = statistics.median(
                r[key]["pushs_per_switch_by_process"][0] for r in results["single"] if key in r
            )
            out.append(
                f"- {key}: {' / '.join(f'{v:.1f}' for v in parts)} µs; pushes per switch"
                f" {' / '.join(f'{v:.1f}' for v in batches)} (single: {single:.1f})"
            )
    rows: list[tuple[str, list[Row]]] = [
        (
            f"unicast, 8 backend conns × {CLUSTER_WINDOW // 8} in flight → {cfg.clients:,} clients",
            [
                ("unicast_8", "push_per_s", "pushes/s (replies)", ",.0f", True),
                ("unicast_8", "server_cpu_us_per_push", "server CPU µs/push", ",.1f", False),
                ("unicast_8", "lost_pct", "% answered ok but never delivered", ".2f", False),
            ],
        )
    ]
    out += [
        "",
        "One process vs one node per core (node 0 on core 0, node 1 on core 1, Redis"
        " unpinned, clients and backends spread over both nodes). The generator is NOT"
        " pinned here: it shares both cores with the servers in both columns.",
        "",
        render_pair(
            results["one_process"],
            results["node_per_core"],
            ("1 process", "1 node per core"),
            rows,
        ),
        "",
        "One process vs 2 processes with --reuse-port on 2 cores (one set of ports; the"
        " kernel spreads clients and backend connections; otherwise as above):",
        "",
        render_pair(
            results["one_process"],
            results["reuse_port"],
            ("1 process", "2 processes, --reuse-port"),
            rows,
        ),
        "",
        "CPU busy (median; server % is the sum over the setup's processes, of one core):",
        "",
        "| setup | scenario | server % | generator % |",
        "|---|---|---:|---:|",
    ]
    for setup in CLUSTER_SETUPS:
        for key in ("connect", "unicast_1", "unicast_8", "latency"):
            runs = [r[key] for r in results[setup] if key in r]
            if runs:
                srv = statistics.median(r["server_cpu_pct"] for r in runs)
                gen = statistics.median(r["gen_cpu_pct"] for r in runs)
                out.append(f"| {setup} | {key} | {srv:.0f} | {gen:.0f} |")
    return "\n".join(out)


def run_cluster(
    cfg: loadgen.Config, reps: int, log_dir: Path, loop: LoopFactory, profile: Path | None
) -> dict:
    """Every cluster setup, ``reps`` times, alternating; raw results per setup."""
    if shutil.which("redis-server") is None:
        raise SystemExit("--cluster needs redis-server on PATH")
    results: dict[str, list[dict[str, Any]]] = {setup: [] for setup in CLUSTER_SETUPS}
    for rep in range(reps):
        for setup in CLUSTER_SETUPS:
            t0 = time.monotonic()
            spied = profile if rep == reps - 1 else None  # last repetition: sampled
            results[setup].append(run_cluster_setup(setup, cfg, log_dir, loop, spied))
            print(f"  rep {rep + 1} {setup}: {time.monotonic() - t0:.1f} s", flush=True)
    return results


# --------------------------------------------------------------------------
# The targets not in the main table: a burst, and memory after closes
# --------------------------------------------------------------------------

BURST_SERVERS = {
    "pushsvc, backlog 1024 (its default)": PUSHSVC_CMD,
    "pushsvc, backlog 50 (Twisted's default, with backlog=50)": PUSHSVC_BACKLOG50_CMD,
    "reference (asyncio, backlog 100)": REFERENCE_CMD,
}


# Memory after close, with glibc's trim off (what the allocators keep) and every
# second (what the trimmer gives back; the reading 1 s after close follows one).
MEMORY_SERVERS = {
    "no trim (--trim-interval 0)": PUSHSVC_CMD + " --trim-interval 0",
    "trim every 1 s (--trim-interval 1)": PUSHSVC_CMD + " --trim-interval 1",
}


def run_targets(
    cfg: loadgen.Config, n_burst: int, n_cycle: int, cycles: int, log_dir: Path, loop: LoopFactory
) -> dict[str, Any]:
    """Burst connects against each BURST_SERVERS entry; RSS over connect/close cycles."""
    out: dict[str, Any] = {"burst": {}, "memory": {}}
    for name, template in BURST_SERVERS.items():
        server = start_server(template, log_dir, "burst")
        try:
            time.sleep(0.3)
            hub = loadgen.Hub(HOST, server.target.ws_port)
            with asyncio.Runner(loop_factory=loop) as runner:
                burst = loadgen.scenario_burst(server.target, hub, n_burst, cfg)
                out["burst"][name] = runner.run(burst)
        finally:
            stop_server(server)
        print(f"  burst {name}: done", flush=True)
    for name, template in MEMORY_SERVERS.items():
        server = start_server(template, log_dir, "memory")
        try:
            time.sleep(0.3)
            with asyncio.Runner(loop_factory=loop) as runner:
                cycle = loadgen.scenario_memory_cycles(server.target, n_cycle, cycles, cfg)
                out["memory"][name] = runner.run(cycle)
        finally:
            stop_server(server)
        print(f"  memory {name}: done", flush=True)
    return out


def render_targets(out: dict[str, Any]) -> str:
    """Burst and memory-cycle figures as text."""
    lines = [
        "| server | connects ≥ 1 s | registered ≥ 1 s | registered p50 / p99 / max ms"
        " | server CPU µs/conn | TcpExt counters (delta) |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for name, r in out["burst"].items():
        counters = ", ".join(f"{k} {v}" for k, v in r["tcp_counters"].items()) or "unreadable"
        lines.append(
            f"| {name} | {r['connect_over_1s']} | {r['registered_over_1s']}"
            f" | {r['registered_p50_ms']:.0f} / {r['registered_p99_ms']:.0f}"
            f" / {r['registered_max_ms']:.0f} | {r['server_cpu_us_per_conn']:.0f} | {counters} |"
        )
    lines.append("")
    for name, m in out["memory"].items():
        lines.append(
            f"pushsvc RSS, {name}, {m['clients']:,} clients connected then reset, per cycle"
            f" (MiB): start {m['rss_kib_start'] / 1024:.1f}; connected "
            + ", ".join(f"{v / 1024:.1f}" for v in m["rss_kib_connected"])
            + "; after close "
            + ", ".join(f"{v / 1024:.1f}" for v in m["rss_kib_after_close"]),
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------
# Connection set-up: this tree, another checkout, the reference
# --------------------------------------------------------------------------


def tree_env(tree: Path) -> dict[str, str]:
    """The environment of a pushsvc server run from another checkout."""
    return {**os.environ, "PYTHONPATH": str(tree.resolve())}


def on_fresh_server(
    template: str, env: dict[str, str], log_dir: Path, label: str, measure: Callable[[Server], Any]
) -> Any:
    """``measure(server)`` on a server of its own, stopped afterwards whatever happens."""
    server = start_server(template, log_dir, label, env=env)
    if "--ws-port ssl:" in template:
        server.target.tls = loadgen.client_tls()
    try:
        time.sleep(0.3)
        return measure(server)
    finally:
        stop_server(server)


def run_connect(
    servers: dict[str, tuple[str, dict[str, str]]],
    sizes: list[int],
    reps: int,
    cfg: loadgen.Config,
    log_dir: Path,
    loop: LoopFactory,
) -> dict[str, list[dict[str, Any]]]:
    """Each size on a fresh server of each kind, alternating, ``reps`` times."""

    def connect(n: int) -> Callable[[Server], dict[str, Any]]:
        def measure(server: Server) -> dict[str, Any]:
            hub = loadgen.Hub(HOST, server.target.ws_port)
            with asyncio.Runner(loop_factory=loop) as runner:
                res, clients = runner.run(loadgen.scenario_connect(server.target, hub, n, cfg))
                loadgen.close_clients(clients)
            return res

        return measure

    out: dict[str, list[dict[str, Any]]] = {name: [] for name in servers}
    for rep in range(reps):
        for name, (template, env) in servers.items():
            out[name].append(
                {
                    f"connect_{n}": on_fresh_server(template, env, log_dir, "connect", connect(n))
                    for n in sizes
                }
            )
            print(f"  rep {rep + 1} {name}: done", flush=True)
    return out


def tls_servers(
    servers: dict[str, tuple[str, dict[str, str]]], directory: Path
) -> dict[str, tuple[str, dict[str, str]]]:
    """Each pushsvc also with its WebSocket port on TLS (the reference has no TLS)."""
    sys.path.insert(0, str(PROJECT_DIR / "tests"))
    from certificate import self_signed  # the tests' self-signed key for 127.0.0.1

    key, cert = self_signed(directory)
    plain = " --ws-port tcp:{ws_port}:interface=127.0.0.1"
    tls = f" --ws-port ssl:{{ws_port}}:interface=127.0.0.1:privateKey={key}:certKey={cert}"
    out = {}
    for name, (template, env) in servers.items():
        out[name] = (template, env)
        if plain in template:
            out[f"{name} TLS"] = (template.replace(plain, tls), env)
    return out


def run_storm(
    servers: dict[str, tuple[str, dict[str, str]]],
    n: int,
    rate: int,
    reps: int,
    cfg: loadgen.Config,
    log_dir: Path,
    loop: LoopFactory,
) -> dict[str, list[dict[str, Any]]]:
    """The reconnect storm on a fresh server of each kind, alternating, ``reps`` times."""

    def storm(server: Server) -> dict[str, Any]:
        with asyncio.Runner(loop_factory=loop) as runner:
            return {"storm": runner.run(loadgen.scenario_storm(server.target, n, rate, cfg))}

    out: dict[str, list[dict[str, Any]]] = {name: [] for name in servers}
    for rep in range(reps):
        for name, (template, env) in servers.items():
            out[name].append(on_fresh_server(template, env, log_dir, "storm", storm))
            print(f"  rep {rep + 1} {name} storm: done", flush=True)
    return out


STORM_ROWS = (
    ("all_back_s", "all registered again, s after the drop ↓", ".2f"),
    ("back_p50_s", "p50 registered again, s ↓", ".2f"),
    ("server_cpu_us_per_conn", "server CPU µs/reconnection ↓", ".0f"),
    ("server_cpu_pct", "server % of core 0", ".0f"),
    ("pushes", "pushes during the storm", ".0f"),
    ("pushes_ok", "answered ok", ".0f"),
    ("pushes_fail", "answered fail", ".0f"),
    ("ok_not_delivered", "answered ok, never delivered ↓", ".0f"),
)


def render_storm(results: dict[str, list[dict[str, Any]]], n: int) -> str:
    """Medians of the storm's figures, one column per server."""
    names = list(results)
    lines = [
        f"| reconnect storm of {n:,} | " + " | ".join(names) + " |",
        "|---|" + "---:|" * len(names),
    ]
    for fig, label, fmt in STORM_ROWS:
        cells = [median_cell(results[k], "storm", fig)[0] for k in names]
        lines.append(
            f"| {label} | " + " | ".join("–" if v is None else format(v, fmt) for v in cells) + " |"
        )
    return "\n".join(lines)


def render_connect(results: dict[str, list[dict[str, Any]]], sizes: list[int]) -> str:
    """Medians of set-up CPU and RSS per connection; each column over the reference."""
    names = list(results)
    lines = [
        "| clients | figure | "
        + " | ".join(names)
        + " | "
        + " | ".join(f"{n} / reference" for n in names if n != "reference")
        + " |",
        "|---|---|" + "---:|" * (2 * len(names) - 1),
    ]
    for n in sizes:
        for fig, label in (
            ("server_cpu_us_per_conn", "server CPU µs/connection ↓"),
            ("rss_kib_per_conn", "server RSS KiB/connection ↓"),
            ("server_cpu_pct", "server % of core 0"),
        ):
            vals = {k: median_cell(results[k], f"connect_{n}", fig)[0] for k in names}
            ref = vals.get("reference")
            cells = [f"{vals[k]:.1f}" for k in names]
            ratios = [f"{vals[k] / ref:.2f}" if ref else "–" for k in names if k != "reference"]
            lines.append(f"| {n:,} | {label} | " + " | ".join(cells + ratios) + " |")
    return "\n".join(lines)


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
    "frame or reply sent at once, incl. its send() (compat.write_now)": ("write_now (",),
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
        if "doPoll" in frames[-1] or "Condition.wait (threading" in frames[-1]:
            continue  # idle in epoll, or an idle thread-pool worker: not work
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
    parser.add_argument(
        "--cluster",
        action="store_true",
        help="instead of the table: two pushsvc nodes and redis-server next to one node",
    )
    parser.add_argument(
        "--targets",
        action="store_true",
        help="instead of the table: 1,000 connections at once, RSS over connect/close cycles",
    )
    parser.add_argument(
        "--connect",
        action="store_true",
        help="instead of the table: connection set-up at 1,000 and 10,000 clients only",
    )
    parser.add_argument(
        "--storm",
        action="store_true",
        help="instead of the table: 10,000 clients dropped at once reconnect (push.js backoff)",
    )
    parser.add_argument(
        "--tls",
        action="store_true",
        help="with --connect: pushsvc also with an ssl: endpoint (wss://), a self-signed key",
    )
    parser.add_argument(
        "--before",
        type=Path,
        metavar="DIR",
        help="with --connect: also measure the pushsvc of this checkout (a git worktree)",
    )
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
    chosen = {"pushsvc": (PUSHSVC_CMD, SERVER_ENV)}
    if args.before:
        chosen[f"pushsvc at {args.before.name}"] = (PUSHSVC_CMD, tree_env(args.before))
    chosen["reference"] = (REFERENCE_CMD, SERVER_ENV)
    if args.storm:
        n = 1000 if args.quick else 10000
        with tempfile.TemporaryDirectory(prefix="pushbench-") as tmp:
            storm = run_storm(chosen, n, 1000, reps, cfg, Path(tmp), loop)
        print()
        print(render_storm(storm, n))
        if args.json:
            args.json.write_text(json.dumps({"machine": info, "storm": storm}, indent=1))
        return
    if args.connect:
        sizes = [200, 2000] if args.quick else [1000, 10000]
        with tempfile.TemporaryDirectory(prefix="pushbench-") as tmp:
            if args.tls:
                chosen = tls_servers(chosen, Path(tmp))
            connected = run_connect(chosen, sizes, reps, cfg, Path(tmp), loop)
        print()
        print(render_connect(connected, sizes))
        if args.json:
            args.json.write_text(json.dumps({"machine": info, "connect": connected}, indent=1))
        return
    if args.cluster or args.targets:
        raw: dict[str, Any] = {}
        with tempfile.TemporaryDirectory(prefix="pushbench-") as tmp:
            if args.cluster:
                raw["cluster"] = run_cluster(cfg, reps, Path(tmp), loop, args.profile)
            if args.targets:
                n = 200 if args.quick else 1000
                cycle_n = 2000 if args.quick else 10000
                raw["targets"] = run_targets(cfg, n, cycle_n, 3, Path(tmp), loop)
        if "cluster" in raw:
            print()
            print(render_cluster(raw["cluster"], cfg))
            for scenario in ("unicast", "unicast8") if args.profile else ():
                for node in "AB":
                    raw_file = args.profile / f"cluster-node{node}-{scenario}.txt"
                    conns = "8 backend connections" if scenario == "unicast8" else "1"
                    print(f"\npy-spy profile of node {node}, unicast ({conns}), cluster:\n")
                    print(summarize_profile(raw_file))
        if "targets" in raw:
            print()
            print(render_targets(raw["targets"]))
        if args.json:
            args.json.write_text(json.dumps({"machine": info, **raw}, indent=1))
        return
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
