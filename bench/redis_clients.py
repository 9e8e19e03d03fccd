"""Redis clients for Twisted, side by side: PUBLISH round trips and subscriber messages per core.

    python bench/redis_clients.py              # 3 repetitions, a minute or so
    python bench/redis_clients.py --quick      # one short repetition

Starts its own redis-server on a free 127.0.0.1 port (pinned to core 0 when
``taskset`` exists) and runs each candidate in a process of its own pinned to
core 1, so that each candidate's CPU time (``time.process_time``) is its own.
Two measurements per candidate, as a node uses Redis:

- publish: PUBLISH to a channel nobody subscribes to, ``WINDOW`` commands
  issued per reactor turn and the next window issued when all are answered
  (as a node does under load); messages per second of the client's CPU;
- subscribe: a raw socket PUBLISHes ``MESSAGES`` messages as fast as Redis
  takes them; the candidate's subscriber connection receives them; messages
  per second of the client's CPU, from the first message to the last.

Candidates: ``txredisapi`` (the client pushsvc used before),
``pushsvc`` (pushsvc/broker/connection.py: hiredis's C parser, a callback per
command, writes batched per reactor turn) and ``pushsvc-deferred`` (the same
engine, a Deferred per command, as Shard.call gives callers off the hot path).
Figures are ratios to txredisapi in the same invocation: the machine is shared.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CANDIDATES = ("txredisapi", "pushsvc", "pushsvc-deferred")
WINDOW = 100
PAYLOAD = b'{"percent":"88%"}' * 4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pinned(core: str) -> list[str]:
    return ["taskset", "-c", core] if shutil.which("taskset") else []


def start_redis(workdir: str) -> tuple[subprocess.Popen, int]:
    port = free_port()
    redis = shutil.which("redis-server") or "/usr/bin/redis-server"
    cmd = [*pinned("0"), redis, "--port", str(port), "--bind", "127.0.0.1"]
    cmd += ["--save", "", "--appendonly", "no", "--dir", workdir]
    # A slow subscriber must not be disconnected for its backlog: it is what is measured.
    cmd += ["--client-output-buffer-limit", "pubsub 0 0 0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    for _ in range(200):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return proc, port
        except OSError:
            time.sleep(0.05)
    raise SystemExit("redis-server did not start")


# -- inside a candidate's process -------------------------------------------------


def run_candidate(name: str, mode: str, port: int, count: int) -> dict[str, float]:
    """One measurement in this process; prints nothing, returns the figures."""
    from twisted.internet import reactor

    result: dict[str, float] = {}
    starter = _txredisapi if name == "txredisapi" else _pushsvc
    reactor.callWhenRunning(starter, name, mode, port, count, result)
    reactor.run()
    return result


def _finish(result: dict[str, float], count: int, cpu0: float, wall0: float) -> None:
    from twisted.internet import reactor

    cpu = time.process_time() - cpu0
    result.update(per_cpu_s=count / cpu, per_s=count / (time.monotonic() - wall0))
    reactor.stop()


def _publisher(port: int, count: int) -> None:
    """Another process's PUBLISHes, pipelined on a raw socket, for the subscribe measurement."""
    command = b"*3\r\n$7\r\nPUBLISH\r\n$5\r\nbench\r\n$%d\r\n%s\r\n" % (len(PAYLOAD), PAYLOAD)
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(command * count)
        got = 0
        while got < count:
            got += s.recv(1 << 20).count(b"\r\n")


def _start_publisher(port: int, count: int) -> None:
    code = f"import sys; sys.path.insert(0, {str(ROOT / 'bench')!r}); import redis_clients as r"
    code += f"; r._publisher({port}, {count})"
    subprocess.Popen([*pinned("0"), sys.executable, "-c", code])


