"""docs/deploy.md's nginx block and contrib/systemd/pushsvc.service, run as written.

The nginx block is extracted from docs/deploy.md and served by a real nginx
(Debian's /usr/sbin/nginx, in the foreground with its own prefix) in front of
a real ``twistd push``; the unit's ExecStart runs as the unit spells it.  Only
paths, ports and (where a test says so) a timeout are substituted, and a
substitution whose target the document no longer contains fails the test, so
the documents cannot drift away from what works.

Without nginx the nginx tests are skipped, except in CI (``CI`` set), where a
missing nginx is a failure (.ci/run installs it).
"""

from __future__ import annotations

import base64
import os
import pwd
import re
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from certificate import self_signed
from conftest import ROOT, STARTING, TWISTD, Backend, PushServer, child_env, free_port, until
from test_auth import closed_with, token
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect

DEPLOY = ROOT / "docs" / "deploy.md"
UNIT = ROOT / "contrib" / "systemd" / "pushsvc.service"
NGINX = "/usr/sbin/nginx"
SEED_PUSH = b'{"uid":"uid1","percent":"88%"}\n'


def require_nginx() -> None:
    """Skip outside CI when Debian's nginx is missing; in CI a missing nginx is a failure."""
    if not os.path.exists(NGINX):
        if os.environ.get("CI"):
            pytest.fail(f"{NGINX} is not installed (.ci/run installs it)")
        pytest.skip(f"{NGINX} is missing: apt-get install nginx")


def substitute(text: str, old: str, new: str, source: Path) -> str:
    """``text`` with ``old``, which must occur exactly once, replaced by ``new``.

    When the document changes what the test substitutes, the test fails here
    instead of quietly running something else than the document says.
    """
    found = text.count(old)
    if found != 1:
        pytest.fail(
            f"{source.relative_to(ROOT)}: expected {old!r} once, found it {found} times; "
            "the test substitutes it, so change tests/test_deploy.py along with the document"
        )
    return text.replace(old, new)


# --- nginx -------------------------------------------------------------------


def documented_nginx_block() -> str:
    """The nginx block of docs/deploy.md, exactly as an operator copies it."""
    blocks = re.findall(r"^```nginx\n(.*?)^```", DEPLOY.read_text(), re.S | re.M)
    assert len(blocks) == 1, f"docs/deploy.md has {len(blocks)} nginx blocks, the test knows one"
    return blocks[0]


def with_certificate(block: str, cert: Path, key: Path) -> str:
    """The block with the test's certificate in place of the Let's Encrypt paths."""
    block = substitute(
        block, "/etc/letsencrypt/live/push.example.com/fullchain.pem", str(cert), DEPLOY
    )
    return substitute(block, "/etc/letsencrypt/live/push.example.com/privkey.pem", str(key), DEPLOY)


def configured_block(
    block: str, *, listen: int, upstream: int, cert: Path, key: Path, read_timeout: str | None
) -> str:
    """The documented block with the test's port, upstream, certificate (and read timeout)."""
    block = with_certificate(block, cert, key)
    block = substitute(block, "listen 443 ssl;", f"listen 127.0.0.1:{listen} ssl;", DEPLOY)
    block = substitute(block, "server 127.0.0.1:1234;", f"server 127.0.0.1:{upstream};", DEPLOY)
    if read_timeout is not None:
        block = substitute(
            block, "proxy_read_timeout 120s;", f"proxy_read_timeout {read_timeout};", DEPLOY
        )
    return block


# Around the block, what Debian's /etc/nginx/nginx.conf gives a file in
# /etc/nginx/conf.d/: its events and http settings (mime.types left out, no
# files are served), with one worker instead of one per core, and the pid,
# logs and temporary files in the test's directory.  daemon and
# master_process come with -g on the command line.
NGINX_CONF = """\
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log notice;
events {{
    worker_connections 768;
}}
http {{
    sendfile on;
    tcp_nopush on;
    types_hash_max_size 2048;
    default_type application/octet-stream;
    ssl_protocols TLSv1 TLSv1.1 TLSv1.2 TLSv1.3;
    ssl_prefer_server_ciphers on;
    access_log {d}/access.log;
    gzip on;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    include {d}/conf.d/*.conf;
}}
"""


