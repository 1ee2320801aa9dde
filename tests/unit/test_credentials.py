"""Credentials: only from the environment or secret files, never visible, rotated without a restart, and a
bad key pauses signed traffic instead of hammering OKX."""

from __future__ import annotations

import asyncio
import copy
import io
import logging
import os
import pickle
import secrets
from pathlib import Path

import pytest

from ingest.config import OkxSettings
from ingest.credentials import (
    ENV_NAMES,
    AuthFailureGuard,
    AuthPausedError,
    CredentialFileWatcher,
    Credentials,
    CredentialStore,
    Secret,
    UnsafeKeyError,
    credentials_present,
    load_credentials,
)
from ingest.errors import CredentialError


def _values() -> dict[str, str]:
    return {"OKX_API_KEY": secrets.token_hex(16), "OKX_API_SECRET": secrets.token_hex(16),
            "OKX_API_PASSPHRASE": secrets.token_hex(8)}


def _write_files(directory: Path, values: dict[str, str]) -> dict[str, str]:
    """Secret files as a Kubernetes volume would hold them; returns the *_FILE environment."""
    env = {}
    for name, value in values.items():
        path = directory / name.lower()
        path.write_text(value + "\n")
        env[f"{name}_FILE"] = str(path)
    return env


def _put(path: str, text: str) -> None:
    Path(path).write_text(text)


def _remove(path: str) -> None:
    Path(path).unlink()


class FakeMonotonic:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# ---------------------------------------------------------------------------------------------- loading


def test_credentials_come_from_the_environment() -> None:
    values = _values()
    creds = load_credentials(values)
    assert creds.values() == (values["OKX_API_KEY"], values["OKX_API_SECRET"], values["OKX_API_PASSPHRASE"])
    assert creds.key_hint == "…" + values["OKX_API_KEY"][-4:]


def test_credentials_come_from_files_named_by_file_variables(tmp_path: Path) -> None:
    values = _values()
    creds = load_credentials(_write_files(tmp_path, values))
    assert creds.api_key.reveal() == values["OKX_API_KEY"]  # trailing newline stripped


@pytest.mark.parametrize("missing", ENV_NAMES)
def test_a_missing_credential_is_a_startup_error_naming_the_variable(missing: str) -> None:
    env = _values()
    del env[missing]
    with pytest.raises(CredentialError, match=f"{missing} is not set.*{missing}_FILE"):
        load_credentials(env)


@pytest.mark.parametrize("empty", ENV_NAMES)
def test_an_empty_credential_is_an_error_naming_the_variable(empty: str) -> None:
    env = _values() | {empty: "  "}
    with pytest.raises(CredentialError, match=f"{empty} is set but empty"):
        load_credentials(env)


def test_setting_both_the_variable_and_its_file_is_an_error(tmp_path: Path) -> None:
    env = _values() | {"OKX_API_SECRET_FILE": str(tmp_path / "x")}
    with pytest.raises(CredentialError, match="both OKX_API_SECRET and OKX_API_SECRET_FILE"):
        load_credentials(env)


def test_unreadable_and_empty_files_are_errors_naming_the_variable_and_path(tmp_path: Path) -> None:
    env = _write_files(tmp_path, _values())
    missing = env | {"OKX_API_KEY_FILE": str(tmp_path / "nope")}
    with pytest.raises(CredentialError, match=r"OKX_API_KEY_FILE \(.*nope\) cannot be read"):
        load_credentials(missing)
    _put(env["OKX_API_PASSPHRASE_FILE"], "\n")
    with pytest.raises(CredentialError, match=r"OKX_API_PASSPHRASE_FILE .* is empty"):
        load_credentials(env)


def test_a_file_with_two_lines_is_refused(tmp_path: Path) -> None:
    env = _write_files(tmp_path, _values())
    _put(env["OKX_API_SECRET_FILE"], f"{secrets.token_hex(8)}\n{secrets.token_hex(8)}\n")
    with pytest.raises(CredentialError, match=r"OKX_API_SECRET_FILE .* more than one line"):
        load_credentials(env)


def test_systemd_credentials_directory_is_used_for_relative_paths_and_by_default(tmp_path: Path) -> None:
    values = _values()
    _write_files(tmp_path, values)
    relative = {"CREDENTIALS_DIRECTORY": str(tmp_path), "OKX_API_KEY_FILE": "okx_api_key",
                "OKX_API_SECRET_FILE": "okx_api_secret", "OKX_API_PASSPHRASE_FILE": "okx_api_passphrase"}
    assert load_credentials(relative).values()[0] == values["OKX_API_KEY"]
    # LoadCredential=okx_api_key:... alone: nothing else to configure.
    implicit = {"CREDENTIALS_DIRECTORY": str(tmp_path)}
    assert load_credentials(implicit).values()[2] == values["OKX_API_PASSPHRASE"]
    assert credentials_present(implicit)
    assert not credentials_present({"CREDENTIALS_DIRECTORY": str(tmp_path / "empty")})
    # %d in a unit file expands to the absolute directory, which works as any absolute path.
    absolute = {f"{n}_FILE": str(tmp_path / n.lower()) for n in ENV_NAMES}
    assert load_credentials(absolute).values() == load_credentials(implicit).values()


