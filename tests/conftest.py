"""Real processes and real sockets: a ``twistd push`` per server fixture.

Servers listen on ephemeral ports (``tcp:0``); the ports are read back from
the "WebSocket on <host>:<port>" lines pushsvc logs for each listener.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from websockets.sync.client import ClientConnection, connect

ROOT = Path(__file__).resolve().parent.parent
TWISTD = shutil.which("twistd") or str(Path(sys.executable).with_name("twistd"))
STARTING = re.compile(rb"\] (WebSocket|backend|HTTP) on [^ ]*:(\d+)$", re.MULTILINE)


def free_port() -> int:
    """A 127.0.0.1 port nothing listens on (bound, then released), for servers given a number."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for a twistd child: this checkout's code, and no inherited secret.

    The checkout goes first on PYTHONPATH so that twistd finds this tree's
    plugin and package however (or whether) pushsvc was installed.
    """
    inherited = ("PUSHSVC_SECRET", "PUSHSVC_BACKEND_SECRET")
    env = {k: v for k, v in os.environ.items() if k not in inherited}
    env.update(extra or {})
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    return env


def fd_limit(nofile: int) -> Callable[[], None]:
    """A ``preexec_fn`` giving a child ``nofile`` descriptors (``ulimit -n``)."""

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    return limit


def new_uid(prefix: str = "u") -> str:
    """A uid no other test uses, so tests can share a server."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def until(predicate: Callable[[], object], timeout: float = 5.0, what: str = "condition") -> None:
    """Poll ``predicate`` until it holds; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not reached within {timeout} s")
        time.sleep(0.02)


class PushServer:
    """A ``twistd -n push`` subprocess on ephemeral 127.0.0.1 ports."""

    def __init__(
        self,
        workdir: Path,
        *args: str,
        env: dict[str, str] | None = None,
        nofile: int | None = None,
    ) -> None:
        self.workdir = workdir
        self.logfile = workdir / "twistd.log"
        cmd = [
            TWISTD,
            "-n",
            "--pidfile=",
            f"--logfile={self.logfile}",
            "push",
            "--ws-port=tcp:0:interface=127.0.0.1",
            "--text-port=tcp:0:interface=127.0.0.1",
            "--http-port=tcp:0:interface=127.0.0.1",
            *args,
        ]
        self.args = args
        self.proc = subprocess.Popen(
            cmd, cwd=workdir, env=child_env(env), preexec_fn=fd_limit(nofile) if nofile else None
        )
        ports = self._wait_for_ports()
        self.ws_port = ports["WebSocket"]
        self.text_port = ports["backend"]
        self.http_port = ports.get("HTTP")

    def _wait_for_ports(self, timeout: float = 20.0) -> dict[str, int]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"twistd exited with {self.proc.returncode}:\n{self.log()}")
            ports = dict(
                (name.decode(), int(port)) for name, port in STARTING.findall(self._log_bytes())
            )
            expected = 2 if "--http-port=off" in self.args else 3
            if len(ports) == expected:
                return ports
            time.sleep(0.05)
        raise RuntimeError(f"twistd did not start listening:\n{self.log()}")

    def _log_bytes(self) -> bytes:
        try:
            return self.logfile.read_bytes()
        except FileNotFoundError:
            return b""

    def log(self) -> str:
        return self._log_bytes().decode("utf-8", "replace")

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.ws_port}/"

    def ws(self, uid: str | None = None, path: str = "/", **kw) -> ClientConnection:
        """A real WebSocket client; sends ``uid`` as its first frame when given."""
        conn = connect(f"ws://127.0.0.1:{self.ws_port}{path}", open_timeout=5, **kw)
        if uid is not None:
            conn.send(uid)
        return conn

    def online(self, uid: str, clients: list) -> ClientConnection:
        """A WebSocket that said ``uid``, in ``clients`` (closed at teardown), once identified."""
        ws = self.ws(uid)
        clients.append(ws)
        self.wait_for(lambda s: s["pending"] == 0)
        return ws

    def backend(self) -> Backend:
        return Backend(self.text_port)

    def call(self, request: dict) -> dict:
        """One request with an ``id`` on a fresh backend connection; its JSON reply."""
        with self.backend() as b:
            return b.json(json.dumps({"id": 1, **request}))

    def wait_for(self, predicate, timeout: float = 5.0) -> None:
        """Poll the service (through its own stats command) until predicate(stats) holds."""
        deadline = time.monotonic() + timeout
        with self.backend() as b:
            while True:
                stats = b.json('{"cmd":"stats"}')
                if predicate(stats):
                    return
                if time.monotonic() > deadline:
                    raise AssertionError(f"condition not reached; last stats {stats}")
                time.sleep(0.02)

    def push_until_delivered(
        self, uid: str, data: str, connections: int = 1, timeout: float = 10.0
    ) -> None:
        """Push ``data`` to ``uid`` again and again until one push reaches ``connections``.

        The positive signal that a uid's connections have identified themselves,
        and, used as a marker, that nothing was sent to a connection before it:
        one connection's frames arrive in order.  Tries that reached fewer
        connections may have delivered ``data`` to some of them already.
        """
        deadline = time.monotonic() + timeout
        with self.backend() as b:
            while True:
                reply = b.json(json.dumps({"id": 1, "uid": uid, "data": data}))
                if reply["delivered"] >= connections:
                    return
                if time.monotonic() > deadline:
                    raise AssertionError(f"{data!r} did not reach {uid}; last reply {reply}")
                time.sleep(0.02)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


class Backend:
    """A backend over a plain TCP socket, the way the PHP recipe talks."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.file = self.sock.makefile("rb")

    def send(self, data: bytes | str) -> None:
        self.sock.sendall(data.encode() if isinstance(data, str) else data)

    def line(self) -> bytes:
        return self.file.readline()

    def request(self, line: bytes | str) -> bytes:
        """One request line (newline added), one reply line (newline stripped)."""
        data = line.encode() if isinstance(line, str) else line
        self.send(data + b"\n")
        reply = self.line()
        assert reply.endswith(b"\n"), reply
        return reply[:-1]

    def json(self, line: bytes | str) -> dict:
        return json.loads(self.request(line))

    def close(self) -> None:
        self.file.close()
        self.sock.close()

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator:
    """Start ``twistd push`` with extra arguments; stopped at teardown."""
    servers: list[PushServer] = []

    def start(
        *args: str, env: dict[str, str] | None = None, nofile: int | None = None
    ) -> PushServer:
        workdir = tmp_path / f"server{len(servers)}"
        workdir.mkdir()
        server = PushServer(workdir, *args, env=env, nofile=nofile)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop(signal.SIGKILL)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PushServer]:
    """One development-mode server shared by a module's tests (use unique uids)."""
    s = PushServer(tmp_path_factory.mktemp("server"))
    yield s
    s.stop(signal.SIGKILL)


@pytest.fixture
def ws_clients() -> Iterator[list[ClientConnection]]:
    """Collects clients to close at teardown."""
    clients: list[ClientConnection] = []
    yield clients
    for c in clients:
        c.close()


@pytest.fixture
def redis(tmp_path: Path) -> Iterator:
    """A redis-server of the test's own on a free port (skipped outside CI without one)."""
    from redis_server import RedisServer, require_redis

    require_redis()
    server = RedisServer(tmp_path)
    yield server
    server.kill()


def redis_connected(node: PushServer, redis, times: int = 1, timeout: float = 20) -> None:
    """Wait until ``node`` has logged its ``times``-th connection to ``redis``."""
    needle = f"Redis 127.0.0.1:{redis.port} connected"
    until(lambda: node.log().count(needle) >= times, timeout, f"{needle!r} x{times}")


def cluster_node(start_server, redis, *extra: str) -> PushServer:
    """A node of a cluster on ``redis``, with short heartbeats and timeouts for tests."""
    node = start_server(
        f"--redis={redis.url}", "--cluster-heartbeat=0.3", "--redis-timeout=0.5", *extra
    )
    redis_connected(node, redis)
    return node