class Nginx:
    """A real nginx with the given block as its conf.d/pushsvc.conf, all files in ``workdir``."""

    def __init__(self, workdir: Path, block: str) -> None:
        self.workdir = workdir
        (workdir / "conf.d").mkdir(parents=True, exist_ok=True)
        (workdir / "conf.d" / "pushsvc.conf").write_text(block)
        self.conf = workdir / "nginx.conf"
        self.conf.write_text(NGINX_CONF.format(d=workdir))
        self.error_log = workdir / "error.log"
        self.proc: subprocess.Popen | None = None

    def command(self, *args: str) -> list[str]:
        return [NGINX, "-p", f"{self.workdir}/", "-c", str(self.conf), *args]

    def check(self) -> subprocess.CompletedProcess:
        """``nginx -t``: what an operator runs before reloading."""
        return subprocess.run(self.command("-t"), capture_output=True, text=True, timeout=30)

    def start(self, port: int) -> None:
        """Run nginx in the foreground (master and one worker) until it accepts on ``port``."""
        self.proc = subprocess.Popen(
            self.command("-g", "daemon off; master_process on;"),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, for stop()
        )
        deadline = time.monotonic() + 10
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nginx exited with {self.proc.returncode}:\n{self.errors()}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"nginx did not listen on {port}:\n{self.errors()}"
                    ) from None
                time.sleep(0.02)

    def errors(self) -> str:
        try:
            return self.error_log.read_text()
        except FileNotFoundError:
            return ""

    def stop(self) -> None:
        """SIGTERM (nginx's fast shutdown); the process group is killed if that hangs."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@dataclass
class Proxy:
    """The documented nginx in front of one pushsvc, and how a browser reaches it."""

    nginx: Nginx
    port: int
    cert: Path

    def context(self) -> ssl.SSLContext:
        """A client context that trusts the test's self-signed certificate only."""
        return ssl.create_default_context(cafile=str(self.cert))

    def wss(self, uid: str | None = None, source: str = "127.0.0.1") -> ClientConnection:
        """A browser-side client on ``wss://`` through nginx, from the ``source`` address.

        It sends no pings of its own (``ping_interval=None``): only pushsvc's
        pings keep an idle connection busy, as with a browser.
        """
        ws = connect(
            f"wss://127.0.0.1:{self.port}/",
            ssl=self.context(),
            source_address=(source, 0),
            # A bound, not a figure: the first handshake also waits for nginx's
            # worker to start and for TLS, which took over 5 s once on a loaded
            # machine (a fresh virtualenv, while other benchmarks ran).
            open_timeout=15,
            ping_interval=None,
        )
        if uid is not None:
            ws.send(uid)
        return ws


@pytest.fixture
def nginx_in_front(tmp_path: Path) -> Iterator[Callable[..., Proxy]]:
    """Put the documented nginx block in front of a pushsvc; stopped at teardown."""
    require_nginx()
    key, cert = self_signed(tmp_path)
    started: list[Nginx] = []

    def start(server: PushServer, read_timeout: str | None = None) -> Proxy:
        for attempt in range(3):  # the free port may be taken before nginx binds it
            port = free_port()
            block = configured_block(
                documented_nginx_block(),
                listen=port,
                upstream=server.ws_port,
                cert=cert,
                key=key,
                read_timeout=read_timeout,
            )
            nginx = Nginx(tmp_path / f"nginx{len(started)}-{attempt}", block)
            started.append(nginx)
            try:
                nginx.start(port)
            except RuntimeError:
                if "Address already in use" not in nginx.errors():
                    raise
                continue
            return Proxy(nginx, port, cert)
        raise RuntimeError("no free port for nginx in 3 attempts")

    yield start
    for nginx in started:
        nginx.stop()


def test_documented_block_passes_nginx_t(tmp_path: Path) -> None:
    """The block as written (only the certificate paths replaced) passes ``nginx -t``."""
    require_nginx()
    key, cert = self_signed(tmp_path)
    block = with_certificate(documented_nginx_block(), cert, key)
    check = Nginx(tmp_path / "nginx", block).check()
    assert check.returncode == 0, check.stderr
    assert "test is successful" in check.stderr


