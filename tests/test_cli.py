"""The ``pushsvc`` command, run as a subprocess the way a shell script runs it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import PushServer, child_env, free_port, new_uid


def pushsvc(
    *args: str, env: dict[str, str] | None = None, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m pushsvc.cli`` (works whether or not the console script is installed)."""
    base = {k: v for k, v in child_env().items() if k != "PUSHSVC_ADDR"}
    return subprocess.run(
        [sys.executable, "-m", "pushsvc.cli", *args],
        env={**base, **(env or {})},
        input=stdin,
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest.fixture
def port(server: PushServer) -> str:
    return f"--port={server.text_port}"


def test_push_delivered(server: PushServer, port: str, ws_clients) -> None:
    user = new_uid("cli")
    ws = server.online(user, ws_clients)
    proc = pushsvc(port, "push", user, "hello there")
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "ok\n", "")
    assert ws.recv(timeout=5) == "hello there"


def test_push_not_delivered(port: str) -> None:
    proc = pushsvc(port, "push", new_uid("cli"), "x")
    assert (proc.returncode, proc.stdout) == (1, "fail\n")


def test_push_data_as_text_or_json(server: PushServer, port: str, ws_clients) -> None:
    user = new_uid("cli")
    ws = server.online(user, ws_clients)
    assert pushsvc(port, "push", user, '{"a": 1}').returncode == 0
    assert pushsvc(port, "push", user, '{"a": 1}', "--json").returncode == 0
    assert pushsvc(port, "push", "--json", user, "-", stdin='{"b": [1, 2]}\n').returncode == 0
    assert pushsvc(port, "push", user, "-", stdin="line one\n").returncode == 0
    assert [ws.recv(timeout=5) for _ in range(4)] == [
        '{"a": 1}',
        '{"a":1}',
        '{"b":[1,2]}',
        "line one",
    ]


def test_invalid_json_data_is_a_usage_error(port: str) -> None:
    proc = pushsvc(port, "push", new_uid("cli"), "{not json", "--json")
    assert proc.returncode == 2
    assert "not valid JSON" in proc.stderr and proc.stdout == ""


def test_broadcast(start_server) -> None:
    server = start_server()
    port = f"--port={server.text_port}"
    proc = pushsvc(port, "broadcast", "nobody")
    assert (proc.returncode, proc.stdout) == (1, "fail\n")
    ws = server.ws("b1")
    server.wait_for(lambda s: s["connections"] == 1)
    try:
        proc = pushsvc("broadcast", "--json", '{"notice": "maintenance"}', port)
        assert (proc.returncode, proc.stdout) == (0, "ok\n")
        assert ws.recv(timeout=5) == '{"notice":"maintenance"}'
    finally:
        ws.close()


def test_online(server: PushServer, port: str, ws_clients) -> None:
    user, nobody = new_uid("cli"), new_uid("cli")
    server.online(user, ws_clients)
    proc = pushsvc(port, "online", user)
    assert proc.returncode == 0 and json.loads(proc.stdout) == {user: True}
    proc = pushsvc(port, "online", user, nobody)
    assert proc.returncode == 1 and json.loads(proc.stdout) == {user: True, nobody: False}


def test_stats(server: PushServer, port: str) -> None:
    proc = pushsvc(port, "stats")
    assert proc.returncode == 0
    stats = json.loads(proc.stdout)
    assert {"uids", "connections", "pending"} <= stats.keys() and "ok" not in stats


def test_address_from_the_environment(server: PushServer) -> None:
    proc = pushsvc("stats", env={"PUSHSVC_ADDR": f"127.0.0.1:{server.text_port}"})
    assert proc.returncode == 0, proc.stderr
    proc = pushsvc("stats", env={"PUSHSVC_ADDR": f"tcp://127.0.0.1:{server.text_port}"})
    assert proc.returncode == 0, proc.stderr
    # --port wins over the environment, before or after the subcommand name.
    env = {"PUSHSVC_ADDR": "127.0.0.1:1"}
    assert pushsvc(f"--port={server.text_port}", "stats", env=env).returncode == 0
    assert pushsvc("stats", "--port", str(server.text_port), env=env).returncode == 0
    proc = pushsvc("stats", env={"PUSHSVC_ADDR": "http://x"})
    assert proc.returncode == 2 and "PUSHSVC_ADDR" in proc.stderr


def test_unreachable_service() -> None:
    free = free_port()
    proc = pushsvc("--port", str(free), "push", "u", "x")
    assert proc.returncode == 2 and proc.stdout == ""
    assert f"cannot reach pushsvc at 127.0.0.1:{free}" in proc.stderr


def test_rejected_request(port: str) -> None:
    proc = pushsvc(port, "online", "")
    assert proc.returncode == 2
    assert "pushsvc: error: uid must be a non-empty string" in proc.stderr


@pytest.mark.parametrize(
    "args",
    [
        (),
        ("push",),
        ("push", "u"),
        ("frobnicate",),
        ("--port=99999", "stats"),
        ("--timeout=0", "stats"),
    ],
)
def test_usage_errors(args: tuple[str, ...]) -> None:
    proc = pushsvc(*args)
    assert proc.returncode == 2 and "usage: pushsvc" in proc.stderr


def test_help_lists_the_subcommands() -> None:
    proc = pushsvc("--help")
    assert proc.returncode == 0
    for name in ("push", "broadcast", "online", "stats"):
        assert name in proc.stdout


def test_push_to_a_group(server: PushServer, port: str, ws_clients) -> None:
    user, group = new_uid("cli"), "grp-" + new_uid("cli")
    ws = server.online(user, ws_clients)
    from pushsvc.client import Client

    with Client(port=server.text_port) as c:
        c.join(user, group)
    proc = pushsvc(port, "push", "--group", group, "to the group")
    assert (proc.returncode, proc.stdout) == (0, "ok\n")
    assert ws.recv(timeout=5) == "to the group"
    assert pushsvc(port, "push", "--group", "grp-" + new_uid("cli"), "x").returncode == 1
