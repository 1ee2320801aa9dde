"""One redactor for every output channel: log lines, Sentry events and breadcrumbs, crash output.

`Secret` already hides itself, but a secret can still travel as a plain string: inside a login frame
that a library logs at DEBUG, in an exception message from a library, in a traceback's locals. So
every byte that leaves the process through logs or Sentry passes through `Redactor.scrub`, which
replaces every known secret value, whatever carried it there, and masks the value of every credential field
(OKX's login `apiKey`/`passphrase`/`sign`, the `OK-ACCESS-*` headers) whatever it holds: a library that logs
a frame truncated (websockets at DEBUG: `{"apiKey":"073f...`) leaves no whole secret to recognise.

A secret rarely reaches a line as it is: a JSON log line escapes `"` and `\\`, a dict printed in a text line
shows its repr, a URL carries it percent-encoded, a header or a dump base64 or hex. So each registered value is
masked in every encoding a writer produces (`encodings`), and in those encodings escaped again as a JSON line
or a repr does (a frame logged inside a JSON log line is escaped two or three times).
"""

from __future__ import annotations

import base64
import json
import re
import threading
from collections.abc import Iterable
from urllib.parse import quote, quote_plus

MASK = "***"
#: Values shorter than this are not scrubbed: masking "1" everywhere would destroy logs, and no real
#: OKX key, secret or passphrase is that short (the passphrase minimum is 8 characters).
MIN_SECRET_LEN = 4


#: A credential field as JSON or a dict repr shows it (quotes possibly backslash-escaped by a JSON log line):
#: group 1 is everything up to the value, which runs to the next quote or backslash.
_CREDENTIAL_FIELD = re.compile(
    r"""(\\?["'](?:apiKey|passphrase|sign|secretKey|OK-ACCESS-(?:KEY|SIGN|PASSPHRASE)|sasl_plain_password|password|"""
    r"""client_secret|access_token)\\?["']\s*:\s*\\?["'])"""
    r"""[^"'\\]*""",
    re.IGNORECASE,
)
_FIELD_HINTS = ("apikey", "passphrase", "sign", "access-", "password", "client_secret", "access_token")


def _escapes(text: str) -> set[str]:
    """`text` as it appears inside a JSON string (escaping non-ASCII, as json does, or not, as orjson does) and
    inside a Python repr (a dict or a frame printed by a library)."""
    # repr picks its quotes from the whole string: inside a longer one that holds a `"`, a `'` of the secret
    # is escaped although the secret's own repr would not escape it (the appended `"` forces that style).
    return {json.dumps(text)[1:-1], json.dumps(text, ensure_ascii=False)[1:-1], repr(text)[1:-1],
            repr(text + '"')[1:-2]}


#: How many escapings deep a secret is looked for: a websockets DEBUG line of a login frame is the secret
#: JSON-escaped (the frame), repr-escaped (websockets prints the frame's repr) and JSON-escaped (our log line).
ESCAPE_DEPTH = 3


def encodings(secret: str) -> frozenset[str]:
    """Every form in which `secret` can appear in a line of output: raw, URL-encoded, base64 (standard and
    URL-safe, padded or not), hex (either case, bytes apart or not), bytes repr, and each of those escaped for
    JSON or a repr up to ESCAPE_DEPTH times in any order."""
    raw = secret.encode()
    b64 = {base64.b64encode(raw).decode(), base64.urlsafe_b64encode(raw).decode()}
    url = {quote(secret, safe=""), quote(secret), quote_plus(secret), quote_plus(secret, safe="")}
    url |= {re.sub(r"%[0-9A-F]{2}", lambda m: m.group(0).lower(), u) for u in url}
    hexed = {raw.hex(), raw.hex(" ")}
    forms = {secret, repr(raw)[2:-1], *url, *b64, *(b.rstrip("=") for b in b64), *hexed,
             *(h.upper() for h in hexed)}
    layer = set(forms)
    for _ in range(ESCAPE_DEPTH):
        layer = {e for form in layer for e in _escapes(form)} - forms
        forms |= layer
    return frozenset(f for f in forms if len(f) >= MIN_SECRET_LEN)


class Redactor:
    """Replaces registered secret values in strings and nested containers."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._secrets: tuple[str, ...] = ()

    def set_secrets(self, values: Iterable[str]) -> None:
        """Add values to mask, in all their encodings (on rotation the old values stay masked too: they may
        linger)."""
        fresh: set[str] = set()
        for v in values:
            if len(v) >= MIN_SECRET_LEN:
                fresh |= encodings(v)
        with self._lock:
            merged = set(self._secrets) | fresh
            # Longest first, so an encoding that contains another (or a secret that contains another) is masked
            # whole.
            self._secrets = tuple(sorted(merged, key=len, reverse=True))

    @property
    def active(self) -> bool:
        return bool(self._secrets)

    def scrub(self, text: str) -> str:
        for value in self._secrets:
            if value in text:
                text = text.replace(value, MASK)
        lowered = text.lower()
        if any(hint in lowered for hint in _FIELD_HINTS):
            text = _CREDENTIAL_FIELD.sub(rf"\g<1>{MASK}", text)
        return text

    def scrub_obj(self, obj: object) -> object:
        """A copy of a JSON-like structure (dicts, lists, tuples, strings) with secrets masked."""
        if not self._secrets:
            return obj
        if isinstance(obj, str):
            return self.scrub(obj)
        if isinstance(obj, bytes):
            return self.scrub(obj.decode("utf-8", "replace")).encode()
        if isinstance(obj, dict):
            return {self.scrub(k) if isinstance(k, str) else k: self.scrub_obj(v) for k, v in obj.items()}
        if isinstance(obj, list | tuple):
            return type(obj)(self.scrub_obj(v) for v in obj)
        return obj


#: The process-wide redactor: the credential store registers values here, every sink of output uses it.
REDACTOR = Redactor()