def test_seed_push_over_wss_through_nginx(start_server, nginx_in_front) -> None:
    server = start_server()
    proxy = nginx_in_front(server)
    ws = proxy.wss("uid1")
    server.wait_for(lambda s: s["connections"] == 1 and s["pending"] == 0)
    with server.backend() as b:
        b.send(SEED_PUSH)
        assert b.line() == b"ok\n"
    assert ws.recv(timeout=5) == "88%"
    ws.close()


def test_nginx_answers_browsers_in_http_1_1(start_server, nginx_in_front) -> None:
    """HTTP/2 stays off without an ``http2`` directive: a client offering h2 gets HTTP/1.1.

    A WebSocket upgrade is an HTTP/1.1 request; the block relies on nginx's
    default here, since ``http2 off;`` does not exist before nginx 1.25.1.
    """
    proxy = nginx_in_front(start_server())
    context = proxy.context()
    context.set_alpn_protocols(["h2", "http/1.1"])
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as raw:
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            assert tls.selected_alpn_protocol() == "http/1.1"


def test_per_ip_limit_counts_the_address_nginx_forwards(start_server, nginx_in_front) -> None:
    """With --trust-x-forwarded-for=1, browsers behind nginx are counted by their own address.

    nginx listens on 127.0.0.1 and connects to pushsvc from 127.0.0.1; the
    browsers come from 127.0.0.2 and 127.0.0.3, which only X-Forwarded-For
    tells pushsvc.  Without the header every browser would share one slot.
    """
    server = start_server("--max-per-ip=1", "--trust-x-forwarded-for=1")
    proxy = nginx_in_front(server)
    first = proxy.wss("ip-a", source="127.0.0.2")
    server.wait_for(lambda s: s["connections"] == 1)
    with pytest.raises(InvalidStatus) as refused:
        proxy.wss(source="127.0.0.2")
    assert refused.value.response.status_code == 429
    assert "refused a WebSocket handshake from 127.0.0.2: 429" in server.log()
    other = proxy.wss("ip-b", source="127.0.0.3")  # another address: its own slot
    server.wait_for(lambda s: s["connections"] == 2)
    with server.backend() as b:
        assert b.request('{"uid":"ip-b","data":"through nginx"}') == b"ok"
    assert other.recv(timeout=5) == "through nginx"
    for ws in (first, other):
        ws.close()


# The shortest read timeout nginx and pushsvc's whole-second ping timers allow
# to test quickly: pings every second keep the connection busier than that.
SHORT_READ_TIMEOUT = 2.0


def test_pings_keep_an_idle_connection_past_the_read_timeout(start_server, nginx_in_front) -> None:
    server = start_server("--ping-interval=1", "--ping-timeout=2")
    proxy = nginx_in_front(server, read_timeout=f"{SHORT_READ_TIMEOUT:g}s")
    ws = proxy.wss("idle")
    server.wait_for(lambda s: s["connections"] == 1)
    time.sleep(SHORT_READ_TIMEOUT * 2)  # idle: only pushsvc's pings cross nginx
    with server.backend() as b:
        assert b.request('{"uid":"idle","data":"still here"}') == b"ok"
    assert ws.recv(timeout=5) == "still here"
    ws.close()


def test_without_pings_nginx_cuts_an_idle_connection(start_server, nginx_in_front) -> None:
    """The control for the test above: the short read timeout is really in force."""
    server = start_server("--ping-interval=0")
    proxy = nginx_in_front(server, read_timeout=f"{SHORT_READ_TIMEOUT:g}s")
    ws = proxy.wss("idle-no-pings")
    server.wait_for(lambda s: s["connections"] == 1)
    started = time.monotonic()
    with pytest.raises(ConnectionClosed):
        ws.recv(timeout=SHORT_READ_TIMEOUT + 8)
    assert time.monotonic() - started > SHORT_READ_TIMEOUT - 0.5
    server.wait_for(lambda s: s["connections"] == 0)


