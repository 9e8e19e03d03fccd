"""The backend port's shared secret, and throttling of failed backend credentials."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import Any

import pytest
from conftest import Backend, PushServer, new_uid
from test_commands import http_post

from pushsvc.cli import SECRET_ENV
from pushsvc.client import AuthenticationFailed, Client, RequestRejected

SECRET = "backend-secret-0123456789"
AUTH = json.dumps({"cmd": "auth", "secret": SECRET})


@pytest.fixture
def guarded(start_server) -> PushServer:
    return start_server("--auth-fail-limit=3", env={"PUSHSVC_BACKEND_SECRET": SECRET})


def closed(b: Backend) -> bool:
    return b.line() == b""


def test_auth_line_then_commands(guarded: PushServer, ws_clients) -> None:
    ws_clients.append(guarded.ws("sec-user"))
    with guarded.backend() as b:
        assert b.request(AUTH) == b"ok"
        while b.json('{"cmd":"stats"}')["connections"] != 1:
            time.sleep(0.02)
        assert b.request('{"uid":"sec-user","percent":"88%"}') == b"ok"
        assert b.request(AUTH) == b"ok"  # again: harmless
    assert ws_clients[0].recv(timeout=5) == "88%"


def test_auth_with_id_answers_json(guarded: PushServer) -> None:
    with guarded.backend() as b:
        assert b.json(json.dumps({"cmd": "auth", "secret": SECRET, "id": 7})) == {
            "id": 7,
            "ok": True,
        }


def test_seed_line_without_auth_is_refused_and_closed(guarded: PushServer) -> None:
    with guarded.backend() as b:
        # The seed's PHP client writes its push line and reads one reply.
        b.send(b'{"uid":"uid1","percent":"88%"}\n{"uid":"uid1","percent":"89%"}\n')
        assert b.line() == b"error authentication required\n"
        assert closed(b)  # and nothing for the line after it
    assert "before authenticating" in guarded.log()


def test_wrong_secret_is_refused_and_ip_blocked_after_the_limit(guarded: PushServer) -> None:
    for attempt in range(3):
        with guarded.backend() as b:
            guess = json.dumps({"cmd": "auth", "secret": f"guess-{attempt}"})
            assert b.request(guess) == b"error authentication failed"
            assert closed(b)
    with guarded.backend() as b:  # even the right secret now: the IP is refused for a while
        assert b.line() == b"error too many failed authentication attempts\n"
        assert closed(b)
    log = guarded.log()
    assert log.count("backend authentication failed (wrong secret) from 127.0.0.1") == 1
    assert log.count("refusing it for 60 s") == 1
    assert "guess-" not in log  # never the attempted secret


def test_secret_from_file(start_server, tmp_path) -> None:
    path = tmp_path / "backend-secret"
    path.write_text(SECRET + "\n")
    server = start_server(f"--backend-secret-file={path}")
    with server.backend() as b:
        assert b.request(AUTH) == b"ok"
        assert b.request('{"uid":"nobody","data":"x"}') == b"fail"


def test_auth_line_without_a_secret_is_accepted(server: PushServer) -> None:
    """Backends can send the auth line before the service requires it."""
    with server.backend() as b:
        assert b.request('{"cmd":"auth","secret":"anything"}') == b"ok"
        assert b.request('{"uid":"nobody","data":"x"}') == b"fail"


def test_http_api_key_failures_are_throttled(start_server) -> None:
    server = start_server("--auth-fail-limit=2", env={"PUSHSVC_API_KEY": "the-key"})

    def post(key: str) -> tuple[int, dict]:
        req = urllib.request.Request(
            server.http_url + "/api/stats",
            data=b"{}",
            headers={"Authorization": f"Bearer {key}"},
            method="POST",
        )
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            if e.code == 429:
                assert int(e.headers["retry-after"]) > 0
            return e.code, json.loads(e.read())

    assert post("the-key")[0] == 200
    assert post("wrong")[0] == 401
    assert post("wrong")[0] == 401
    status, body = post("the-key")
    assert (status, body["error"]) == (429, "too many failed authentication attempts")
    assert server.log().count("refused a request without a valid API key") == 1


def test_files_of_several_lines_accept_each_line(start_server, tmp_path) -> None:
    """Rotation for the backend secret and the API key: each stripped line is accepted."""
    secret_file, key_file = tmp_path / "backend-secret", tmp_path / "api-key"
    secret_file.write_text("old-backend-secret\n  new-backend-secret \r\n\n")
    key_file.write_text("old-api-key\nnew-api-key\n")
    server = start_server(f"--backend-secret-file={secret_file}", f"--api-key-file={key_file}")
    # What a backend sends is compared as text, surrounding whitespace ignored.
    for secret in ("old-backend-secret", "new-backend-secret", "new-backend-secret\n"):
        with server.backend() as b:
            assert b.request(json.dumps({"cmd": "auth", "secret": secret})) == b"ok"
    with server.backend() as b:
        both = "old-backend-secret\nnew-backend-secret"
        assert b.request(json.dumps({"cmd": "auth", "secret": both})) == (
            b"error authentication failed"
        )
    for key, status in (("old-api-key", 200), ("new-api-key", 200), ("other", 401)):
        headers = {"Authorization": f"Bearer {key}"}
        assert http_post(server, "/api/stats", b"{}", headers)[0] == status, key


# -- the Python client and the pushsvc command with the secret -------------------


def identified(server: PushServer, user: str, ws_clients: list) -> Any:
    """A browser as ``user``, once the service has identified it (asked with the secret)."""
    ws = server.ws(user)
    ws_clients.append(ws)
    with Client("127.0.0.1", server.text_port, secret=SECRET) as client:
        deadline = time.monotonic() + 10
        while not client.is_online(user):
            assert time.monotonic() < deadline, f"{user} never came online"
            time.sleep(0.02)
    return ws


def test_the_client_sends_the_secret_first(guarded: PushServer, ws_clients) -> None:
    user = new_uid("sec")
    ws = identified(guarded, user, ws_clients)
    with Client("127.0.0.1", guarded.text_port, secret=SECRET) as client:
        assert client.push(user, "88%") == 1
        client.close()  # a new connection authenticates again
        assert client.push_many([(user, "a"), (user, "b")]) == [1, 1]
    assert [ws.recv(timeout=5) for _ in range(3)] == ["88%", "a", "b"]


def test_the_client_without_the_secret_is_told_why(guarded: PushServer) -> None:
    with Client("127.0.0.1", guarded.text_port) as client:
        with pytest.raises(RequestRejected, match="authentication required"):
            client.push("anyone", "x")


def test_a_wrong_secret_fails_once_and_is_not_retried(guarded: PushServer) -> None:
    client = Client("127.0.0.1", guarded.text_port, secret="not-the-secret", retries=3)
    with pytest.raises(AuthenticationFailed, match="authentication failed") as caught:
        client.push("anyone", "x")
    assert caught.value.reason == "authentication failed"
    client.close()
    # One wrong secret counted, not four: the limit is 3, so two more are refused as wrong...
    for _ in range(2):
        with pytest.raises(AuthenticationFailed, match="authentication failed"):
            client.connect()
    # ...and then the address is blocked, which the client reports the same way.
    with pytest.raises(AuthenticationFailed, match="too many failed"):
        client.connect()


def test_the_command_reads_the_secret_from_a_file_or_the_environment(
    guarded: PushServer, tmp_path, ws_clients
) -> None:
    from test_cli import pushsvc

    user = new_uid("sec")
    ws = identified(guarded, user, ws_clients)
    port = f"--port={guarded.text_port}"
    secret_file = tmp_path / "backend-secret"
    secret_file.write_text(f"\n{SECRET}\nan-older-secret\n")
    proc = pushsvc(port, "--backend-secret-file", str(secret_file), "push", user, "from a file")
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "ok\n", "")
    proc = pushsvc(port, "push", user, "from the environment", env={SECRET_ENV: SECRET})
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "ok\n", "")
    assert [ws.recv(timeout=5) for _ in range(2)] == ["from a file", "from the environment"]
    proc = pushsvc(port, "push", user, "x", env={SECRET_ENV: "wrong"})
    assert proc.returncode == 2 and "refused the backend secret" in proc.stderr
    proc = pushsvc(port, "--backend-secret-file", str(tmp_path / "missing"), "push", user, "x")
    assert proc.returncode == 2 and "--backend-secret-file" in proc.stderr