def _txredisapi(name: str, mode: str, port: int, count: int, result: dict[str, float]) -> None:
    import txredisapi
    from twisted.internet import defer

    if mode == "publish":

        @defer.inlineCallbacks
        def go() -> Any:
            conn = yield txredisapi.Connection("127.0.0.1", port, reconnect=False)
            cpu0, wall0 = time.process_time(), time.monotonic()
            for _ in range(count // WINDOW):
                yield defer.gatherResults([conn.publish("nobody", PAYLOAD) for _ in range(WINDOW)])
            _finish(result, count, cpu0, wall0)

        go()
        return
    received = [0, 0.0, 0.0]

    class Sub(txredisapi.SubscriberProtocol):
        def connectionMade(self) -> Any:
            d = super().connectionMade()  # as pushsvc's shard did on txredisapi
            d.addCallback(lambda _: self.subscribe("bench"))
            return d.addCallback(lambda _: _start_publisher(port, count))

        def messageReceived(self, pattern: Any, channel: Any, message: Any) -> None:
            if received[0] == 0:
                received[1], received[2] = time.process_time(), time.monotonic()
            received[0] += 1
            if received[0] == count:
                _finish(result, count - 1, received[1], received[2])

    from twisted.internet import reactor

    factory = txredisapi.SubscriberFactory()
    factory.protocol = Sub
    factory.continueTrying = False
    reactor.connectTCP("127.0.0.1", port, factory)


def _pushsvc(name: str, mode: str, port: int, count: int, result: dict[str, float]) -> None:
    from twisted.internet import defer, reactor
    from twisted.internet.protocol import ClientCreator

    from pushsvc.broker.connection import RedisConnection

    def nothing(_: Any) -> None:
        pass

    if mode == "publish":

        def ready(conn: RedisConnection) -> None:
            cpu0, wall0 = time.process_time(), time.monotonic()
            left = [count // WINDOW]

            def window(_: Any = None) -> None:
                if not left[0]:
                    _finish(result, count, cpu0, wall0)
                    return
                left[0] -= 1
                if name == "pushsvc":
                    pending = [WINDOW]

                    def one(reply: Any) -> None:
                        pending[0] -= 1
                        if not pending[0]:
                            window()

                    for _ in range(WINDOW):
                        conn.send(("PUBLISH", "nobody", PAYLOAD), one)
                else:
                    calls = [conn.command("PUBLISH", "nobody", PAYLOAD) for _ in range(WINDOW)]
                    defer.gatherResults(calls).addCallback(window)

            window()

        proto = RedisConnection("bench", [("ROLE",)], lambda a: None, ready, nothing)
    else:
        received = [0, 0.0, 0.0]

        def pushed(reply: list[Any]) -> None:
            if reply[0] != b"message":
                _start_publisher(port, count)  # the subscription is confirmed
                return
            if received[0] == 0:
                received[1], received[2] = time.process_time(), time.monotonic()
            received[0] += 1
            if received[0] == count:
                _finish(result, count - 1, received[1], received[2])

        def subscribe(conn: RedisConnection) -> None:
            conn.send(("SUBSCRIBE", "bench"), nothing)

        proto = RedisConnection("bench", [("ROLE",)], lambda a: None, subscribe, nothing, pushed)
    ClientCreator(reactor, lambda: proto).connectTCP("127.0.0.1", port)


# -- the parent ---------------------------------------------------------------------


def measure(name: str, mode: str, port: int, count: int) -> dict[str, float]:
    code = f"import sys, json; sys.path.insert(0, {str(ROOT / 'bench')!r}); "
    code += "import redis_clients as r; "
    code += f"print(json.dumps(r.run_candidate({name!r}, {mode!r}, {port}, {count})))"
    out = subprocess.run(
        [*pinned("1"), sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one short repetition")
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    reps = 1 if args.quick else args.reps
    counts = {
        "publish": 20000 if args.quick else 100000,
        "subscribe": 50000 if args.quick else 100000,
    }
    with tempfile.TemporaryDirectory() as tmp:
        redis, port = start_redis(tmp)
        try:
            runs: dict[tuple[str, str], list[dict[str, float]]] = {}
            for _ in range(reps):  # alternate candidates: noise hits them alike
                for mode in ("publish", "subscribe"):
                    for name in CANDIDATES:
                        runs.setdefault((name, mode), []).append(
                            measure(name, mode, port, counts[mode])
                        )
        finally:
            redis.kill()
    print(
        f"Redis clients, median of {reps}; client on core 1, Redis on core 0 "
        f"({os.cpu_count()} cores); payload {len(PAYLOAD)} bytes"
    )
    print(f"{'client':<18}{'mode':<11}{'msgs/CPU-s':>12}{'msgs/s':>10}{'vs txredisapi':>15}")
    for mode in ("publish", "subscribe"):
        base = statistics.median(r["per_cpu_s"] for r in runs[("txredisapi", mode)])
        for name in CANDIDATES:
            per_cpu = statistics.median(r["per_cpu_s"] for r in runs[(name, mode)])
            per_s = statistics.median(r["per_s"] for r in runs[(name, mode)])
            print(f"{name:<18}{mode:<11}{per_cpu:>12,.0f}{per_s:>10,.0f}{per_cpu / base:>14.1f}x")


if __name__ == "__main__":
    main()
