"""API credentials: only from the environment or from secret files, never from the config, never a default.

Sources, per credential (`OKX_API_KEY`, `OKX_API_SECRET`, `OKX_API_PASSPHRASE`):
* the variable itself, or
* `<NAME>_FILE`, a file holding the value (Kubernetes secret volumes, Docker secrets). A relative path is
  resolved against `$CREDENTIALS_DIRECTORY` when systemd set it, so `OKX_API_KEY_FILE=okx_api_key` and
  `OKX_API_KEY_FILE=%d/okx_api_key` both work with `LoadCredential=okx_api_key:/etc/okx-ingest/key`, or
* with neither set, `$CREDENTIALS_DIRECTORY/<name in lower case>` (e.g. `okx_api_key`) if systemd provided it.

Values are wrapped in `Secret`, whose repr, str and format are redacted and which refuses to be pickled,
so a secret cannot reach a log line, an exception message or a Sentry event by accident; code that needs
the value calls `reveal()` at the one place it signs.

The store re-reads on demand (SIGHUP) or when a watched file changes, keeps the old credentials when the
new ones are unreadable, and counts authentication failures so a bad key pauses signed traffic instead of
hammering OKX. A rotation is fail-closed: with a `verifier` set, new credentials are checked (a signed read of
their permissions) before anything can use them; refused ones leave the old key in force.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from ingest.config import OkxSettings
from ingest.core.backoff import full_jitter
from ingest.errors import CredentialError, IngestError
from ingest.obs.redact import REDACTOR

log = logging.getLogger(__name__)

ENV_NAMES = ("OKX_API_KEY", "OKX_API_SECRET", "OKX_API_PASSPHRASE")
SYSTEMD_CREDENTIALS_DIR = "CREDENTIALS_DIRECTORY"


class Secret:
    """A string that never shows itself: repr, str and format print a redaction, pickling is refused."""

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
        return isinstance(other, Secret) and hmac.compare_digest(other._value.encode(), self._value.encode())

    def __hash__(self) -> int:
        return hash(hashlib.sha256(self._value.encode()).digest())

    def __reduce__(self) -> tuple[object, ...]:
        raise TypeError("a Secret cannot be pickled")

    def __reduce_ex__(self, protocol: object) -> tuple[object, ...]:
        raise TypeError("a Secret cannot be pickled")

    # Immutable, so copies may share it; without these, copy/deepcopy would hit the pickling refusal.
    def __copy__(self) -> Secret:
        return self

    def __deepcopy__(self, memo: object) -> Secret:
        return self


@dataclass(frozen=True, slots=True)
class Credentials:
    """One OKX API key. `key_hint` (last 4 characters of the key) is the only part safe to log."""

    api_key: Secret
    secret: Secret
    passphrase: Secret

    @property
    def key_hint(self) -> str:
        return "…" + self.api_key.reveal()[-4:]

    @property
    def key_id(self) -> str:
        """A stable, non-reversible id of the API key alone (rate-limit buckets are per key)."""
        return hashlib.sha256(b"okx-key-id\0" + self.api_key.reveal().encode()).hexdigest()[:16]

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


class UnsafeKeyError(CredentialError):
    """A key that must not be used at all (it can withdraw): the process stops with exit 2, at start-up as after
    a rotation, rather than carry on with a key it refused."""


#: Checks candidate credentials before the store hands them out; raises to refuse them.
Verifier = Callable[[Credentials], Awaitable[None]]


def _systemd_file(name: str, env: Mapping[str, str]) -> Path | None:
    directory = env.get(SYSTEMD_CREDENTIALS_DIR)
    if not directory:
        return None
    return Path(directory) / name.lower()


def credential_path(name: str, env: Mapping[str, str]) -> Path | None:
    """The file a credential is read from: `<NAME>_FILE` (relative to $CREDENTIALS_DIRECTORY), else systemd's."""
    file_var = f"{name}_FILE"
    given = env.get(file_var)
    if given is not None:
        path = Path(given)
        directory = env.get(SYSTEMD_CREDENTIALS_DIR)
        if not path.is_absolute() and directory:
            path = Path(directory) / path
        return path
    if name in env:
        return None
    candidate = _systemd_file(name, env)
    return candidate if candidate is not None and candidate.is_file() else None


