"""Signed tokens, auth failures and the auth timeout, with real WebSocket clients."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import jwt
import pytest
from conftest import ROOT, PushServer
from websockets.exceptions import ConnectionClosed

SECRET = "test-secret-0123456789-abcdefghijklmnop"


def token(sub: object = "alice", secret: str = SECRET, exp_in: float = 60, **claims) -> str:
    payload = {"sub": sub, "exp": int(time.time() + exp_in), **claims}
    return jwt.encode(payload, secret, algorithm="HS256")


def closed_with(ws) -> tuple[int, str]:
    with pytest.raises(ConnectionClosed) as info:
        ws.recv(timeout=10)
    rcvd = info.value.rcvd
    assert rcvd is not None, "closed without a close frame"
    return rcvd.code, rcvd.reason


@pytest.fixture
def secured(start_server) -> PushServer:
    return start_server(env={"PUSHSVC_SECRET": SECRET})


def test_valid_token_in_first_frame(secured: PushServer) -> None:
    ws = secured.ws(token("alice"))
    secured.wait_for(lambda s: s["connections"] == 1)
    with secured.backend() as b:
        assert b.request('{"uid":"alice","data":"hi alice"}') == b"ok"
    assert ws.recv(timeout=5) == "hi alice"
    ws.close()


def test_valid_token_in_query(secured: PushServer) -> None:
    ws = secured.ws(path=f"/?token={token('bob')}")
    secured.wait_for(lambda s: s["connections"] == 1)
    with secured.backend() as b:
        assert b.request('{"uid":"bob","data":"hi bob"}') == b"ok"
    assert ws.recv(timeout=5) == "hi bob"
    ws.close()


@pytest.mark.parametrize(
    ("credential", "code", "reason"),
    [
        (lambda: token(secret="wrong-secret-wrong-secret-wrong!!"), 4001, "invalid token"),
        (lambda: token(exp_in=-60), 4002, "token expired"),
        (lambda: "alice", 4001, "invalid token"),  # a bare uid is not a token
        (lambda: jwt.encode({"sub": "alice"}, SECRET, algorithm="HS256"), 4001, "invalid token"),
        (lambda: jwt.encode({"exp": int(time.time()) + 60}, SECRET), 4001, "invalid token"),
        (lambda: token(algorithm_none=True) + "x", 4001, "invalid token"),
    ],
    ids=["bad-signature", "expired", "not-a-token", "no-exp", "no-sub", "tampered"],
)
def test_bad_tokens_are_closed_with_4xxx(secured: PushServer, credential, code, reason) -> None:
    secret_token = credential()
    ws = secured.ws(secret_token)
    got_code, got_reason = closed_with(ws)
    assert got_code == code
    assert got_reason.startswith(reason)
    log = secured.log()
    assert "authentication failed" in log
    assert secret_token not in log  # the log records the failure, never the token


def test_unsigned_alg_none_token_is_refused(secured: PushServer) -> None:
    forged = jwt.encode({"sub": "alice", "exp": int(time.time()) + 60}, None, algorithm="none")
    code, _ = closed_with(secured.ws(forged))
    assert code == 4001


def test_bad_token_in_query_is_refused(secured: PushServer) -> None:
    code, reason = closed_with(secured.ws(path="/?token=garbage"))
    assert (code, reason.split(":")[0]) == (4001, "invalid token")


def test_secret_file(start_server, tmp_path) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_text(SECRET + "\n")
    server = start_server(f"--secret-file={secret_file}")
    ws = server.ws(token("carol"))
    server.wait_for(lambda s: s["connections"] == 1)
    code, _ = closed_with(server.ws("carol"))  # the seed's bare uid no longer works
    assert code == 4001
    ws.close()
    assert "UNAUTHENTICATED" not in server.log()


def test_development_mode_warns_at_startup(server: PushServer) -> None:
    assert "UNAUTHENTICATED" in server.log()


def test_auth_timeout_closes_silent_connections(start_server) -> None:
    server = start_server("--auth-timeout=0.5")
    ws = server.ws()
    started = time.monotonic()
    code, reason = closed_with(ws)
    assert (code, reason) == (4008, "authentication timeout")
    assert 0.4 < time.monotonic() - started < 3
    server.wait_for(lambda s: s["pending"] == 0)


def test_empty_uid_is_refused(server: PushServer) -> None:
    assert closed_with(server.ws(""))[0] == 4000


def test_binary_first_frame_is_refused(server: PushServer) -> None:
    assert closed_with(server.ws(b"uid-as-bytes"))[0] == 4000


def test_oversized_client_frame_is_closed_1009(start_server) -> None:
    server = start_server("--max-client-frame=256")
    code, _ = closed_with(server.ws("u" * 1000))
    assert code == 1009
    with server.backend() as b:
        assert b.request('{"cmd":"stats"}').startswith(b"{")


# -- the secret file, read as docs/deploy.md says ------------------------------------

DOCS_PATH = "/etc/pushsvc/secret"


def docs_snippet(lang: str) -> str:
    """The ``lang`` code block of the "The secret" section of docs/deploy.md."""
    text = (ROOT / "docs" / "deploy.md").read_text()
    section = text.split("\n## The secret\n", 1)[1].split("\n## ", 1)[0]
    found = re.search(rf"```{lang}\n(.*?)```", section, re.S)
    assert found, f"no {lang} block in deploy.md's secret section"
    return found.group(1)


def make_secret(path: Path, append: bool = False) -> None:
    """Run the docs' command that makes the secret file (``>>``: add a line, to rotate)."""
    command = next(line for line in docs_snippet("sh").splitlines() if line.startswith("head "))
    assert command == f"head -c 32 /dev/urandom | base64 > {DOCS_PATH}"
    command = command.replace(f"> {DOCS_PATH}", f"{'>>' if append else '>'} {path}")
    subprocess.run(["sh", "-c", command], check=True)


