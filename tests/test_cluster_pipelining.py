"""A pipelining backend through the cluster: every reply is true, none waits in a timer.

The issue's bulk job, scaled down: a backend writes thousands of seed-format
lines to node B as fast as the socket takes them (a writer thread, no cap on
requests in flight) and reads replies as they come, for users connected to
node A.  Redis is up the whole time, so every reply must be ``ok`` — never
``error Redis is unreachable`` because requests queued behind each other —
and every frame must arrive.
"""

from __future__ import annotations

import socket
import threading

from conftest import cluster_node, new_uid

USERS = 100
PUSHES = 10000


def test_every_reply_to_a_pipelining_backend_is_true(start_server, redis, ws_clients) -> None:
    a = cluster_node(start_server, redis)
    b = cluster_node(start_server, redis)
    uids = [new_uid("pipe") for _ in range(USERS)]
    for uid in uids:
        ws_clients.append(a.ws(uid))
    b.wait_for(lambda stats: stats["uids"] == USERS)
    lines = b"".join(
        b'{"uid":"%s","percent":"%d"}\n' % (uids[i % USERS].encode(), i) for i in range(PUSHES)
    )
    with socket.create_connection(("127.0.0.1", b.text_port), timeout=60) as conn:
        writer = threading.Thread(target=conn.sendall, args=(lines,), daemon=True)
        writer.start()
        replies = b""
        while replies.count(b"\n") < PUSHES:
            chunk = conn.recv(1 << 16)
            assert chunk, "connection closed before every reply came"
            replies += chunk
        writer.join(timeout=10)
    answered = replies.split(b"\n")[:-1]
    assert {reply: answered.count(reply) for reply in set(answered)} == {b"ok": PUSHES}
    for i, client in enumerate(ws_clients):
        got = [client.recv(timeout=10) for _ in range(PUSHES // USERS)]
        assert got == [str(n) for n in range(i, PUSHES, USERS)]
