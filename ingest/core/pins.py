"""The text form of an SPKI pin, pure so that configuration can validate pins without importing TLS I/O."""

from __future__ import annotations

import base64
import binascii
import hashlib

PIN_PREFIX = "sha256/"


def normalize_pin(pin: str) -> str:
    """The bare base64 form of a pin; ValueError unless it is the base64 of exactly 32 bytes."""
    text = pin.strip()
    text = text.removeprefix(PIN_PREFIX)
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"TLS pin {pin!r} is not base64 (expected base64 of a SHA-256 digest)") from None
    if len(raw) != hashlib.sha256().digest_size:
        raise ValueError(f"TLS pin {pin!r} decodes to {len(raw)} bytes; a SHA-256 SPKI pin has 32")
    return base64.b64encode(raw).decode()
