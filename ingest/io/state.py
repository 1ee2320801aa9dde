"""The per-shard stream state file: where each stream stood, so a restart reports the time it was down.

Written atomically (temporary file, fsync, rename) at shutdown and every few seconds while running, so a
SIGKILL costs at most the positions since the last save (the restart then reports a slightly longer gap;
the backfill worker's read-back drops what was already recorded). A missing file is a first start; an
unreadable one is logged and treated as a first start, never a reason not to record.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import orjson

from ingest.core.gaps import StreamCheckpoint

log = logging.getLogger(__name__)

FORMAT_VERSION = 1


@dataclass(frozen=True, slots=True)
class SavedState:
    """A previous process's streams, when it saved them, and when its private streams last received data."""

    saved_ts_ns: int
    streams: tuple[StreamCheckpoint, ...]
    private_last_ns: int | None = None


class StreamStateFile:
    """The state file of one shard (beside its journal directory, which tolerates no foreign files)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> SavedState | None:
        try:
            data = orjson.loads(self.path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, orjson.JSONDecodeError) as exc:
            log.error("stream_state_unreadable", extra={"path": str(self.path), "error": str(exc),
                                                        "effect": "the time this shard was down is not reported"})
            return None
        try:
            if data.get("version") != FORMAT_VERSION:
                raise ValueError(f"unknown version {data.get('version')!r}")
            streams = tuple(StreamCheckpoint.from_json(s) for s in data["streams"])
            return SavedState(int(data["saved_ts_ns"]), streams, data.get("private_last_ns"))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            log.error("stream_state_unreadable", extra={"path": str(self.path), "error": repr(exc),
                                                        "effect": "the time this shard was down is not reported"})
            return None

    def save(self, saved_ts_ns: int, streams: Sequence[StreamCheckpoint], private_last_ns: int | None) -> None:
        """Replace the file atomically; an I/O error is logged (the next save retries), never raised.

        A stream whose state JSON cannot hold (an integer beyond 64 bits) is left out with an error log, so one
        bad value costs that stream's restart gap, not every stream's save and the shutdown after it."""
        head = {"version": FORMAT_VERSION, "saved_ts_ns": saved_ts_ns, "private_last_ns": private_last_ns}
        try:
            body = orjson.dumps({**head, "streams": [s.to_json() for s in streams]})
        except TypeError:
            body = orjson.dumps({**head, "streams": [f for f in map(_stream_json, streams) if f is not None]})
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(body)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except OSError as exc:
            log.error("stream_state_not_saved", extra={"path": str(self.path), "error": str(exc)})


def _stream_json(cp: StreamCheckpoint) -> orjson.Fragment | None:
    """One stream's JSON, or None (logged) when a value does not fit JSON's 64-bit integers."""
    try:
        return orjson.Fragment(orjson.dumps(cp.to_json()))
    except TypeError as exc:
        log.error("stream_state_skipped", extra={"arg": str(cp.arg), "error": str(exc),
                                                 "effect": "a restart does not report this stream's downtime"})
        return None
