"""contrib/systemd/pushsvc@.service run as written: two instances, one set of ports, one cluster.

The template's ExecStart with ``%i`` expanded as systemd would (instances
01 and 02), the test's twistd, secret files, Redis and free ports put in
place of the unit's; everything else runs exactly as the unit says.
"""

from __future__ import annotations

import base64
import os
import re
import shlex
import signal
import subprocess
import urllib.request
from pathlib import Path

from conftest import ROOT, STARTING, TWISTD, Backend, child_env, free_port, new_uid, until
from test_auth import token
from test_deploy import substitute, unit_settings
from websockets.sync.client import connect

TEMPLATE = ROOT / "contrib" / "systemd" / "pushsvc@.service"
OWN = re.compile(rb"\] metrics on [^ ]*:(\d+)$", re.MULTILINE)


def instance_argv(line: str, instance: str, shared: dict[str, int], etc: Path, redis) -> list[str]:
    """The unit's ExecStart for ``instance`` with the test's paths, Redis and ports."""
    line = line.replace("%i", instance)  # the only specifier the template uses
    line = substitute(line, "/opt/pushsvc/venv/bin/twistd", shlex.quote(TWISTD), TEMPLATE)
    for name in ("secret", "api-key"):
        line = substitute(line, f"/etc/pushsvc/{name}", shlex.quote(str(etc / name)), TEMPLATE)
    line = substitute(line, "redis://127.0.0.1:6379", redis.url, TEMPLATE)
    line = substitute(line, f"tcp:91{instance}:", f"tcp:{free_port()}:", TEMPLATE)
    for port, mine in (("1234", shared["ws"]), ("5678", shared["text"]), ("8080", shared["http"])):
        line = substitute(line, f"tcp:{port}:", f"tcp:{mine}:", TEMPLATE)
    return shlex.split(line)


def test_two_instances_share_the_ports_with_a_metrics_port_each(tmp_path: Path, redis) -> None:
    settings = unit_settings(TEMPLATE)
    assert "%i" in settings["ExecStart"] and "--reuse-port" in settings["ExecStart"]
    etc = tmp_path / "etc"
    etc.mkdir()
    for name in ("secret", "api-key"):
        (etc / name).write_text(base64.b64encode(os.urandom(32)).decode() + "\n")
    shared = {"ws": free_port(), "text": free_port(), "http": free_port()}
    logs, procs = [], []
    try:
        for instance in ("01", "02"):
            log = tmp_path / f"journal-{instance}.log"
            argv = instance_argv(settings["ExecStart"], instance, shared, etc, redis)
            with log.open("wb") as out:
                procs.append(
                    subprocess.Popen(argv, cwd=tmp_path, env=child_env(), stdout=out, stderr=out)
                )
            logs.append(log)
        for log in logs:
            until(lambda log=log: b"Redis 127.0.0.1" in log.read_bytes(), 20, f"{log} on Redis")
            listening = {n.decode(): int(p) for n, p in STARTING.findall(log.read_bytes())}
            assert listening == {
                "WebSocket": shared["ws"],
                "backend": shared["text"],
                "HTTP": shared["http"],
            }
        own = [int(OWN.findall(log.read_bytes())[0]) for log in logs]
        assert own[0] != own[1]
        for port in own:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
                assert r.read() == b"ok\n"
        # Users on either process, a backend on the shared port: one cluster.
        secret = (etc / "secret").read_text().strip()
        uids = [new_uid("tpl") for _ in range(12)]
        clients = [connect(f"ws://127.0.0.1:{shared['ws']}/", open_timeout=5) for _ in uids]
        for ws, uid in zip(clients, uids, strict=True):
            ws.send(token(uid, secret=secret))
        with Backend(shared["text"]) as backend:
            until(lambda: b'"uids":12' in backend.request('{"cmd":"stats"}'), 10, "subscribed")
            replies = [backend.request(f'{{"uid":"{uid}","percent":"1%"}}') for uid in uids]
        assert replies == [b"ok"] * len(uids)
        assert [ws.recv(timeout=5) for ws in clients] == ["1%"] * len(uids)
        for ws in clients:
            ws.close()
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
