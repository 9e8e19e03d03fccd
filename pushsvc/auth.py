"""Who a WebSocket connection is: turning its first frame into a uid.

Two policies, chosen at start-up: the seed's development mode (the frame *is*
the uid) and signed HS256 JWTs (PyJWT) whose ``sub`` is the uid.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import jwt

from pushsvc.errors import (
    CLOSE_BAD_REQUEST,
    CLOSE_INVALID_TOKEN,
    CLOSE_TOKEN_EXPIRED,
    AuthError,
)

MAX_UID_LENGTH = 256
SECRET_ENV = "PUSHSVC_SECRET"
API_KEY_ENV = "PUSHSVC_API_KEY"


@dataclass(frozen=True)
class Identity:
    uid: str
    groups: tuple[str, ...] = ()


def check_uid(uid: str) -> str:
    """Refuse uids that cannot be addressed by a backend (empty or absurdly long)."""
    if not uid:
        raise AuthError(CLOSE_BAD_REQUEST, "empty uid")
    if len(uid) > MAX_UID_LENGTH:
        raise AuthError(CLOSE_BAD_REQUEST, f"uid longer than {MAX_UID_LENGTH} characters")
    return uid


class UidAuthenticator:
    """Development mode, as in the Workerman recipe: the credential is the uid.

    Anybody can claim any uid; the service logs a warning at start-up.
    """

    signed = False

    def authenticate(self, credential: str) -> Identity:
        return Identity(check_uid(credential))


class JWTAuthenticator:
    """HS256 tokens signed by the web application with a shared secret.

    ``sub`` is the uid and ``exp`` is required: a token that never expires is
    a password that can never be revoked.  An optional ``groups`` claim (a
    list of names) puts the connection in those groups.
    """

    signed = True

    def __init__(self, secret: bytes, leeway: float = 0.0) -> None:
        if not secret:
            raise ValueError("the JWT secret is empty")
        self._secret = secret
        self._leeway = leeway

    def authenticate(self, credential: str) -> Identity:
        try:
            claims = jwt.decode(
                credential,
                self._secret,
                algorithms=["HS256"],
                options={"require": ["sub", "exp"]},
                leeway=self._leeway,
            )
        except jwt.ExpiredSignatureError:
            raise AuthError(CLOSE_TOKEN_EXPIRED, "token expired") from None
        except jwt.InvalidTokenError as e:
            raise AuthError(CLOSE_INVALID_TOKEN, f"invalid token: {e}") from None
        sub = claims["sub"]
        if not isinstance(sub, str):
            raise AuthError(CLOSE_INVALID_TOKEN, "invalid token: sub is not a string")
        groups = claims.get("groups", [])
        if not isinstance(groups, list) or not all(isinstance(g, str) and g for g in groups):
            raise AuthError(CLOSE_INVALID_TOKEN, "invalid token: groups is not a list of names")
        return Identity(check_uid(sub), tuple(dict.fromkeys(groups)))


def load_secret(
    secret_file: str | None, env_name: str = SECRET_ENV, environ: dict[str, str] | None = None
) -> bytes | None:
    """A secret (JWT key, API key) from a file (preferred) or the environment; None if unset.

    Not a command-line flag: ``ps`` shows every process's arguments.
    """
    if secret_file:
        with open(secret_file, "rb") as f:
            secret = f.read().strip()
        if not secret:
            raise ValueError(f"secret file {secret_file} is empty")
        return secret
    env = os.environ if environ is None else environ
    value = env.get(env_name, "")
    return value.encode("utf-8") if value else None


def make_authenticator(secret: bytes | None) -> UidAuthenticator | JWTAuthenticator:
    return JWTAuthenticator(secret) if secret else UidAuthenticator()