def test_systemd_error_mentions_load_credential() -> None:
    with pytest.raises(CredentialError, match="LoadCredential=okx_api_key"):
        load_credentials({})


# ----------------------------------------------------------------------------------------- never shown


def _leak_surfaces(creds: Credentials, exc_text: str, log_text: str) -> list[str]:
    return [repr(creds), str(creds), f"{creds}", f"{creds.secret}", f"{creds.secret!r}", f"{creds.secret:>40}",
            "%s %r" % (creds.passphrase, creds.api_key), "{}".format(creds.secret),  # noqa: UP031, UP032
            str([creds.secret]),
            str({"k": creds.api_key}), exc_text, log_text]


def test_secret_values_never_appear_in_repr_str_format_logs_or_exceptions() -> None:
    creds = load_credentials(_values())
    try:
        raise CredentialError(f"bad key {creds.api_key} with {creds.secret!r}")
    except CredentialError as exc:
        exc_text = str(exc) + repr(exc)
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(message)s %(creds)s"))
    logger = logging.getLogger("test.credentials.leak")
    logger.addHandler(handler)
    try:
        logger.warning("secret=%s passphrase=%r", creds.secret, creds.passphrase, extra={"creds": creds})
    finally:
        logger.removeHandler(handler)
    for text in _leak_surfaces(creds, exc_text, stream.getvalue()):
        for value in creds.values():
            assert value not in text
    assert "***" in stream.getvalue()


def test_secrets_refuse_pickling_but_copy_as_themselves() -> None:
    creds = load_credentials(_values())
    for obj in (creds.secret, creds):
        with pytest.raises(TypeError, match="cannot be pickled"):
            pickle.dumps(obj)
    assert copy.copy(creds.secret) is creds.secret
    assert copy.deepcopy(creds).secret == creds.secret


def test_secret_equality_and_hash_do_not_need_the_value_shown() -> None:
    value = secrets.token_hex(8)
    assert Secret(value) == Secret(value) and Secret(value) != Secret(value + "x")
    assert hash(Secret(value)) == hash(Secret(value))
    assert Secret(value) != value


def test_fingerprint_and_key_id_reveal_nothing() -> None:
    creds = load_credentials(_values())
    for derived in (creds.fingerprint(), creds.key_id, creds.key_hint):
        for value in creds.values():
            assert value not in derived or (derived == creds.key_hint and len(derived) == 5)


# -------------------------------------------------------------------------------------------- rotation