def accepted(server: PushServer, tokens: dict[str, str]) -> None:
    """Each ``{uid: token}`` authenticates a real WebSocket client that then gets a push."""
    clients = {uid: server.ws(t) for uid, t in tokens.items()}
    try:
        for uid, ws in clients.items():
            server.push_until_delivered(uid, f"hello {uid}")
            assert ws.recv(timeout=5) == f"hello {uid}"
    finally:
        for ws in clients.values():
            ws.close()


def test_the_docs_python_snippet_signs_valid_tokens(start_server, tmp_path) -> None:
    path = tmp_path / "secret"
    make_secret(path)
    server = start_server(f"--secret-file={path}")
    namespace = {"uid": "py-docs"}
    exec(docs_snippet("python").replace(DOCS_PATH, str(path)), namespace)
    claims = {"exp": int(time.time()) + 300}
    accepted(
        server,
        {  # the snippet as the docs show it, and the other ways its comment names
            "py-docs": namespace["token"],
            "py-raw": jwt.encode({"sub": "py-raw", **claims}, path.read_bytes()),
            "py-b64": jwt.encode({"sub": "py-b64", **claims}, base64.b64decode(path.read_text())),
        },
    )
    text = path.read_text().strip()
    assert (
        f"signed with 3 keys from --secret-file {path}: line 1 (44 bytes), "
        "line 1 base64-decoded (32 bytes), the raw contents (45 bytes)"
    ) in server.log()
    assert text not in server.log()


DEBIAN_PHP_JWT = "/usr/share/php/Firebase/JWT/autoload.php"


def php_jwt_autoload() -> str | None:
    """A PHP file that makes firebase/php-jwt loadable, if there is one.

    ``$PUSHSVC_PHP_AUTOLOAD`` (a Composer ``vendor/autoload.php`` that has it),
    else the autoloader a Debian package of it would install.
    """
    for candidate in (os.environ.get("PUSHSVC_PHP_AUTOLOAD"), DEBIAN_PHP_JWT):
        if candidate and os.path.exists(candidate):
            return candidate
    return None


def php_string(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


PHP_SCRIPT = """<?php
require {autoload};
$userId = 'php-docs';
{snippet}
// The other ways the snippet's comment names.
$claims = ['exp' => time() + 300];
$raw = JWT::encode(['sub' => 'php-raw'] + $claims, file_get_contents({path}), 'HS256');
$decoded = base64_decode(file_get_contents({path}));
$b64 = JWT::encode(['sub' => 'php-b64'] + $claims, $decoded, 'HS256');
echo json_encode([$token, $raw, $b64]);
"""


def test_the_docs_php_snippet_signs_valid_tokens(start_server, tmp_path) -> None:
    php, autoload = shutil.which("php"), php_jwt_autoload()
    if php is None:
        pytest.skip("php is not installed (apt-get install php-cli)")
    if autoload is None:
        pytest.skip(
            "firebase/php-jwt not found: set PUSHSVC_PHP_AUTOLOAD to a Composer "
            "vendor/autoload.php that has it (Debian 12 has no package of it)"
        )
    path = tmp_path / "secret"
    make_secret(path)
    server = start_server(f"--secret-file={path}")
    script = tmp_path / "sign.php"
    snippet = docs_snippet("php").replace(php_string(DOCS_PATH), php_string(str(path)))
    script.write_text(
        PHP_SCRIPT.format(
            autoload=php_string(autoload), snippet=snippet, path=php_string(str(path))
        )
    )
    proc = subprocess.run([php, str(script)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    tokens = json.loads(proc.stdout)
    accepted(server, dict(zip(["php-docs", "php-raw", "php-b64"], tokens, strict=True)))


def test_several_lines_are_several_secrets(start_server, tmp_path) -> None:
    """Rotation: a token signed with either line is valid; with neither, 4001."""
    path = tmp_path / "secret"
    make_secret(path)
    make_secret(path, append=True)
    old, new = path.read_text().split()
    server = start_server(f"--secret-file={path}")
    accepted(server, {"old-key": token("old-key", old), "new-key": token("new-key", new)})
    other = base64.b64encode(os.urandom(32)).decode()
    assert closed_with(server.ws(token("x", other))) == (
        4001,
        "invalid token: Signature verification failed",
    )
    assert "signed with 4 keys from --secret-file" in server.log()