def _check_value(value: str, where: str) -> str:
    value = value.strip()
    if not value:
        raise CredentialError(f"{where} is empty; put the credential from OKX's API key page in it")
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise CredentialError(
            f"{where} holds more than one line or control characters (a half-written or wrongly formatted "
            "file?); it must contain the credential alone"
        )
    return value


def _warn_if_shared(path: Path, where: str) -> None:
    """A secret file other users can read is a leak waiting to happen: say so (the value still works)."""
    mode = path.stat().st_mode
    if mode & 0o077:
        log.warning("credential_file_readable_by_others", extra={
            "file": where, "mode": oct(mode & 0o777),
            "fix": f"chmod 600 {path} (or 400; Kubernetes: defaultMode 0400 on the secret volume)"})


def _read_one(name: str, env: Mapping[str, str]) -> str:
    file_var = f"{name}_FILE"
    direct = env.get(name)
    if direct is not None and file_var in env:
        raise CredentialError(f"both {name} and {file_var} are set; set only one of them")
    path = credential_path(name, env)
    if path is not None:
        where = f"{file_var} ({path})" if file_var in env else f"${SYSTEMD_CREDENTIALS_DIR}/{path.name}"
        try:
            text = path.read_bytes().decode("utf-8-sig")  # "-sig": a BOM some editors write is no part of it
            _warn_if_shared(path, where)
        except OSError as exc:
            raise CredentialError(
                f"{where} cannot be read ({exc.strerror}); mount the secret there or fix the path"
            ) from None
        except UnicodeDecodeError:
            raise CredentialError(f"{where} is not UTF-8 text; it must contain the credential alone") from None
        return _check_value(text, where)
    if direct is None:
        raise CredentialError(
            f"{name} is not set; set it, or {file_var} to a file holding it, in the environment "
            f"(under systemd, LoadCredential={name.lower()}:<path> also works)"
        )
    if not direct.strip():
        raise CredentialError(f"{name} is set but empty; give it the value from OKX's API key page")
    return _check_value(direct, name)


def load_credentials(env: Mapping[str, str] | None = None) -> Credentials:
    """All three credentials from `env` (default: os.environ); CredentialError names the missing one."""
    env = os.environ if env is None else env
    key, secret, passphrase = (_read_one(n, env) for n in ENV_NAMES)
    return Credentials(Secret(key), Secret(secret), Secret(passphrase))


def credentials_present(env: Mapping[str, str] | None = None) -> bool:
    """True when any credential variable (or systemd credential file) is there: the operator meant to give a key."""
    env = os.environ if env is None else env
    return any(n in env or f"{n}_FILE" in env or credential_path(n, env) is not None for n in ENV_NAMES)


#: Words that mark an environment variable as a secret whatever program it is meant for.
_SECRET_WORDS = ("SECRET", "PASSWORD", "PASSWD", "PASSPHRASE", "TOKEN", "API_KEY", "APIKEY", "PRIVATE_KEY",
                 "CREDENTIAL", "SENTRY_DSN", "SASL", "AUTH")


def child_environment(environ: Mapping[str, str] | None = None, **extra: str) -> dict[str, str]:
    """The environment for a child process (the embedded broker, ...): the parent's minus every secret.

    A child needs none of OKX's credentials (nor where their files are, nor systemd's credentials directory),
    and anything it logs, dumps or passes on would carry them; `/proc/<pid>/environ` shows them to its user.
    """
    environ = os.environ if environ is None else environ
    out = {}
    for name, value in environ.items():
        upper = name.upper()
        if upper.startswith(("OKX_API_", "OKX_INGEST")) or upper == SYSTEMD_CREDENTIALS_DIR:
            continue
        if upper.removesuffix("_FILE") in SERVICE_SECRET_NAMES:  # Kafka / Schema Registry secrets and their files
            continue
        if any(word in upper for word in _SECRET_WORDS):
            continue
        out[name] = value
    out.update(extra)
    return out