async def test_reload_picks_up_rotated_files_and_wakes_waiters(tmp_path: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    env = _write_files(tmp_path, _values())
    store = CredentialStore(env)
    old = store.current()
    waiter = asyncio.create_task(store.wait_changed(store.version))
    new_values = _values()
    _write_files(tmp_path, new_values)
    with caplog.at_level(logging.INFO, logger="ingest.credentials"):
        assert await store.reload() is True
    assert await waiter == 2
    assert store.current().api_key.reveal() == new_values["OKX_API_KEY"]
    assert store.current() != old
    assert await store.reload() is False  # unchanged
    rotated = [r for r in caplog.records if r.getMessage() == "credentials_rotated"]
    assert len(rotated) == 1 and rotated[0].__dict__["key_changed"] is True
    for value in (*old.values(), *store.current().values()):
        assert value not in caplog.text


async def test_a_half_written_or_missing_file_keeps_the_old_credentials(tmp_path: Path,
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    values = _values()
    env = _write_files(tmp_path, values)
    store = CredentialStore(env)
    _put(env["OKX_API_SECRET_FILE"], "")  # truncated by an editor, not yet written
    with caplog.at_level(logging.ERROR, logger="ingest.credentials"):
        assert await store.reload() is False
    assert store.current().secret.reveal() == values["OKX_API_SECRET"]
    assert store.version == 1
    assert store.last_reload_error is not None and "OKX_API_SECRET_FILE" in str(store.last_reload_error)
    _remove(env["OKX_API_KEY_FILE"])
    assert await store.reload() is False
    assert store.current().api_key.reveal() == values["OKX_API_KEY"]
    assert store.reload_failures_total == 2
    failures = [r for r in caplog.records if r.getMessage() == "credentials_reload_failed"]
    assert failures and "OKX_API_SECRET_FILE" in failures[0].__dict__["error"]
    for value in values.values():
        assert value not in caplog.text


async def test_watcher_reloads_a_changed_file_once_it_has_settled(tmp_path: Path) -> None:
    env = _write_files(tmp_path, _values())
    store = CredentialStore(env)
    watcher = CredentialFileWatcher(store, interval_s=1.0)
    assert store.watched_files() == [Path(env[f"{n}_FILE"]) for n in ENV_NAMES]
    assert await watcher.poll_once() is False  # nothing changed
    new_secret = secrets.token_hex(16)
    _put(env["OKX_API_SECRET_FILE"], new_secret)
    assert await watcher.poll_once() is False  # changed in this interval: maybe still being written
    assert await watcher.poll_once() is True  # unchanged since: read it
    assert store.current().secret.reveal() == new_secret and store.version == 2
    assert await watcher.poll_once() is False


async def test_watcher_sees_a_kubernetes_style_symlink_swap(tmp_path: Path) -> None:
    first, second = tmp_path / "..2024_01", tmp_path / "..2024_02"
    first.mkdir()
    second.mkdir()
    _write_files(first, _values())
    new_values = _values()
    _write_files(second, new_values)
    data = tmp_path / "..data"
    data.symlink_to(first.name)
    env = {}
    for n in ENV_NAMES:
        (tmp_path / n.lower()).symlink_to(Path("..data") / n.lower())
        env[f"{n}_FILE"] = str(tmp_path / n.lower())
    store = CredentialStore(env)
    watcher = CredentialFileWatcher(store)
    tmp_link = tmp_path / "..data_tmp"
    tmp_link.symlink_to(second.name)
    os.replace(tmp_link, data)  # the atomic swap kubelet does
    await watcher.poll_once()
    assert await watcher.poll_once() is True
    assert store.current().api_key.reveal() == new_values["OKX_API_KEY"]


async def test_watcher_reports_a_broken_file_once_and_recovers_when_it_is_fixed(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    values = _values()
    env = _write_files(tmp_path, values)
    store = CredentialStore(env)
    watcher = CredentialFileWatcher(store)
    _put(env["OKX_API_PASSPHRASE_FILE"], "")
    with caplog.at_level(logging.ERROR, logger="ingest.credentials"):
        for _ in range(4):
            assert await watcher.poll_once() is False
    assert len([r for r in caplog.records if r.getMessage() == "credentials_reload_failed"]) == 1
    assert store.current().passphrase.reveal() == values["OKX_API_PASSPHRASE"]
    fixed = secrets.token_hex(8)
    _put(env["OKX_API_PASSPHRASE_FILE"], fixed)
    await watcher.poll_once()
    assert await watcher.poll_once() is True
    assert store.current().passphrase.reveal() == fixed


async def test_watcher_run_polls_on_its_interval_until_cancelled(tmp_path: Path) -> None:
    env = _write_files(tmp_path, _values())
    store = CredentialStore(env)
    new_key = secrets.token_hex(16)
    sleeps: list[float] = []
    done = asyncio.Event()

    async def fake_sleep(seconds: float) -> None:
        sleeps.append(seconds)
        if len(sleeps) == 1:
            _put(env["OKX_API_KEY_FILE"], new_key)
        if store.version == 2:
            done.set()
            await asyncio.Event().wait()  # park until cancelled

    watcher = CredentialFileWatcher(store, interval_s=3.0, sleep=fake_sleep)
    task = asyncio.create_task(watcher.run())
    await done.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert store.current().api_key.reveal() == new_key
    assert set(sleeps) == {3.0}


# ------------------------------------------------------------------------------------- auth failures


def test_auth_failures_below_the_threshold_do_not_pause() -> None:
    clock = FakeMonotonic()
    guard = AuthFailureGuard(threshold=3, initial_pause_s=10, max_pause_s=40, monotonic=clock)
    assert guard.record_failure("50113", "…abcd") == 0.0
    assert guard.record_failure("50113", "…abcd") == 0.0
    assert guard.pause_remaining() == 0.0
    assert guard.status().failures_total == 2


def test_repeated_auth_failures_pause_for_a_growing_capped_interval_with_an_alert(
        caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeMonotonic()
    guard = AuthFailureGuard(threshold=2, initial_pause_s=10, max_pause_s=25, monotonic=clock)
    guard.record_failure("50111", "…abcd")
    with caplog.at_level(logging.WARNING, logger="ingest.credentials"):
        pauses = [guard.record_failure("50111", "…abcd") for _ in range(4)]
    assert pauses == [10.0, 20.0, 25.0, 25.0]
    assert guard.pause_remaining() == 25.0
    clock.now += 25.0
    assert guard.pause_remaining() == 0.0
    alerts = [r for r in caplog.records if r.getMessage() == "okx_auth_paused"]
    assert alerts and alerts[0].levelno == logging.CRITICAL and alerts[0].__dict__["alert"] is True


def test_success_resets_the_auth_failure_count() -> None:
    guard = AuthFailureGuard(threshold=1, initial_pause_s=10, max_pause_s=100, monotonic=FakeMonotonic())
    assert guard.record_failure("50113", "…abcd") == 10.0
    guard.record_success()
    assert guard.pause_remaining() == 0.0 and guard.consecutive == 0
    assert guard.record_failure("50113", "…abcd") == 10.0  # the pause starts small again
    assert guard.failures_total == 2


async def test_store_refuses_signed_traffic_while_paused_and_rotation_lifts_the_pause(tmp_path: Path) -> None:
    env = _write_files(tmp_path, _values())
    clock = FakeMonotonic()
    store = CredentialStore(env, auth_guard=AuthFailureGuard(threshold=1, initial_pause_s=30, monotonic=clock))
    store.check_auth_allowed()
    store.record_auth_failure("50111")
    with pytest.raises(AuthPausedError, match=r"paused for 30\.0 s after 1 consecutive") as info:
        store.check_auth_allowed()
    assert info.value.retriable
    _write_files(tmp_path, _values())
    assert await store.reload() is True
    store.check_auth_allowed()  # a new key gets a fresh chance


def test_store_takes_its_auth_failure_policy_from_settings() -> None:
    okx = OkxSettings(auth_failure_threshold=1, auth_pause_initial_s=7, auth_pause_max_s=8)
    store = CredentialStore.from_settings(okx, _values())
    assert store.record_auth_failure("50113") == 7.0
    assert store.record_auth_failure("50113") == 8.0


def test_a_utf8_bom_in_a_credential_file_is_not_part_of_the_value(tmp_path: Path) -> None:
    values = _values()
    env = _write_files(tmp_path, values)
    path = Path(env["OKX_API_PASSPHRASE_FILE"])
    path.write_bytes(b"\xef\xbb\xbf" + values["OKX_API_PASSPHRASE"].encode() + b"\n")
    assert load_credentials(env).passphrase.reveal() == values["OKX_API_PASSPHRASE"]


def test_a_credential_file_readable_by_group_or_others_gets_a_warning_naming_the_fix(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    env = _write_files(tmp_path, _values())
    for name in ENV_NAMES:
        os.chmod(env[f"{name}_FILE"], 0o600)
    with caplog.at_level(logging.WARNING, logger="ingest.credentials"):
        load_credentials(env)
        assert not [r for r in caplog.records if r.getMessage() == "credential_file_readable_by_others"]
        os.chmod(env["OKX_API_SECRET_FILE"], 0o644)
        load_credentials(env)
    [warning] = [r for r in caplog.records if r.getMessage() == "credential_file_readable_by_others"]
    assert "OKX_API_SECRET_FILE" in warning.__dict__["file"] and warning.__dict__["mode"] == "0o644"
    assert "chmod 600" in warning.__dict__["fix"]


async def test_a_rotation_the_verifier_refuses_keeps_the_old_key_and_an_unsafe_key_is_raised_on(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    old = _values()
    env = _write_files(tmp_path, old)
    store = CredentialStore(env)
    checked: list[str] = []

    async def verifier(candidate: Credentials) -> None:
        checked.append(candidate.api_key.reveal())
        assert store.current().api_key.reveal() == old["OKX_API_KEY"], "the candidate is not in use while checked"
        if candidate.passphrase.reveal() == "wrong-passphrase":
            raise CredentialError("OKX error 50105: passphrase incorrect")
        if candidate.api_key.reveal().startswith("withdraw"):
            raise UnsafeKeyError("the API key can withdraw funds")

    store.verifier = verifier
    _write_files(tmp_path, {**old, "OKX_API_PASSPHRASE": "wrong-passphrase"})
    with caplog.at_level(logging.INFO, logger="ingest.credentials"):
        assert await store.reload() is False
    assert store.current().passphrase.reveal() == old["OKX_API_PASSPHRASE"] and store.version == 1
    assert store.rotations_refused_total == 1
    [alert] = [r for r in caplog.records if r.getMessage() == "credentials_rotation_refused"]
    assert alert.levelno == logging.CRITICAL and "50105" in alert.__dict__["error"]

    _write_files(tmp_path, {**_values(), "OKX_API_KEY": "withdraw" + secrets.token_hex(8)})
    with pytest.raises(UnsafeKeyError):
        await store.reload()
    assert store.current().api_key.reveal() == old["OKX_API_KEY"] and store.rotations_refused_total == 2

    good = _values()
    _write_files(tmp_path, good)
    assert await store.reload() is True
    assert store.current().api_key.reveal() == good["OKX_API_KEY"] and store.version == 2
    assert len(checked) == 3