# --- systemd -----------------------------------------------------------------


def unit_settings(path: Path, section: str = "Service") -> dict[str, str]:
    """One section of a unit file, with continuation lines joined the way systemd joins them."""
    settings: dict[str, str] = {}
    current, pending = None, ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue  # comments end no continuation, as in systemd
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        if line.startswith("[") and line.endswith("]"):
            current = line[1:-1]
        elif current == section:
            key, value = line.split("=", 1)
            settings[key.strip()] = value.strip()
    return settings


# The unit's endpoints: tcp:<port>:interface=<address> after a --*-port option.
UNIT_PORT = re.compile(r"(--(?:ws|text|http)-port)[ =]tcp:(\d+):interface=([0-9.]+)")
FACTORY = {
    "--ws-port": "WebSocket",
    "--text-port": "backend",
    "--http-port": "HTTP",
}


@dataclass
class UnitRun:
    """The unit's ExecStart, running with the test's paths and ports."""

    proc: subprocess.Popen
    log: Path
    ports: dict[str, tuple[str, int]]  # option -> (interface, port)
    secret: str
    api_key: str

    def listening(self) -> dict[str, int]:
        found = dict((n.decode(), int(p)) for n, p in STARTING.findall(self.log.read_bytes()))
        return {option: found[name] for option, name in FACTORY.items() if name in found}


def run_unit(base: Path, user: pwd.struct_passwd | None = None) -> UnitRun:
    """Start ExecStart as the unit writes it, with the test's binary, files and ports.

    The directories get the modes docs/deploy.md gives them; with ``user``
    (the unit's ``User=``), the secret is readable through its group only.
    """
    settings = unit_settings(UNIT)
    line = settings["ExecStart"]
    assert not set("%$") & set(line), f"ExecStart uses specifiers or variables: {line}"
    declared = {option: (iface, int(port)) for option, port, iface in UNIT_PORT.findall(line)}
    for option in FACTORY:
        assert option in declared, (
            f"the unit leaves {option} at its default port (on which interface?); "
            "give it as tcp:<port>:interface=<address> so that the test can move it"
        )
    etc, state = base / "etc", base / "state"
    etc.mkdir(mode=0o750)
    state.mkdir()
    secret = base64.b64encode(os.urandom(32)).decode()
    api_key = base64.b64encode(os.urandom(32)).decode()
    (etc / "secret").write_text(secret + "\n")
    (etc / "api-key").write_text(api_key + "\n")
    for name in ("secret", "api-key"):
        os.chmod(etc / name, 0o640)
        if user is not None:
            os.chown(etc / name, 0, user.pw_gid)
    if user is not None:
        os.chown(etc, 0, user.pw_gid)
        os.chown(state, user.pw_uid, user.pw_gid)  # what StateDirectory= does
    ports = {option: (iface, free_port()) for option, (iface, _) in declared.items()}
    line = substitute(line, "/opt/pushsvc/venv/bin/twistd", shlex.quote(TWISTD), UNIT)
    line = substitute(line, "/etc/pushsvc/secret", shlex.quote(str(etc / "secret")), UNIT)
    line = substitute(line, "/etc/pushsvc/api-key", shlex.quote(str(etc / "api-key")), UNIT)
    for option, (_, port) in declared.items():
        line = substitute(line, f"tcp:{port}:", f"tcp:{ports[option][1]}:", UNIT)
    assert settings["WorkingDirectory"] == "/var/lib/pushsvc", settings["WorkingDirectory"]
    argv = shlex.split(line)
    if user is not None:
        argv = [
            "setpriv",
            f"--reuid={user.pw_uid}",
            f"--regid={user.pw_gid}",
            "--clear-groups",
            *argv,
        ]
    log = base / "journal.log"  # --logfile=- writes to stdout, which systemd sends to the journal
    with log.open("wb") as out:
        proc = subprocess.Popen(
            argv, cwd=state, env=child_env(), stdout=out, stderr=subprocess.STDOUT
        )
    return UnitRun(proc, log, ports, secret, api_key)


