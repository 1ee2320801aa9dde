"""Structured logs: one line per event, an event name plus fields, never a secret.

Call sites use stdlib logging with the event name as the message and fields in `extra`
(`log.info("ws_state", extra={"conn": c, "to": "live"})`), so libraries' own logs (aiokafka,
websockets, httpx) come out in the same format and through the same redactor.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from types import TracebackType
from typing import Any, Literal, TextIO

import orjson

from ingest.obs.redact import REDACTOR, Redactor

_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime", "taskName"}


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD and not k.startswith("_")}


def _iso_ms(created: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{int(created * 1000) % 1000:03d}Z"


class _RedactingFormatter(logging.Formatter):
    """Formats, then masks secrets in the finished line (message, fields and traceback alike)."""

    def __init__(self, redactor: Redactor) -> None:
        super().__init__()
        self.redactor = redactor

    def format(self, record: logging.LogRecord) -> str:
        return self.redactor.scrub(self.render(record))

    def render(self, record: logging.LogRecord) -> str:
        raise NotImplementedError


class JsonFormatter(_RedactingFormatter):
    """One JSON object per line: ts, level, logger, event, fields..., exc."""

    def render(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": _iso_ms(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        out.update(_fields(record))
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(out, default=str).decode()


class TextFormatter(_RedactingFormatter):
    """Human-readable: `ts level logger event k=v ...`, for terminals and `make demo`."""

    def render(self, record: logging.LogRecord) -> str:
        fields = " ".join(f"{k}={v}" for k, v in _fields(record).items())
        line = f"{_iso_ms(record.created)} {record.levelname:<7} {record.name} {record.getMessage()}"
        if fields:
            line = f"{line} {fields}"
        if record.exc_info:
            line = f"{line}\n{self.formatException(record.exc_info)}"
        return line


def setup_logging(
    level: str = "INFO",
    fmt: Literal["json", "text"] = "json",
    stream: TextIO | None = None,
    redactor: Redactor = REDACTOR,
) -> logging.Handler:
    """Route every logger (ours and libraries') through one redacting handler; returns it."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter(redactor) if fmt == "json" else TextFormatter(redactor))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # Libraries are chatty at DEBUG (aiokafka logs every fetch); keep them one notch quieter unless asked
    # (and, when asked, undo an earlier call's quieting: setting up again must give the level requested).
    for noisy in ("aiokafka", "kafka", "websockets", "httpx", "httpcore", "aiohttp.access"):
        logging.getLogger(noisy).setLevel(
            logging.NOTSET if level == "DEBUG" else max(logging.getLevelName(level), logging.WARNING))
    logging.captureWarnings(True)
    # A crash's traceback goes through the same redacting handler instead of raw to stderr.
    sys.excepthook = _log_crash
    threading.excepthook = _log_thread_crash
    return handler


def _log_crash(exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
    logging.getLogger("ingest.crash").critical("unhandled_exception", exc_info=(exc_type, exc, tb))


def _log_thread_crash(args: threading.ExceptHookArgs) -> None:
    if args.exc_value is None or args.exc_type is SystemExit:
        return
    logging.getLogger("ingest.crash").critical(
        "unhandled_thread_exception", exc_info=(args.exc_type, args.exc_value, args.exc_traceback),
        extra={"thread_name": args.thread.name if args.thread is not None else None})
