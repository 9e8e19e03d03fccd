"""Who a WebSocket connection is: turning its first frame into a uid.

Two policies, chosen at start-up: the seed's development mode (the frame *is*
the uid) and signed HS256 JWTs (PyJWT) whose ``sub`` is the uid.  Also how a
secret file is read (:class:`Secrets`), for the JWT secret, the backend
secret and the HTTP API key alike.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

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
MIN_KEY_BYTES = 32  # RFC 7518 3.2: an HS256 key at least as long as the hash; PyJWT warns below


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

    def __init__(self, keys: bytes | Sequence[bytes], leeway: float = 0.0) -> None:
        self._keys = tuple([keys] if isinstance(keys, bytes) else keys)
        if not self._keys or not all(self._keys):
            raise ValueError("a JWT key is empty")
        self._leeway = leeway

    def authenticate(self, credential: str) -> Identity:
        """The identity in a token signed with any of the keys.

        Only a wrong signature moves on to the next key: the others (malformed,
        expired, a claim missing) come after the signature was checked, or do
        not depend on the key.  A token no key verifies is refused with the
        first key's error.
        """
        first: jwt.InvalidTokenError | None = None
        for key in self._keys:
            try:
                claims = jwt.decode(
                    credential,
                    key,
                    algorithms=["HS256"],
                    options={"require": ["sub", "exp"]},
                    leeway=self._leeway,
                )
                break
            except jwt.InvalidSignatureError as e:
                first = first or e
            except jwt.ExpiredSignatureError:
                raise AuthError(CLOSE_TOKEN_EXPIRED, "token expired") from None
            except jwt.InvalidTokenError as e:
                raise AuthError(CLOSE_INVALID_TOKEN, f"invalid token: {e}") from None
        else:
            raise AuthError(CLOSE_INVALID_TOKEN, f"invalid token: {first}")
        sub = claims["sub"]
        if not isinstance(sub, str):
            raise AuthError(CLOSE_INVALID_TOKEN, "invalid token: sub is not a string")
        groups = claims.get("groups", [])
        if not isinstance(groups, list) or not all(isinstance(g, str) and g for g in groups):
            raise AuthError(CLOSE_INVALID_TOKEN, "invalid token: groups is not a list of names")
        return Identity(check_uid(sub), tuple(dict.fromkeys(groups)))


@dataclass(frozen=True)
class Secrets:
    """The secrets one file (or environment variable) holds, read as web apps read it.

    A web app signing tokens may use the file's text without its whitespace
    (``trim(file_get_contents(...))``), its raw contents, trailing newline
    included (``file_get_contents`` alone), or the bytes its text encodes in
    base64 (what ``head -c 32 /dev/urandom | base64`` makes): each must give a
    valid token.  And a file may hold several secrets, one a line, so that
    keys can be rotated.  So:

    - ``lines``: each non-empty line, stripped of whitespace.  The backend
      secret and the API key are compared as text with these.
    - ``keys``: the HS256 keys a token may be signed with, in this order:
      each line's text, then its base64 decoding if the text is valid base64
      of at least 32 bytes; and for a one-line source its raw contents.

    ``repr`` never shows a secret; ``describe`` gives each key's origin and length.
    """

    source: str  # "--secret-file /etc/pushsvc/secret" or "$PUSHSVC_SECRET", for messages
    lines: tuple[bytes, ...] = field(repr=False)
    keys: tuple[bytes, ...] = field(repr=False)
    origins: tuple[str, ...] = field(repr=False)  # what each key is, e.g. "line 1 base64-decoded"

    @classmethod
    def parse(cls, raw: bytes, source: str) -> Secrets:
        """Read ``raw`` (a file's contents or a variable's value) by the rules above."""
        lines = tuple(stripped for line in raw.split(b"\n") if (stripped := line.strip()))
        if not lines:
            raise ValueError(f"{source} is empty")
        found: dict[bytes, str] = {}  # key -> origin, in order, without duplicates
        for n, line in enumerate(lines, 1):
            found.setdefault(line, f"line {n}")
            decoded = _base64(line)
            if decoded is not None and len(decoded) >= MIN_KEY_BYTES:
                found.setdefault(decoded, f"line {n} base64-decoded")
        if len(lines) == 1:
            found.setdefault(raw, "the raw contents")
        return cls(source, lines, tuple(found), tuple(found.values()))

    def check_length(self, minimum: int = MIN_KEY_BYTES) -> None:
        """Refuse a line shorter than ``minimum`` bytes: a web app may sign with any line."""
        for n, line in enumerate(self.lines, 1):
            if len(line) < minimum:
                where = f"line {n} of {self.source}" if len(self.lines) > 1 else self.source
                raise ValueError(
                    f"{where} is {len(line)} bytes; an HS256 secret must be at least {minimum} "
                    "bytes (make one with: head -c 32 /dev/urandom | base64)"
                )

    def matches(self, given: bytes) -> bool:
        """Whether ``given`` (surrounding whitespace ignored) is one of the lines.

        Compared in constant time with every line, whichever matches.
        """
        given = given.strip()
        found = False
        for line in self.lines:
            found |= hmac.compare_digest(given, line)
        return found

    def describe(self) -> str:
        """For the start-up log: how many keys, where from, how long; never a key."""
        pairs = zip(self.origins, self.keys, strict=True)
        each = ", ".join(f"{origin} ({len(key)} bytes)" for origin, key in pairs)
        count = "1 key" if len(self.keys) == 1 else f"{len(self.keys)} keys"
        return f"{count} from {self.source}: {each}"


def _base64(text: bytes) -> bytes | None:
    """``text`` decoded as standard base64 (padding included), or None if it is not that."""
    try:
        return base64.b64decode(text, validate=True)
    except binascii.Error:
        return None


def load_secret(
    secret_file: str | None,
    env_name: str = SECRET_ENV,
    environ: dict[str, str] | None = None,
    *,
    option: str = "--secret-file",
    min_bytes: int = 0,
) -> Secrets | None:
    """The secrets in a file (preferred) or an environment variable; None if neither is set.

    Not a command-line flag: ``ps`` shows every process's arguments.  Raises
    ValueError, naming ``option`` or the variable, for an empty source or
    (with ``min_bytes``) a secret too short.
    """
    if secret_file:
        source = f"{option} {secret_file}"
        try:
            with open(secret_file, "rb") as f:
                raw = f.read()
        except OSError as e:
            raise ValueError(f"{source}: {e.strerror or e}") from None
        secrets = Secrets.parse(raw, source)
    else:
        env = os.environ if environ is None else environ
        value = env.get(env_name, "")
        if not value:
            return None
        secrets = Secrets.parse(value.encode("utf-8"), f"${env_name}")
    if min_bytes:
        secrets.check_length(min_bytes)
    return secrets


def make_authenticator(secrets: Secrets | None) -> UidAuthenticator | JWTAuthenticator:
    return JWTAuthenticator(secrets.keys) if secrets else UidAuthenticator()
