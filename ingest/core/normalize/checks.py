"""The reference validator's building blocks: failures (`_Invalid`, a dead letter's code, path and text), the
checks of one OKX value, and `_Spec`, how the rows of one record type are checked and built."""

from __future__ import annotations

import enum
import math
import re
from collections.abc import Mapping, Sequence
from decimal import Decimal
from typing import Any, NoReturn, TypeVar

import msgspec

from ingest.core.records import (
    Balance,
    DeadLetterReason,
    OkxRecord,
    Source,
)


class _Invalid(Exception):
    """A validation failure inside the normalizer; becomes a DeadLetter, never leaves this module."""

    def __init__(self, code: DeadLetterReason, path: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.path = path
        self.message = message

    def under(self, prefix: str) -> _Invalid:
        """The same failure, located inside `prefix` (paths are built only when something fails)."""
        self.path = f"{prefix}.{self.path}" if self.path and not self.path.startswith("[") else prefix + self.path
        return self

    @property
    def reason(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


_MISSING: Any = object()
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
# Plain decimal notation, ASCII digits only (`\d` would admit other scripts' digits). The integer part is
# bounded so float(s) stays finite too.
_PLAIN_DECIMAL = re.compile(r"-?[0-9]{1,300}(?:\.[0-9]+)?").fullmatch
_EXP_DECIMAL = re.compile(r"-?[0-9]+(?:\.[0-9]+)?[eE][+-]?[0-9]{1,5}").fullmatch
_INTEGER = re.compile(r"-?[0-9]{1,30}").fullmatch
_EPOCH_MS = re.compile(r"[0-9]{1,18}").fullmatch
_POSITIVE = re.compile(r"[1-9][0-9]{0,17}").fullmatch
# All levels of one side joined as "px|sz|x|n;px|sz|x|n..." checked by one regex call; a level that is not
# four decimal/integer strings fails it and is then located by the slow path.
_D = r"-?[0-9]{1,300}(?:\.[0-9]+)?"
_LEVEL = rf"{_D}\|{_D}\|{_D}\|[0-9]{{1,30}}"
_LEVELS = re.compile(rf"{_LEVEL}(?:;{_LEVEL})*")
_LEVELS_MATCH = _LEVELS.fullmatch


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _type_name(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | Decimal):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _wrong_type(key: str, value: object, expected: str) -> NoReturn:
    raise _Invalid(DeadLetterReason.WRONG_TYPE, key, f"expected {expected}, got {_type_name(value)} {_show(value)}")


def _missing(key: str) -> NoReturn:
    raise _Invalid(DeadLetterReason.MISSING_FIELD, key, "required field is missing")


def _check_decimal(key: str, value: str) -> str:
    """A decimal string OKX sent: plain notation, or exponent notation that stays finite as a float."""
    if _PLAIN_DECIMAL(value) is None and (_EXP_DECIMAL(value) is None or not math.isfinite(float(value))):
        raise _Invalid(DeadLetterReason.BAD_NUMBER, key, f"{_show(value)} is not a finite decimal")
    return value


def _req_str(row: Mapping[str, object], key: str) -> str:
    value = row.get(key, _MISSING)
    if type(value) is str and value:
        return value
    if value is _MISSING:
        _missing(key)
    if type(value) is str:
        raise _Invalid(DeadLetterReason.BAD_VALUE, key, "required field is empty")
    _wrong_type(key, value, "a string")


def _req_decimal(row: Mapping[str, object], key: str) -> str:
    value = row.get(key, _MISSING)
    if type(value) is str:
        if _PLAIN_DECIMAL(value) is not None:
            return value
        return _check_decimal(key, value)
    if value is _MISSING:
        _missing(key)
    _wrong_type(key, value, "a decimal string")


def _epoch_ms(key: str, value: object) -> int:
    if type(value) is str and _EPOCH_MS(value) is not None:
        return int(value)
    if type(value) is str:
        raise _Invalid(DeadLetterReason.BAD_NUMBER, key, f"{_show(value)} is not epoch milliseconds")
    _wrong_type(key, value, "a string of epoch milliseconds")


def _req_ts(row: Mapping[str, object], key: str = "ts") -> int:
    value = row.get(key, _MISSING)
    if value is _MISSING:
        _missing(key)
    return _epoch_ms(key, value)


def _opt_long(row: Mapping[str, object], key: str) -> int | None:
    value = row.get(key, _MISSING)
    if value is _MISSING:
        return None
    if type(value) is int and _INT64_MIN <= value <= _INT64_MAX:
        return value
    if type(value) is int:
        raise _Invalid(DeadLetterReason.BAD_NUMBER, key, f"{value} does not fit a 64-bit integer")
    _wrong_type(key, value, "an integer")


_JSON_TEXT = msgspec.json.Encoder(decimal_format="number")


def _json_text(value: object) -> str:
    return _JSON_TEXT.encode(value).decode()


def _extras(row: Mapping[str, object], known: frozenset[str], prefix: str = "") -> dict[str, str]:
    """Unknown keys of `row` as JSON text, so a field OKX adds is kept, not dropped."""
    return {prefix + k: _json_text(v) for k, v in row.items() if k not in known}


# ---------------------------------------------------------------------------------------------- field specs


class _Kind(enum.Enum):
    """How a known OKX field is checked and stored."""

    STR = "string"
    DEC = "decimal string (\"\" allowed)"
    INT = "integer string (\"\" allowed)"
    BOOL = "boolean"
    LONG = "integer"
    JSON = "any JSON, stored as JSON text"


S, D, I, B, L, J = _Kind.STR, _Kind.DEC, _Kind.INT, _Kind.BOOL, _Kind.LONG, _Kind.JSON  # noqa: E741

R = TypeVar("R", bound=OkxRecord)


def _all(kind: _Kind, names: str) -> dict[str, _Kind]:
    """`kind` for each of the space-separated OKX field `names`."""
    return dict.fromkeys(names.split(), kind)


class _Spec:
    """How the rows of one record type are checked: OKX field -> (Struct attribute, kind), required fields,
    and which field is the record's ts (None: the receive time, for rows without an event time)."""

    def __init__(self, cls: type[OkxRecord], fields: Mapping[str, _Kind], *, required: Sequence[str] = (),
                 ts: str | None = "ts", renames: Mapping[str, str] | None = None) -> None:
        attrs = {f.encode_name: f.name for f in msgspec.structs.fields(cls)}
        renames = renames or {}
        self.cls = cls
        self.fields: dict[str, tuple[str, _Kind]] = {}
        for okx_name, kind in fields.items():
            avro_name = renames.get(okx_name, okx_name)
            if avro_name not in attrs:
                raise TypeError(f"{cls.__name__} has no field {avro_name!r} for OKX field {okx_name!r}")
            self.fields[okx_name] = (attrs[avro_name], kind)
        self.required = frozenset(required)
        self.ts = ts
        self.known = frozenset(self.fields) | {"instId", "instType"} | ({ts} if ts else set())

    def build(self, row: object, common: dict[str, Any], ctx: _Ctx, *,
              more: Mapping[str, object] | None = None, parent_extra: Mapping[str, str] | None = None) -> OkxRecord:
        """One record from one row; `more` adds values from the enclosing push (eventType, pTime...)."""
        if type(row) is not dict:
            _wrong_type("", row, "an object")
        kwargs: dict[str, Any] = dict(common)
        if more:
            kwargs.update(more)
        extra: dict[str, str] = dict(ctx.extra)
        if parent_extra:
            extra.update(parent_extra)
        fields = self.fields
        for key, value in row.items():
            spec = fields.get(key)
            if spec is None:
                if key not in self.known:
                    extra[key] = _json_text(value)
                continue
            attr, kind = spec
            kwargs[attr] = _check(kind, key, value, key in self.required)
        for key in self.required:
            if key not in row:
                _missing(key)
        inst_id = row.get("instId", _MISSING)
        if inst_id is _MISSING:
            inst_id = ctx.inst_id
        elif type(inst_id) is not str or not inst_id:
            _wrong_type("instId", inst_id, "a non-empty string")
        elif ctx.inst_id is not None and inst_id != ctx.inst_id and ctx.check_inst_id:
            raise _Invalid(DeadLetterReason.BAD_VALUE, "instId", f"{inst_id!r} differs from arg.instId "
                           f"{ctx.inst_id!r}")
        if inst_id is None and self.cls is not Balance:
            _missing("instId")
        inst_type = row.get("instType", _MISSING)
        if inst_type is _MISSING:
            inst_type = ctx.inst_type
        elif type(inst_type) is not str:
            _wrong_type("instType", inst_type, "a string")
        kwargs["inst_id"] = inst_id
        kwargs["inst_type"] = inst_type
        # Required fields were checked above, so a missing ts field here is an optional one: use receive time.
        stamp = row.get(self.ts, _MISSING) if self.ts is not None else _MISSING
        kwargs["ts"] = ctx.recv_ts_ns // 1_000_000 if stamp is _MISSING else _epoch_ms(str(self.ts), stamp)
        kwargs["extra"] = extra
        return self.cls(**kwargs)


def _check(kind: _Kind, key: str, value: object, required: bool) -> object:
    if kind is S:
        if type(value) is str and (value or not required):
            return value
    elif kind is D:
        if type(value) is str:
            if value == "" and not required:
                return value
            if _PLAIN_DECIMAL(value) is not None:
                return value
            return _check_decimal(key, value)
    elif kind is I:
        if type(value) is str:
            if (value == "" and not required) or _INTEGER(value) is not None:
                return value
            raise _Invalid(DeadLetterReason.BAD_NUMBER, key, f"{_show(value)} is not an integer")
    elif kind is B:
        if type(value) is bool:
            return value
    elif kind is L:
        if type(value) is int:
            if _INT64_MIN <= value <= _INT64_MAX:
                return value
            raise _Invalid(DeadLetterReason.BAD_NUMBER, key, f"{value} does not fit a 64-bit integer")
    else:
        return _json_text(value)
    if type(value) is str and required and not value:
        raise _Invalid(DeadLetterReason.BAD_VALUE, key, "required field is empty")
    _wrong_type(key, value, "a " + kind.value)



class _Ctx:
    """What every record of one frame (or REST row) shares."""

    __slots__ = ("channel", "check_inst_id", "conn", "extra", "inst_id", "inst_type", "recv_seq", "recv_ts_ns",
                 "rid_prefix", "source", "uid")

    def __init__(self, *, channel: str, conn: str | None, recv_seq: int | None, recv_ts_ns: int, source: Source,
                 rid_prefix: str, inst_id: str | None = None, inst_type: str | None = None, uid: str | None = None,
                 extra: dict[str, str] | None = None, check_inst_id: bool = True) -> None:
        self.channel = channel
        self.conn = conn
        self.recv_seq = recv_seq
        self.recv_ts_ns = recv_ts_ns
        self.source = source
        self.rid_prefix = rid_prefix
        self.inst_id = inst_id
        self.inst_type = inst_type
        self.uid = uid
        self.extra = extra or {}
        self.check_inst_id = check_inst_id

    def common(self, index: int) -> dict[str, Any]:
        return {"channel": self.channel, "recv_ts_ns": self.recv_ts_ns, "source": self.source,
                "conn_id": self.conn, "recv_seq": self.recv_seq, "record_id": f"{self.rid_prefix}{index}"}