def api_status(http: str, key: str | None) -> int:
    """The status of POST /api/stats with ``key`` as its bearer token (or none)."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    req = urllib.request.Request(http + "/api/stats", b"{}", headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status
    except urllib.error.HTTPError as e:
        return e.code


def success_statuses(settings: dict[str, str]) -> set[int]:
    """SuccessExitStatus= as Popen return codes: a signal's death is its negated number."""
    statuses = set()
    for item in settings["SuccessExitStatus"].split():
        statuses.add(-signal.Signals[item] if item.startswith("SIG") else int(item))
    return statuses


def check_unit_run(run: UnitRun) -> None:
    """It listens where the unit says, serves with the secret file, stops as it declares."""
    settings = unit_settings(UNIT)
    try:
        until(lambda: len(run.listening()) == 3 or run.proc.poll() is not None, 10.0, "listening")
        assert run.proc.poll() is None, run.log.read_text()
        assert run.listening() == {option: port for option, (_, port) in run.ports.items()}
        for iface, port in run.ports.values():
            socket.create_connection((iface, port), timeout=5).close()
            if iface == "127.0.0.1":  # bound to that address, not to every interface
                with pytest.raises(ConnectionRefusedError):
                    socket.create_connection(("127.0.0.2", port), timeout=5)
        # Production mode: a token signed with the secret file's content is accepted.
        ws_port, text_port = run.ports["--ws-port"][1], run.ports["--text-port"][1]
        ws = connect(f"ws://127.0.0.1:{ws_port}/", open_timeout=5)
        ws.send(token("unit-user", secret=run.secret))
        with Backend(text_port) as b:
            until(lambda: b.json('{"cmd":"stats"}')["connections"] == 1, 10.0, "authenticated")
            assert b.request('{"uid":"unit-user","data":"from the unit"}') == b"ok"
        assert ws.recv(timeout=5) == "from the unit"
        # The HTTP API wants the key in api-key; /healthz does not.
        http = f"http://127.0.0.1:{run.ports['--http-port'][1]}"
        assert api_status(http, None) == 401
        assert api_status(http, run.api_key) == 200
        with urllib.request.urlopen(http + "/healthz", timeout=5) as health:
            assert health.status == 200
        run.proc.send_signal(signal.Signals[settings["KillSignal"]])
        assert closed_with(ws) == (1001, "server shutting down")
        status = run.proc.wait(float(settings["TimeoutStopSec"]))
        assert status in success_statuses(settings), (status, run.log.read_text())
    finally:
        if run.proc.poll() is None:
            run.proc.kill()
            run.proc.wait()


def test_unit_command_line_runs_as_written(tmp_path: Path) -> None:
    check_unit_run(run_unit(tmp_path))


def unprivileged_user() -> pwd.struct_passwd:
    """``nobody``, when the test can switch to it and it can run the test's twistd."""
    if os.geteuid() != 0:
        pytest.skip("switching to an unprivileged user needs root")
    if not shutil.which("setpriv"):
        pytest.skip("setpriv (util-linux) is missing")
    user = pwd.getpwnam("nobody")
    probe = subprocess.run(
        ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups"]
        + [TWISTD, "--version"],
        capture_output=True,
        text=True,
        env=child_env(),
        cwd="/",
        timeout=60,
    )
    if probe.returncode != 0:
        pytest.skip(f"nobody cannot run {TWISTD} here: {probe.stderr.strip()[-200:]}")
    return user


def test_unit_command_line_runs_as_an_unprivileged_user() -> None:
    """As the unit's User=: the secret readable through its group only, as deploy.md sets it."""
    user = unprivileged_user()
    with tempfile.TemporaryDirectory(prefix="pushsvc-unit-") as base:
        os.chmod(base, 0o755)  # pytest's tmp_path is private to root
        check_unit_run(run_unit(Path(base), user))


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze is missing")
def test_systemd_analyze_verify_passes(tmp_path: Path) -> None:
    """``systemd-analyze verify`` on the unit, its ExecStart pointed at the test's twistd."""
    unit = tmp_path / UNIT.name
    unit.write_text(substitute(UNIT.read_text(), "/opt/pushsvc/venv/bin/twistd", TWISTD, UNIT))
    proc = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
