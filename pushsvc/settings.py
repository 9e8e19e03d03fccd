"""What SIGHUP re-reads without dropping a connection: the secrets and the allowed origins.

tap.py builds one :class:`Reloadable` from the options; the authenticator,
the backend gate, the HTTP API and the origin check read its ``current``
settings on each use, so a reload is one swap of a frozen object.  Secret
files may hold several secrets, one a line: rotate a key by adding the new
line, sending SIGHUP, and removing the old line later.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.application import service
from twisted.internet import reactor
from twisted.logger import Logger

from pushsvc.auth import Identity, JWTAuthenticator, Secrets, UidAuthenticator, make_authenticator
from pushsvc.policy import OriginPolicy

log = Logger()


@dataclass(frozen=True)
class Settings:
    """One consistent set of what a reload may change."""

    secret: Secrets | None  # HS256 keys for WebSocket tokens (None: development mode)
    backend_secret: Secrets | None
    api_key: Secrets | None
    origins: OriginPolicy
    origins_text: str | None = None  # as given, for the reload log line

    @property
    def authenticator(self) -> UidAuthenticator | JWTAuthenticator:
        return make_authenticator(self.secret)


def _describe(secrets: Secrets | None) -> str:
    return "none" if secrets is None else secrets.describe()


class Reloadable:
    """The current :class:`Settings`, replaced as a whole by :meth:`reload`.

    Also the WebSocket factory's authenticator and origin policy (it calls
    ``authenticate`` and ``allows``), reading the current settings each time.
    """

    def __init__(self, load: Callable[[], Settings]) -> None:
        self._load = load
        self.current = load()
        self._authenticator = self.current.authenticator

    @property
    def signed(self) -> bool:
        return self._authenticator.signed

    def authenticate(self, credential: str) -> Identity:
        return self._authenticator.authenticate(credential)

    def allows(self, origin: str | None) -> bool:
        return self.current.origins.allows(origin)

    def secret(self) -> Secrets | None:
        return self.current.secret

    def backend_secret(self) -> Secrets | None:
        return self.current.backend_secret

    def api_key(self) -> Secrets | None:
        return self.current.api_key

    def reload(self) -> bool:
        """Read the files again; on any error keep the old settings and log why (one line)."""
        try:
            new = self._load()
            authenticator = new.authenticator
        except (OSError, ValueError) as e:
            log.error("SIGHUP: reload failed, keeping the previous settings: {error}", error=e)
            return False
        old, self.current, self._authenticator = self.current, new, authenticator
        changed = [
            f"{what}: {_describe(after)}"
            for what, before, after in (
                ("JWT secret", old.secret, new.secret),
                ("backend secret", old.backend_secret, new.backend_secret),
                ("API key", old.api_key, new.api_key),
            )
            if _describe(before) != _describe(after) or before != after
        ]
        if old.origins_text != new.origins_text:
            changed.append(f"allowed origins: {new.origins_text or 'any'}")
        log.info(
            "SIGHUP: settings reloaded; {changes}",
            changes="; ".join(changed) if changed else "nothing changed",
        )
        return True


class ReloadOnHangup(service.Service):
    """SIGHUP reloads the settings instead of killing the process (its default)."""

    def __init__(self, settings: Reloadable) -> None:
        self.settings = settings
        self._previous: Any = None

    def startService(self) -> None:
        super().startService()
        self._previous = signal.signal(signal.SIGHUP, self._hangup)

    def stopService(self) -> None:
        signal.signal(signal.SIGHUP, self._previous or signal.SIG_DFL)
        return super().stopService()

    def _hangup(self, signum: int, frame: object) -> None:
        # A signal handler runs between bytecodes: do the work in the reactor.
        reactor.callFromThread(self.settings.reload)  # type: ignore[attr-defined]
