"""One error hierarchy: every error says what happened and what to do about it."""

from __future__ import annotations


class IngestError(Exception):
    """Root of every error this package raises on purpose."""

    retriable: bool = False


class ConfigError(IngestError):
    """A setting is missing or wrong; the message names the key and the fix."""

    def __init__(self, key: str, problem: str, fix: str) -> None:
        self.key = key
        self.problem = problem
        self.fix = fix
        super().__init__(f"config {key}: {problem}. Fix: {fix}")


class CredentialError(IngestError):
    """Credentials are missing, unreadable or rejected; never carries the secret itself."""


class ProtocolError(IngestError):
    """The peer sent something the OKX protocol does not allow."""


class OkxApiError(IngestError):
    """OKX answered with a non-zero code (REST or WebSocket)."""

    def __init__(self, code: str, msg: str, *, http_status: int | None = None, retriable: bool = False) -> None:
        self.code = code
        self.msg = msg
        self.http_status = http_status
        self.retriable = retriable
        where = f" (HTTP {http_status})" if http_status is not None else ""
        super().__init__(f"OKX error {code}{where}: {msg}")


class DeliveryError(IngestError):
    """A record could not be delivered to its sink."""

    retriable = True
