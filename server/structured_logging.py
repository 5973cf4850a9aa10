"""Logging setup for the server: human text or one JSON object per line (``--log-json``:
time, level, logger, message, extra fields), with secrets redacted in both forms.

Redaction is a handler filter, so every logger (ours, grpc's, a library's) goes through it:
fields whose name says secret/token/password/signature/credential/private key are replaced,
enrollment tokens (``cfe_...``) and HMAC signatures are masked inside messages, and raw bytes
are never written (only their length).
"""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import UTC, datetime
from typing import IO, Any

REDACTED = "<redacted>"
_SECRET_FIELD = re.compile(
    r"secret|token|passw|signature|credential|private|api[_-]?key|authorization", re.IGNORECASE
)
_SECRET_TEXT = (
    (re.compile(r"cfe_[A-Za-z0-9_\-]{8,}"), "cfe_" + REDACTED),  # enrollment tokens
    (
        re.compile(r"(x-crossfed-signature['\"]?\s*[:=,]\s*['\"]?)[0-9a-f]{16,}", re.IGNORECASE),
        r"\1" + REDACTED,
    ),
    (re.compile(r"(-----BEGIN [A-Z ]*PRIVATE KEY-----).*?(-----END)", re.DOTALL), r"\1...\2"),
)
#: LogRecord attributes that are not "extra" fields.
_STANDARD_ATTRS = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", None, None)).keys() | {"message", "asctime"}
)
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class LoggingSetupError(ValueError):
    """The requested log configuration is invalid (e.g. an unknown level name)."""


def redact_text(text: str) -> str:
    """Mask enrollment tokens, request signatures and private-key blocks inside ``text``."""
    for pattern, replacement in _SECRET_TEXT:
        text = pattern.sub(replacement, text)
    return text


def redact_value(key: str, value: Any) -> Any:
    """A loggable version of an extra field: secret-named fields and raw bytes hidden."""
    if _SECRET_FIELD.search(key):
        return REDACTED
    if isinstance(value, bytes | bytearray | memoryview):
        return f"<{len(value)} bytes>"
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        return {str(k): redact_value(str(k), v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact_value(key, v) for v in value]
    if value is None or isinstance(value, bool | int | float):
        return value
    return redact_text(str(value))


def extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The ``extra={...}`` fields of a record (everything not a standard attribute)."""
    return {k: v for k, v in vars(record).items() if k not in _STANDARD_ATTRS and k[:1] != "_"}


class RedactSecretsFilter(logging.Filter):
    """Rewrites a record in place so no handler can emit a secret (text or JSON)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except (TypeError, ValueError, KeyError):  # bad format args: logging reports it
            return True
        cleaned = redact_text(message)
        if cleaned != message or record.args:
            record.msg, record.args = cleaned, None
        for key, value in extra_fields(record).items():
            setattr(record, key, redact_value(key, value))
        return True


class JsonLineFormatter(logging.Formatter):
    """One JSON object per line: time (UTC ISO-8601), level, logger, message, extras, exc."""

    def format(self, record: logging.LogRecord) -> str:
        body: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in extra_fields(record).items():
            body.setdefault(key, redact_value(key, value))
        if record.exc_info:
            body["exc_info"] = redact_text(self.formatException(record.exc_info))
        if record.stack_info:
            body["stack_info"] = redact_text(self.formatStack(record.stack_info))
        return json.dumps(body, default=str, ensure_ascii=False)


def configure_logging(
    level: str = "INFO", *, json_lines: bool = False, stream: IO[str] | None = None
) -> logging.Handler:
    """Replace the root handlers with one (text or JSON lines) that redacts secrets."""
    name = level.upper()
    if not isinstance(logging.getLevelName(name), int):
        raise LoggingSetupError(
            f"unknown log level {level!r}; use DEBUG, INFO, WARNING, ERROR or CRITICAL"
        )
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(RedactSecretsFilter())
    handler.setFormatter(JsonLineFormatter() if json_lines else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(name)
    return handler
