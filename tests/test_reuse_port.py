"""--reuse-port: several processes on the same ports, one cluster through Redis.

Real ``twistd push`` processes on one free port per listener, real WebSocket
clients and a real backend: the kernel spreads the connections over the
processes, each process's own --metrics-port says how many it holds, and a
backend on the shared port reaches users on either process.
"""

from __future__ import annotations

import json
import re
import urllib.request

import pytest
from conftest import PushServer, free_port, new_uid, redis_connected, until
from twisted.python import usage

from pushsvc.listeners import check_endpoint

METRICS = re.compile(rb"\] metrics on [^ ]*:(\d+)$", re.MULTILINE)


def own_connections(node: PushServer) -> int:
    """``pushsvc_connections`` from the process's own --metrics-port (not the shared one)."""
    found = METRICS.findall(node._log_bytes())
    assert found, node.log()
    with urllib.request.urlopen(f"http://127.0.0.1:{int(found[0])}/metrics", timeout=5) as r:
        body = r.read().decode()
    line = next(x for x in body.splitlines() if x.startswith("pushsvc_connections "))
    return int(float(line.split()[1]))


def shared_node(start_server, redis, ports: list[int]) -> PushServer:
    ws, text, http = ports
    node = start_server(
        "--reuse-port",
        f"--ws-port=tcp:{ws}:interface=127.0.0.1",
        f"--text-port=tcp:{text}:interface=127.0.0.1",
        f"--http-port=tcp:{http}:interface=127.0.0.1",
        "--metrics-port=tcp:0:interface=127.0.0.1",
        f"--redis={redis.url}",
        "--redis-timeout=0.5",
    )
    redis_connected(node, redis)
    return node


def test_processes_share_the_ports_and_form_one_cluster(start_server, redis, ws_clients) -> None:
    ports = [free_port(), free_port(), free_port()]
    a = shared_node(start_server, redis, ports)
    b = shared_node(start_server, redis, ports)
    assert (a.ws_port, a.text_port, a.http_port) == (b.ws_port, b.text_port, b.http_port)
    uids = [new_uid("rp") for _ in range(40)]
    for uid in uids:
        ws_clients.append(a.ws(uid))  # a's address is b's: the kernel picks the process
    until(lambda: own_connections(a) + own_connections(b) == len(uids), what="all connected")
    # Linux hashes each connection to one of the sockets: 40 never all land on one.
    assert own_connections(a) > 0 and own_connections(b) > 0
    # Every uid subscribed in Redis (cluster-wide stats), whichever process holds it.
    a.wait_for(lambda stats: stats["uids"] == len(uids))
    with a.backend() as backend:  # through the shared backend port: either process
        replies = [backend.request(json.dumps({"uid": uid, "percent": "50%"})) for uid in uids]
    assert replies == [b"ok"] * len(uids)
    assert [client.recv(timeout=5) for client in ws_clients] == ["50%"] * len(uids)


def test_a_port_held_without_reuse_port_is_said_plainly(start_server, redis) -> None:
    holder = start_server()
    with pytest.raises(RuntimeError, match="every process sharing a port needs --reuse-port"):
        start_server("--reuse-port", f"--ws-port=tcp:{holder.ws_port}:interface=127.0.0.1")


@pytest.mark.parametrize("value", ["unix:/tmp/push.sock"])
def test_reuse_port_takes_tcp_listeners_only(value: str) -> None:
    with pytest.raises(usage.UsageError, match="tcp: endpoints only"):
        check_endpoint("ws-port", value, reuse_port=True)
