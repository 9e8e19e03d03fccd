"""How a secret file is read (Secrets), and tokens checked against several keys; no sockets."""

from __future__ import annotations

import base64
import os
import time

import jwt
import pytest
from twisted.python import usage

from pushsvc.auth import CLOSE_INVALID_TOKEN, AuthError, JWTAuthenticator, Secrets, load_secret
from pushsvc.tap import PushOptions as Options

RANDOM = os.urandom(32)
B64 = base64.b64encode(RANDOM)  # what `head -c 32 /dev/urandom | base64` writes, without "\n"
OTHER = base64.b64encode(os.urandom(32))


def token(key: bytes | str, sub: str = "alice") -> str:
    return jwt.encode({"sub": sub, "exp": int(time.time()) + 60}, key, algorithm="HS256")


def test_a_base64_line_gives_its_text_its_bytes_and_the_raw_contents() -> None:
    secrets = Secrets.parse(B64 + b"\n", "--secret-file s")
    assert secrets.lines == (B64,)
    assert secrets.keys == (B64, RANDOM, B64 + b"\n")
    assert secrets.describe() == (
        "3 keys from --secret-file s: line 1 (44 bytes), line 1 base64-decoded (32 bytes), "
        "the raw contents (45 bytes)"
    )
    assert B64.decode() not in repr(secrets) and "keys" not in repr(secrets)


@pytest.mark.parametrize(
    ("raw", "keys"),
    [
        (b"a-plain-text-secret-0123456789-abcdef", [b"a-plain-text-secret-0123456789-abcdef"]),
        (b"  spaced-text-secret-0123456789-abcdef \r\n", None),  # text and raw contents
        (base64.b64encode(os.urandom(16)) + b"\n", None),  # decodes to 16 bytes: not a key
        (b"not=base64-but-long-enough-0123456789\n", None),
    ],
    ids=["no-newline", "crlf-and-spaces", "short-base64", "invalid-base64"],
)
def test_text_that_is_not_base64_of_32_bytes_gives_text_and_raw(raw: bytes, keys) -> None:
    secrets = Secrets.parse(raw, "s")
    assert secrets.keys == tuple(keys or [raw.strip(), raw])


def test_several_lines_are_several_secrets_for_rotation() -> None:
    secrets = Secrets.parse(b"\n" + B64 + b"\r\n\n  " + OTHER + b"\n\n", "s")
    assert secrets.lines == (B64, OTHER)
    assert secrets.keys == (B64, RANDOM, OTHER, base64.b64decode(OTHER))  # no raw contents
    assert secrets.origins[2:] == ("line 2", "line 2 base64-decoded")


def test_matches_is_a_text_comparison_with_every_line() -> None:
    secrets = Secrets.parse(b"first-secret\nsecond-secret\n", "s")
    assert secrets.matches(b"first-secret") and secrets.matches(b"second-secret")
    assert secrets.matches(b"second-secret\n")  # a value read with its newline
    assert not secrets.matches(b"first-secret\nsecond-secret")
    assert not secrets.matches(b"") and not secrets.matches(b"first")


def test_every_way_of_reading_the_file_signs_a_valid_token() -> None:
    auth = JWTAuthenticator(Secrets.parse(B64 + b"\n", "s").keys)
    for key in (B64.decode(), B64 + b"\n", RANDOM):
        assert auth.authenticate(token(key)).uid == "alice"


def test_a_token_no_key_verifies_gets_the_first_keys_error() -> None:
    auth = JWTAuthenticator(Secrets.parse(B64 + b"\n" + OTHER + b"\n", "s").keys)
    assert auth.authenticate(token(base64.b64decode(OTHER), sub="bob")).uid == "bob"
    with pytest.raises(AuthError) as info:
        auth.authenticate(token(b"x" * 32))
    assert (info.value.code, info.value.reason) == (
        CLOSE_INVALID_TOKEN,
        "invalid token: Signature verification failed",
    )


def test_empty_sources_are_refused(tmp_path) -> None:
    path = tmp_path / "secret"
    path.write_bytes(b" \n\n")
    with pytest.raises(ValueError, match=f"--api-key-file {path} is empty"):
        load_secret(str(path), option="--api-key-file")
    assert load_secret(None, "PUSHSVC_X", environ={}) is None


def test_a_jwt_secret_shorter_than_32_bytes_is_a_usage_error(tmp_path, monkeypatch) -> None:
    path = tmp_path / "secret"
    path.write_text("short-secret\n")
    with pytest.raises(usage.UsageError) as info:
        Options().parseOptions([f"--secret-file={path}"])
    assert str(info.value) == (
        f"cannot read a secret: --secret-file {path} is 12 bytes; an HS256 secret must be "
        "at least 32 bytes (make one with: head -c 32 /dev/urandom | base64)"
    )
    path.write_text(B64.decode() + "\nshort-secret\n")  # every line is a secret
    with pytest.raises(usage.UsageError, match=f"line 2 of --secret-file {path} is 12 bytes"):
        Options().parseOptions([f"--secret-file={path}"])
    monkeypatch.setenv("PUSHSVC_SECRET", "short-secret")
    with pytest.raises(usage.UsageError, match=r"\$PUSHSVC_SECRET is 12 bytes"):
        Options().parseOptions([])
    monkeypatch.setenv("PUSHSVC_SECRET", B64.decode())
    assert Options().parseOptions([]) is None


def test_backend_secret_and_api_key_have_no_minimum(tmp_path, monkeypatch) -> None:
    """They are compared as text, not used as HMAC keys: any length is theirs to choose."""
    monkeypatch.delenv("PUSHSVC_SECRET", raising=False)
    monkeypatch.setenv("PUSHSVC_API_KEY", "the-key")
    monkeypatch.setenv("PUSHSVC_BACKEND_SECRET", "backend\nrotated")
    config = Options()
    config.parseOptions([])
    assert config["api-key"].lines == (b"the-key",)
    assert config["backend-secret"].lines == (b"backend", b"rotated")
