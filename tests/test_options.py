"""Bad option values and busy ports: one line that names the option, no traceback, exit non-zero."""

from __future__ import annotations

import os
import re
import socket
import subprocess
from pathlib import Path

import pytest
from conftest import TWISTD, PushServer, child_env

LOG_LINE = re.compile(rb"^\S+ \[[^]]+\] ")  # twistd's "<time> [<system>] " prefix


def twistd(tmp_path: Path, *args: str) -> tuple[int, list[bytes]]:
    """Run ``twistd -n push ARGS`` to its end; its exit status and its non-empty output lines."""
    proc = subprocess.run(
        [TWISTD, "-n", "--pidfile=", "--logfile=-", "push", "--ws-port=tcp:0", *args],
        cwd=tmp_path,
        env=child_env(),
        capture_output=True,
        timeout=30,
    )
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    return proc.returncode, lines


@pytest.mark.parametrize(
    "args, says",
    [
        (["--ws-port=abc"], b"--ws-port 'abc': Unknown endpoint type"),
        (["--http-port=offf"], b"--http-port 'offf': Unknown endpoint type"),
        (["--text-port=99999"], b"--text-port '99999': port 99999 is not from 0 to 65535"),
        (["--text-port=tcp:70000"], b"--text-port 'tcp:70000': port 70000"),
        (["--redis=http://localhost:6379"], b"--redis 'http://localhost:6379': unsupported"),
        (["--ping-interval=-5"], b"--ping-interval -5.0: must not be negative"),
        (["--max-line=abc"], b"--max-line 'abc': not a whole number"),
        (["--auth-timeout=0"], b"--auth-timeout 0.0: must be positive"),
        (["--secret-file=/nonexistent/secret"], b"/nonexistent/secret"),
        (["--no-such-option"], b"option --no-such-option not recognized"),
    ],
)
def test_a_bad_value_gets_one_line(tmp_path: Path, args: list[str], says: bytes) -> None:
    status, lines = twistd(tmp_path, "--text-port=tcp:0", "--http-port=off", *args)
    assert status != 0
    assert len(lines) == 1, lines  # no help text before it, no traceback after it
    assert lines[0].startswith(b"twistd push: ") and says in lines[0], lines[0]


def test_a_busy_port_names_the_option_and_the_process(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        status, lines = twistd(tmp_path, f"--text-port={port}", "--http-port=off")
    assert status != 0
    errors = [line for line in lines if b"cannot listen" in line]
    assert len(errors) == 1 and not any(b"Traceback" in line for line in lines), lines
    message = LOG_LINE.sub(b"", errors[0])
    assert message.startswith(f"twistd push: --text-port '{port}': cannot listen".encode())
    assert f"held by pid {os.getpid()} ".encode() in message


def test_the_log_names_each_listener(server: PushServer) -> None:
    log = server.log()
    assert f"WebSocket on 127.0.0.1:{server.ws_port}" in log
    assert f"backend on 127.0.0.1:{server.text_port}" in log
    assert f"HTTP on 127.0.0.1:{server.http_port}" in log
