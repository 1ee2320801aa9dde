"""API credentials: only from the environment or from files named by `*_FILE` variables.

Never from the config file and never with a default. Values are wrapped in `Secret`, whose repr and
str are redacted, so a secret cannot reach a log line, an exception message or a Sentry event by
accident; code that needs the value calls `reveal()` at the one place it signs.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ingest.errors import CredentialError

ENV_NAMES = ("OKX_API_KEY", "OKX_API_SECRET", "OKX_API_PASSPHRASE")


class Secret:
    """A string that never shows itself: repr, str and format all print a redaction."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return repr(self)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __reduce__(self) -> tuple[object, ...]:
        raise TypeError("a Secret cannot be pickled")


@dataclass(frozen=True, slots=True)
class Credentials:
    """One OKX API key. `key_hint` (last 4 characters of the key) is the only part safe to log."""

    api_key: Secret
    secret: Secret
    passphrase: Secret

    @property
    def key_hint(self) -> str:
        return "…" + self.api_key.reveal()[-4:]

    def fingerprint(self) -> str:
        """A short digest that changes when any part changes (rotation detection), revealing nothing."""
        h = hashlib.sha256()
        for part in (self.api_key, self.secret, self.passphrase):
            h.update(part.reveal().encode())
            h.update(b"\0")
        return h.hexdigest()[:12]

    def values(self) -> tuple[str, str, str]:
        """The raw values, for leak scanners in tests and the log redaction filter."""
        return self.api_key.reveal(), self.secret.reveal(), self.passphrase.reveal()


def _read_one(name: str, env: Mapping[str, str]) -> str:
    file_var = f"{name}_FILE"
    direct = env.get(name)
    path = env.get(file_var)
    if direct is not None and path is not None:
        raise CredentialError(f"both {name} and {file_var} are set; set only one of them")
    if path is not None:
        try:
            value = Path(path).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise CredentialError(
                f"{file_var} names {path!r}, which cannot be read ({exc.strerror}); "
                "mount the secret there or fix the path"
            ) from None
        if not value:
            raise CredentialError(f"{file_var} names {path!r}, which is empty; put the credential in it")
        return value
    if direct is None:
        raise CredentialError(f"{name} is not set; set it (or {file_var} to a file holding it) in the environment")
    if not direct.strip():
        raise CredentialError(f"{name} is set but empty; give it the value from OKX's API key page")
    return direct.strip()


def load_credentials(env: Mapping[str, str] | None = None) -> Credentials:
    """All three credentials from `env` (default: os.environ); CredentialError names the missing one."""
    env = os.environ if env is None else env
    key, secret, passphrase = (_read_one(n, env) for n in ENV_NAMES)
    return Credentials(Secret(key), Secret(secret), Secret(passphrase))


def credentials_present(env: Mapping[str, str] | None = None) -> bool:
    """True when any credential variable is set, i.e. the operator meant to give a key."""
    env = os.environ if env is None else env
    return any(n in env or f"{n}_FILE" in env for n in ENV_NAMES)


class CredentialStore:
    """The current credentials of the process, re-read on demand (SIGHUP, a changed secret file).

    Connections and the REST client ask for `current()` each time they sign, so a rotation takes effect
    at the next login or request; `wait_changed` lets private connections re-login promptly.
    A failed re-read keeps the old credentials (and raises), so a half-written secret file cannot take
    a running daemon down.
    """

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        self._env = env
        self._current = load_credentials(env)
        self.version = 1
        self._changed = asyncio.Condition()

    def current(self) -> Credentials:
        return self._current

    def watched_files(self) -> list[Path]:
        """The secret files named by `*_FILE` variables (what a file watcher should poll)."""
        env = os.environ if self._env is None else self._env
        return [Path(env[f"{n}_FILE"]) for n in ENV_NAMES if f"{n}_FILE" in env]

    async def reload(self) -> bool:
        """Re-read; True when the credentials changed (and waiters were woken)."""
        fresh = load_credentials(self._env)
        if fresh.fingerprint() == self._current.fingerprint():
            return False
        self._current = fresh
        self.version += 1
        async with self._changed:
            self._changed.notify_all()
        return True

    async def wait_changed(self, seen_version: int) -> int:
        """Return the new version once it differs from `seen_version`."""
        async with self._changed:
            await self._changed.wait_for(lambda: self.version != seen_version)
        return self.version
