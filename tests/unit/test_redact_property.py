"""Property: whatever characters a secret holds and however a writer encodes it, no line carries it.

Each writer below is a real way a secret reaches a log line (a JSON line's escaping, a dict's repr in a text
line, a URL, base64, hex, bytes, a traceback, a frame logged inside a JSON line); each check decodes the finished
line back the way a reader of the log would, and looks for the secret there. The encodings are produced by the
libraries themselves, not by the redactor's list of them, so a form the redactor misses fails the test.
"""

from __future__ import annotations

import ast
import base64
import binascii
import contextlib
import io
import json
import logging
from collections.abc import Callable
from urllib.parse import quote, quote_plus, unquote, unquote_plus

from hypothesis import given, settings
from hypothesis import strategies as st
from websockets.frames import Frame, Opcode

from ingest.obs.logging import JsonFormatter, TextFormatter
from ingest.obs.redact import Redactor

#: Letters and digits plus what escaping trips over: quotes, backslash, and non-ASCII (accents, CJK, emoji).
ALPHABET = st.sampled_from([*list("abcXYZ019"), '"', "\\", "'", "é", "ß", "€", "中", "😀", " ", "%", "+", "/", "="])
SECRETS = st.text(ALPHABET, min_size=6, max_size=24).map(lambda s: "Qk7" + s)  # "Qk7": never a word of the line

Writer = Callable[[logging.Logger, str], None]


def _line(secret: str, fmt: str, write: Writer) -> str:
    redactor = Redactor()
    redactor.set_secrets([secret])
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter(redactor) if fmt == "json" else TextFormatter(redactor))
    log = logging.getLogger(f"redact-property-{fmt}")
    log.propagate = False
    log.handlers = [handler]
    log.setLevel(logging.DEBUG)
    try:
        write(log, secret)
    finally:
        log.handlers = []
    return out.getvalue()


def _strings(obj: object) -> list[str]:
    if isinstance(obj, str):
        return [obj]
    if isinstance(obj, dict):
        return [s for v in obj.values() for s in _strings(v)]
    if isinstance(obj, list):
        return [s for v in obj for s in _strings(v)]
    return []


def _json_values(line: str) -> list[str]:
    """Every string value of a JSON log line, and of JSON text inside it (a logged frame), decoded."""
    values = _strings(json.loads(line))
    for v in list(values):
        with contextlib.suppress(ValueError):
            values += _strings(json.loads(v[v.index("{"):] if "{" in v else v))
    return values


def _b64(text: str) -> str:
    for decode in (base64.b64decode, base64.urlsafe_b64decode):
        try:
            return decode(text + "=" * (-len(text) % 4)).decode("utf-8", "replace")
        except (binascii.Error, ValueError):
            continue
    return ""


def _hex(text: str) -> str:
    try:
        return bytes.fromhex(text).decode("utf-8", "replace")
    except ValueError:
        return ""


def _literal(text: str) -> str:
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return ""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return "\n".join(_strings(value))


def _websockets_frame(log: logging.Logger, secret: str) -> None:
    """A login-like frame as websockets logs it at DEBUG with a raised WEBSOCKETS_MAX_LOG_SIZE: its repr."""
    frame = Frame(Opcode.TEXT, json.dumps({"op": "login", "args": [{"note": secret}]}).encode())
    saved = Frame.MAX_LOG_SIZE
    Frame.MAX_LOG_SIZE = 10_000
    try:
        log.debug("> %s", frame)
    finally:
        Frame.MAX_LOG_SIZE = saved


def _frame_values(line: str) -> list[str]:
    out: list[str] = []
    for v in _json_values(line):
        if v.startswith("> TEXT "):
            text = _literal(v.removeprefix("> TEXT ").rsplit(" [", 1)[0])
            with contextlib.suppress(ValueError):
                out += _strings(json.loads(text))
            out.append(text)
    return out


