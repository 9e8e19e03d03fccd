"""Reference implementation of the push protocol on asyncio + ``websockets``.

It exists so that every benchmark figure for pushsvc has a baseline measured
in the same run, on the same machine: a straightforward implementation of the
same seed protocol (Workerman's push.php recipe) as a Python user would write
it with the most common asyncio WebSocket library.  No tuning, no deliberate
slowness.

Protocol:

* WebSocket port: the first text frame of a connection is its uid; later
  frames from the browser are ignored.  A uid may be held by many connections.
* Backend port: newline-terminated JSON requests, one reply line per request, in
  order.  ``{"uid": ..., "percent": ...}`` or ``{"uid": ..., "data": ...}``
  push to a uid (or a list of uids) and reply ``ok`` when at least one
  connection got the message, else ``fail``.  ``{"cmd": "broadcast",
  "data": ...}`` pushes to every connection.  Malformed requests get a line
  starting with ``error``.

Usage: ``python bench/reference_server.py --ws-port 8001 --text-port 8002``
(``tcp:PORT:interface=HOST`` strports are accepted too).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
from typing import Any

from websockets.asyncio.server import ServerConnection, broadcast, serve
from websockets.exceptions import ConnectionClosed

# uid -> connections that announced it
registry: dict[str, set[ServerConnection]] = {}


async def ws_handler(ws: ServerConnection) -> None:
    """Register the connection under the uid sent in its first frame."""
    try:
        first = await ws.recv()
    except ConnectionClosed:
        return
    uid = first if isinstance(first, str) else first.decode("utf-8", "replace")
    conns = registry.setdefault(uid, set())
    conns.add(ws)
    try:
        async for _ in ws:  # the browser has nothing more to say; drain it
            pass
    except ConnectionClosed:
        pass
    finally:
        conns.discard(ws)
        if not conns:
            registry.pop(uid, None)


def message_text(request: dict[str, Any]) -> str:
    """Return the text a request pushes: a string as-is, anything else as JSON."""
    value = request["percent"] if "percent" in request else request.get("data", "")
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))


async def push_to_uid(uid: object, text: str) -> bool:
    """Send ``text`` to every connection of ``uid``; True if any accepted it."""
    delivered = False
    for ws in list(registry.get(str(uid), ())):
        try:
            await ws.send(text)
            delivered = True
        except ConnectionClosed:
            pass
    return delivered


async def handle_request(line: bytes) -> str:
    """Execute one JSON request line and return its reply (without newline)."""
    try:
        request = json.loads(line)
    except ValueError:
        return "error invalid json"
    if not isinstance(request, dict):
        return "error request must be a JSON object"
    if request.get("cmd") == "broadcast":
        connections = [ws for conns in registry.values() for ws in conns]
        broadcast(connections, message_text(request))
        return "ok" if connections else "fail"
    if "uid" not in request:
        return "error missing uid"
    uids = request["uid"] if isinstance(request["uid"], list) else [request["uid"]]
    text = message_text(request)
    delivered = False
    for uid in uids:
        delivered = await push_to_uid(uid, text) or delivered
    return "ok" if delivered else "fail"


async def text_handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answer each request line of a backend connection, in order."""
    try:
        while line := await reader.readline():
            if not line.strip():
                continue
            reply = await handle_request(line)
            writer.write(reply.encode() + b"\n")
            await writer.drain()
    except (ConnectionError, asyncio.LimitOverrunError, ValueError):
        pass
    finally:
        writer.close()


def parse_port(spec: str) -> tuple[str, int]:
    """Accept ``8001`` or a Twisted-style ``tcp:8001:interface=127.0.0.1``."""
    if spec.isdigit():
        return "127.0.0.1", int(spec)
    parts = spec.split(":")
    host = "127.0.0.1"
    for part in parts[2:]:
        if part.startswith("interface="):
            host = part.split("=", 1)[1]
    return host, int(parts[1])


async def main(ws_spec: str, text_spec: str) -> None:
    """Serve both ports until SIGINT or SIGTERM."""
    ws_host, ws_port = parse_port(ws_spec)
    text_host, text_port = parse_port(text_spec)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    text_server = await asyncio.start_server(text_handler, text_host, text_port)
    async with serve(ws_handler, ws_host, ws_port):
        print(f"reference push server: ws {ws_port}, text {text_port}", flush=True)
        await stop.wait()
    text_server.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ws-port", required=True, help="WebSocket port")
    parser.add_argument("--text-port", required=True, help="backend port")
    args = parser.parse_args()
    asyncio.run(main(args.ws_port, args.text_port))