@dataclass(frozen=True, slots=True)
class AuthStatus:
    """Authentication health for metrics and the health endpoint."""

    failures_total: int
    consecutive_failures: int
    paused_for_s: float
    last_code: str | None


class AuthFailureGuard:
    """Counts authentication failures and, past a threshold, pauses signed traffic for a growing interval.

    OKX may freeze or rate-limit a key (and an IP) that keeps failing authentication; a daemon restarted by
    its supervisor with a bad key must not turn into a brute-force loop. A success or a credential rotation
    resets the count.
    """

    def __init__(
        self,
        threshold: int = 3,
        initial_pause_s: float = 30.0,
        max_pause_s: float = 900.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        if threshold <= 0:
            raise ValueError("auth failure threshold must be > 0")
        self._threshold = threshold
        self._initial = initial_pause_s
        self._max = max_pause_s
        self._monotonic = monotonic
        self.failures_total = 0
        self.consecutive = 0
        self.last_code: str | None = None
        self._paused_until = 0.0
        self._pauses = full_jitter(initial_pause_s, max_pause_s, rand=lambda: 1.0)

    def record_failure(self, code: str, key_hint: str) -> float:
        """Count one failure; return the pause (seconds) now in force, 0.0 below the threshold."""
        self.failures_total += 1
        self.consecutive += 1
        self.last_code = code
        if self.consecutive < self._threshold:
            log.warning("okx_auth_failed", extra={"code": code, "key_hint": key_hint,
                                                  "consecutive_failures": self.consecutive})
            return 0.0
        pause = next(self._pauses)
        self._paused_until = self._monotonic() + pause
        log.critical(
            "okx_auth_paused",
            extra={"alert": True, "code": code, "key_hint": key_hint, "consecutive_failures": self.consecutive,
                   "pause_s": round(pause, 3),
                   "fix": "OKX keeps rejecting this API key: check the key, secret, passphrase, environment "
                          "(demo vs live), IP whitelist and clock; rotate the credential files or send SIGHUP"},
        )
        return pause

    def record_success(self) -> None:
        if self.consecutive:
            log.info("okx_auth_recovered", extra={"after_failures": self.consecutive})
        self.reset()

    def reset(self) -> None:
        self.consecutive = 0
        self._paused_until = 0.0
        self._pauses = full_jitter(self._initial, self._max, rand=lambda: 1.0)

    def pause_remaining(self) -> float:
        """Seconds signed traffic must still wait (0.0 when allowed)."""
        return max(0.0, self._paused_until - self._monotonic())

    def status(self) -> AuthStatus:
        return AuthStatus(self.failures_total, self.consecutive, self.pause_remaining(), self.last_code)


class AuthPausedError(CredentialError):
    """Signed traffic is paused after repeated authentication failures; retriable once the pause ends."""

    retriable = True

    def __init__(self, remaining_s: float, consecutive: int, last_code: str | None) -> None:
        self.remaining_s = remaining_s
        super().__init__(
            f"signed OKX requests are paused for {remaining_s:.1f} s after {consecutive} consecutive "
            f"authentication failures (last code {last_code}); fix or rotate the API key (files or SIGHUP)"
        )


class CredentialStore:
    """The current credentials of the process, re-read on demand (SIGHUP, a changed secret file).

    Connections and the REST client ask for `current()` each time they sign, so a rotation takes effect
    at the next login or request; `wait_changed` lets private connections re-login promptly.
    A failed re-read keeps the old credentials and logs an error, so a half-written secret file cannot
    take a running daemon down.
    """

    def __init__(self, env: Mapping[str, str] | None = None, *, auth_guard: AuthFailureGuard | None = None,
                 credentials: Credentials | None = None) -> None:
        self._env = env
        self._current = credentials if credentials is not None else load_credentials(env)
        self.version = 1
        self._changed = asyncio.Condition()
        self.auth = auth_guard or AuthFailureGuard()
        self.last_reload_error: CredentialError | None = None
        self.reload_failures_total = 0
        #: Set by the process (the key permission check); None accepts rotated credentials unchecked.
        self.verifier: Verifier | None = None
        self.rotations_refused_total = 0
        self._reloading = asyncio.Lock()

    @classmethod
    def from_settings(cls, okx: OkxSettings, env: Mapping[str, str] | None = None) -> CredentialStore:
        """The store with the auth-failure policy of `okx` (threshold and pause bounds)."""
        guard = AuthFailureGuard(okx.auth_failure_threshold, okx.auth_pause_initial_s, okx.auth_pause_max_s)
        return cls(env, auth_guard=guard)

    def current(self) -> Credentials:
        return self._current

    def _environ(self) -> Mapping[str, str]:
        return os.environ if self._env is None else self._env

    def watched_files(self) -> list[Path]:
        """The secret files in use (`*_FILE` variables and systemd credentials): what a watcher should poll."""
        env = self._environ()
        return [p for p in (credential_path(n, env) for n in ENV_NAMES) if p is not None]

    @classmethod
    def holding(cls, credentials: Credentials, okx: OkxSettings) -> CredentialStore:
        """A store of fixed credentials (candidate ones under verification), not read from the environment."""
        guard = AuthFailureGuard(okx.auth_failure_threshold, okx.auth_pause_initial_s, okx.auth_pause_max_s)
        return cls({}, auth_guard=guard, credentials=credentials)

    async def reload(self) -> bool:
        """Re-read; True when the credentials changed (and waiters were woken).

        Unreadable, empty or malformed new values keep the current credentials: the error is logged,
        kept in `last_reload_error` and counted, and False is returned. With a `verifier`, new values are
        checked before anything can use them: a refusal keeps the current credentials, alerts and counts
        (`rotations_refused_total`), and an `UnsafeKeyError` is raised on so the process stops (exit 2).
        """
        async with self._reloading:  # SIGHUP and the file watcher must not verify the same key twice at once
            return await self._reload()

    async def _reload(self) -> bool:
        try:
            fresh = load_credentials(self._env)
        except CredentialError as exc:
            self.last_reload_error = exc
            self.reload_failures_total += 1
            log.error("credentials_reload_failed", extra={"error": str(exc), "kept_key_hint": self._current.key_hint,
                                                          "version": self.version})
            return False
        self.last_reload_error = None
        if fresh.fingerprint() == self._current.fingerprint():
            return False
        if self.verifier is not None:
            try:
                await self.verifier(fresh)
            except IngestError as exc:
                self._refused(fresh, exc)
                if isinstance(exc, UnsafeKeyError):
                    raise
                return False
        key_changed = fresh.key_id != self._current.key_id
        self._current = fresh
        self.version += 1
        self.auth.reset()
        log.info("credentials_rotated", extra={"version": self.version, "key_hint": fresh.key_hint,
                                               "key_changed": key_changed})
        async with self._changed:
            self._changed.notify_all()
        return True

    def _refused(self, fresh: Credentials, exc: IngestError) -> None:
        self.rotations_refused_total += 1
        log.critical("credentials_rotation_refused", extra={
            "alert": True, "error": str(exc), "refused_key_hint": fresh.key_hint,
            "kept_key_hint": self._current.key_hint, "version": self.version,
            "fix": "the new credentials were not used: correct the files (key, secret and passphrase of one "
                   "read-only key), then they are checked again"})

    async def wait_changed(self, seen_version: int) -> int:
        """Return the new version once it differs from `seen_version`."""
        async with self._changed:
            await self._changed.wait_for(lambda: self.version != seen_version)
        return self.version

    def record_auth_failure(self, code: str) -> float:
        """OKX rejected the current key (REST 501xx or WS login error); returns the pause now in force."""
        return self.auth.record_failure(code, self._current.key_hint)

    def record_auth_success(self) -> None:
        self.auth.record_success()

    def check_auth_allowed(self) -> None:
        """Raise AuthPausedError while signed traffic is paused."""
        remaining = self.auth.pause_remaining()
        if remaining > 0:
            raise AuthPausedError(remaining, self.auth.consecutive, self.auth.last_code)


FileState = tuple[int, int, int, str] | None


def _file_state(path: Path) -> FileState:
    """(inode, mtime ns, size, content sha256) of a file, None when it is missing or unreadable."""
    try:
        st = path.stat()
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size, digest


class CredentialFileWatcher:
    """Polls the store's secret files and reloads when they changed and then stayed unchanged for one poll.

    Polling (inode, mtime, size and a content hash) catches every way secrets get replaced: in-place
    writes, renames, and Kubernetes' symlink swap of `..data`, which leaves the mtime of the visible
    path alone. Waiting for one quiet poll avoids reading a file while an operator is still writing it;
    a file that is empty or missing when read keeps the old credentials (see `CredentialStore.reload`).
    """

    def __init__(
        self,
        store: CredentialStore,
        interval_s: float = 5.0,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._store = store
        self._interval = interval_s
        self._sleep = sleep
        self._applied = self._snapshot()
        self._last_seen = self._applied

    def _snapshot(self) -> dict[Path, FileState]:
        return {p: _file_state(p) for p in self._store.watched_files()}

    async def poll_once(self) -> bool:
        """One poll; True when it reloaded changed credentials."""
        seen = self._snapshot()
        settled = seen == self._last_seen
        self._last_seen = seen
        if seen == self._applied or not settled:
            return False
        # Mark as handled even if the reload fails, so a bad file is reported once, not every poll.
        self._applied = seen
        return await self._store.reload()

    async def run(self) -> None:
        """Poll until cancelled (owned by the supervisor's TaskGroup)."""
        if not self._applied:
            return
        while True:
            await self._sleep(self._interval)
            await self.poll_once()


# -- secrets of other services (Kafka SASL, TLS key, OAuth, Schema Registry) -------------------------------

#: Every secret besides the OKX key that the process may read, each from `<NAME>` or `<NAME>_FILE` exactly like
#: the OKX credentials (and so from systemd credentials too). Read at each connection, so a rotated file is used
#: from the next connection on; every value read is registered with the log redactor before it is returned.
SERVICE_SECRET_NAMES = ("KAFKA_SASL_USERNAME", "KAFKA_SASL_PASSWORD", "KAFKA_SSL_KEY_PASSWORD",
                        "KAFKA_OAUTH_CLIENT_SECRET", "SCHEMA_REGISTRY_PASSWORD", "SCHEMA_REGISTRY_TOKEN",
                        "SCHEMA_REGISTRY_SSL_KEY_PASSWORD")


def secret_present(name: str, env: Mapping[str, str] | None = None) -> bool:
    """True when `name` is given in any of its forms (variable, `_FILE`, systemd credential)."""
    env = os.environ if env is None else env
    return name in env or f"{name}_FILE" in env or credential_path(name, env) is not None


def read_secret(name: str, env: Mapping[str, str] | None = None) -> Secret:
    """The current value of `name` (variable or `_FILE`); CredentialError names the variable and the fix."""
    value = _read_one(name, os.environ if env is None else env)
    REDACTOR.set_secrets([value])
    return Secret(value)


def read_optional_secret(name: str, env: Mapping[str, str] | None = None) -> Secret | None:
    """`read_secret`, or None when the secret is not given at all (a given but unreadable one still raises)."""
    return read_secret(name, env) if secret_present(name, env) else None