CASES: dict[str, tuple[str, Writer, Callable[[str], list[str]]]] = {
    "json field": ("json", lambda log, s: log.info("ev", extra={"f": s}), _json_values),
    "json message": ("json", lambda log, s: log.info("login with %s", s), _json_values),
    "json nested field": ("json", lambda log, s: log.info("ev", extra={"f": {"k": [s]}}), _json_values),
    "frame inside a json line": ("json", lambda log, s: log.debug("> TEXT %s", json.dumps({"op": "login", "x": s})),
                                 _json_values),
    "frame (no ASCII escaping) in a json field": (
        "json", lambda log, s: log.info("ev", extra={"frame": json.dumps({"x": s}, ensure_ascii=False)}),
        _json_values),
    "repr in a text line": ("text", lambda log, s: log.info("ev", extra={"d": {"k": s}}),
                            lambda line: [_literal(line.split("d=", 1)[1].strip())]),
    "repr in a json line": ("json", lambda log, s: log.info("ev", extra={"d": repr({"k": s})}),
                            lambda line: [_literal(v) for v in _json_values(line)]),
    "bytes in a json line": ("json", lambda log, s: log.info("ev", extra={"b": s.encode()}),
                             lambda line: [_literal(v) for v in _json_values(line)]),
    "exception message": ("json", lambda log, s: _log_exception(log, s),
                          lambda line: [*_json_values(line), *(_literal(v.rsplit(": ", 1)[-1])
                                                               for v in _json_values(line))]),
    "url-encoded in a url": ("text", lambda log, s: log.info("GET /api?p=%s&q=%s", quote(s, safe=""), quote_plus(s)),
                             lambda line: [unquote(line), unquote_plus(line)]),
    "url-encoded in a json line": ("json", lambda log, s: log.info("ev", extra={"url": "/x?p=" + quote(s)}),
                                   lambda line: [unquote(v) for v in _json_values(line)]),
    "base64": ("json", lambda log, s: log.info("ev", extra={"a": base64.b64encode(s.encode()).decode(),
                                                             "u": base64.urlsafe_b64encode(s.encode()).decode()}),
               lambda line: [_b64(v) for v in _json_values(line)]),
    "websockets frame in a json line": ("json", _websockets_frame, _frame_values),
    "hex bytes apart": ("json", lambda log, s: log.debug("< BINARY %s", s.encode().hex(" ")),
                        lambda line: [_hex(v.removeprefix("< BINARY ").replace(" ", ""))
                                      for v in _json_values(line)]),
    "hex": ("text", lambda log, s: log.info("ev", extra={"h": s.encode().hex(), "H": s.encode().hex().upper()}),
            lambda line: [_hex(part.split("=", 1)[1]) for part in line.split() if part[:2] in ("h=", "H=")]),
}


def _log_exception(log: logging.Logger, secret: str) -> None:
    try:
        raise RuntimeError(repr(secret))
    except RuntimeError:
        log.exception("failed")


@settings(max_examples=200, deadline=None)
@given(secret=SECRETS, case=st.sampled_from(sorted(CASES)))
def test_no_encoding_of_a_secret_survives_in_a_log_line(secret: str, case: str) -> None:
    fmt, write, decode = CASES[case]
    line = _line(secret, fmt, write)
    assert "***" in line  # the writer did carry the secret, and it was masked
    for text in decode(line.strip()):
        assert secret not in text, case


def test_every_case_carries_the_secret_without_the_redactor() -> None:
    """The writers and decoders are sound: with nothing registered, each decoded line shows the secret."""
    secret = "Qk7\"quo'te\\back é€😀 +/="
    for case, (fmt, write, decode) in CASES.items():
        out = io.StringIO()
        handler = logging.StreamHandler(out)
        handler.setFormatter(JsonFormatter(Redactor()) if fmt == "json" else TextFormatter(Redactor()))
        log = logging.getLogger(f"redact-control-{case}")
        log.propagate, log.handlers = False, [handler]
        log.setLevel(logging.DEBUG)
        write(log, secret)
        log.handlers = []
        assert any(secret in text for text in decode(out.getvalue().strip())), case
