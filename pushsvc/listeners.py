"""Where pushsvc listens: endpoint descriptions, checked before start-up and named in the log.

A bad ``--ws-port`` value or a port already in use is the most common
start-up mistake; each gets one line that names the option, the value and
(for a busy port) the process holding it, instead of a traceback.
"""

from __future__ import annotations

import os
import socket
from typing import Any

from twisted.application.service import Service
from twisted.internet import endpoints, reactor
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.failure import Failure

log = Logger()

LISTEN_BACKLOG = 1024  # Twisted's default of 50 drops SYNs in a reconnect storm


def endpoint(value: str, interface: str | None = None) -> str:
    """A bare port number becomes a TCP endpoint description; other descriptions are kept.

    TCP and TLS listeners get a backlog of LISTEN_BACKLOG unless they name
    their own: Twisted's default of 50 loses SYNs when a thousand browsers
    reconnect at once (docs/performance.md measured it).
    """
    if value.isdigit():
        desc = f"tcp:{value}:backlog={LISTEN_BACKLOG}"
        if interface:
            desc += f":interface={interface}"
        return desc
    kind = value.split(":", 1)[0]
    if kind in ("tcp", "tcp6", "ssl") and "backlog=" not in value:
        return f"{value}:backlog={LISTEN_BACKLOG}"
    return value


class _Recorder:
    """A reactor stand-in that records what an endpoint would listen on, and listens on nothing."""

    def __init__(self) -> None:
        self.port: int | None = None
        self.kind = ""
        self.backlog = LISTEN_BACKLOG
        self.interface = ""

    def listenTCP(
        self, port: int, factory: Any = None, backlog: int = 50, interface: str = ""
    ) -> None:
        self.port, self.kind, self.backlog, self.interface = port, "tcp", backlog, interface

    def listenSSL(self, port: int, *args: Any, **kw: Any) -> None:
        self.port, self.kind = port, "ssl"

    def listenUNIX(self, *args: Any, **kw: Any) -> None:
        self.kind = "unix"

    def __getattr__(self, name: str) -> Any:
        return getattr(reactor, name)


def check_endpoint(
    option: str, value: str, interface: str | None = None, reuse_port: bool = False
) -> None:
    """Raise a UsageError naming ``--option`` and ``value`` unless it describes a listener.

    With ``reuse_port`` it must be a TCP listener (a port number or ``tcp:``).
    """
    recorder = _Recorder()
    failure: list[BaseException] = []
    try:
        d = endpoints.serverFromString(recorder, endpoint(value, interface)).listen(Factory())
        d.addErrback(lambda f: failure.append(f.value))
    except Exception as e:
        failure.append(e)
    if not failure and recorder.port is not None and not 0 <= recorder.port <= 65535:
        failure.append(ValueError(f"port {recorder.port} is not from 0 to 65535"))
    if not failure and reuse_port and recorder.kind != "tcp":
        failure.append(ValueError("--reuse-port takes port numbers and tcp: endpoints only"))
    if not failure and reuse_port and not hasattr(socket, "SO_REUSEPORT"):
        failure.append(ValueError("--reuse-port needs SO_REUSEPORT (Linux 3.9 or later)"))
    if failure:
        reason = str(failure[0]) or type(failure[0]).__name__
        raise usage.UsageError(f"--{option} {value!r}: {reason}")


def reuse_port_socket(value: str, interface: str | None) -> socket.socket:
    """A listening TCP socket with SO_REUSEPORT for endpoint ``value``.

    Several processes that open the same port this way share it: the kernel
    spreads new connections over them (Linux hashes each connection's
    addresses to one of the sockets).  Raises OSError like bind() does.
    """
    recorder = _Recorder()
    endpoints.serverFromString(recorder, endpoint(value, interface)).listen(Factory())
    host = recorder.interface or "0.0.0.0"
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, recorder.port or 0))
        sock.listen(recorder.backlog)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


class Listener(Service):
    """A listening port with a role: logged by role and address, and a busy port said plainly.

    It listens in ``privilegedStartService`` (before twistd drops privileges),
    so a port below 1024 works, and a failure stops start-up at once.
    """

    def __init__(
        self,
        role: str,
        option: str,
        value: str,
        interface: str | None,
        factory: Any,
        reuse_port: bool = False,
    ) -> None:
        self.endpoint = endpoints.serverFromString(reactor, endpoint(value, interface))
        self.factory = factory
        self.role = role
        self.option = option
        self.value = value
        self.interface = interface
        self.reuse_port = reuse_port
        self.port: Any = None

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self.port = self._shared_port() if self.reuse_port else self._own_port()
        host = self.port.getHost()
        where = f"{host.host}:{host.port}" if hasattr(host, "port") else str(host.name)
        log.info("{role} on {where}", role=self.role, where=where)

    def _own_port(self) -> Any:
        outcome: list[Any] = []
        self.endpoint.listen(self.factory).addBoth(outcome.append)
        if not outcome:  # no endpoint pushsvc takes listens later; refuse to guess
            raise RuntimeError(f"--{self.option} {self.value!r} did not listen at once")
        if isinstance(outcome[0], Failure):
            self._failed(outcome[0])
        return outcome[0]

    def _shared_port(self) -> Any:
        """Listen on a socket opened with SO_REUSEPORT, adopted by the reactor (public API)."""
        try:
            sock = reuse_port_socket(self.value, self.interface)
        except OSError as e:
            raise SystemExit(
                f"twistd push: --{self.option} {self.value!r}: cannot listen with "
                f"--reuse-port: {e} (every process sharing a port needs --reuse-port)"
            ) from None
        try:
            return reactor.adoptStreamPort(sock.fileno(), sock.family, self.factory)
        finally:
            sock.close()  # the reactor holds its own duplicate of the descriptor

    def _failed(self, failure: Failure) -> None:
        error = failure.value
        if not isinstance(error, CannotListenError):
            failure.raiseException()
        holder = who_holds(error.port) if isinstance(error.port, int) else None
        held = f" (held by {holder})" if holder else ""
        raise SystemExit(
            f"twistd push: --{self.option} {self.value!r}: cannot listen on "
            f"{error.interface or '*'}:{error.port}: {error.socketError}{held}"
        )

    def startService(self) -> None:
        if self.port is None:
            self.privilegedStartService()
        super().startService()

    def stopService(self) -> Any:
        super().stopService()
        port, self.port = self.port, None
        return port.stopListening() if port is not None else None


def who_holds(port: int) -> str | None:
    """``pid N (command)`` of a process listening on TCP ``port``, if /proc can tell."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:  # LISTEN
                inodes.add(f"socket:[{fields[9]}]")
    for pid in filter(str.isdigit, _listdir("/proc")):
        for fd in _listdir(f"/proc/{pid}/fd"):
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") in inodes:
                    return f"pid {pid} ({_command(pid)})"
            except OSError:
                continue
    return None


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


def _command(pid: str) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            words = f.read().split(b"\0")
    except OSError:
        return "?"
    return " ".join(" ".join(w.decode(errors="replace").split()) for w in words if w)[:120]
