"""Structured logging: JSON in a container, readable text on a terminal, never a secret or contact.

A redaction processor runs last-but-one on every event: values under secret-like or contact-like
keys are replaced, and e-mail addresses or bearer tokens inside any string are masked, so a careless
log call cannot leak what an operator's log pipeline must never hold.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any, Literal

import structlog

__all__ = ["configure_logging", "redact"]

_SECRET_KEYS = re.compile(
    r"(token|secret|password|passwd|authorization|assertion|private_key|api_key|cookie|session_id"
    r"|email|phone|first_?name|last_?name|contact)",
    re.IGNORECASE,
)
_EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}")
_BEARER = re.compile(r"(Bearer\s+)[A-Za-z0-9._~+/=-]+", re.IGNORECASE)
_JWT = re.compile(r"eyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]*")
REDACTED = "[redacted]"


def _scrub(value: Any) -> Any:
    if isinstance(value, str):
        return _JWT.sub(REDACTED, _BEARER.sub(r"\1" + REDACTED, _EMAIL.sub(REDACTED, value)))
    if isinstance(value, dict):
        return {k: (REDACTED if _SECRET_KEYS.search(str(k)) else _scrub(v)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_scrub(v) for v in value)
    return value


def redact(_logger: Any, _method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: mask secrets and customer contact details."""
    for key in list(event):
        if _SECRET_KEYS.search(key):
            event[key] = REDACTED
        else:
            event[key] = _scrub(event[key])
    return event


class _CurrentStderr:
    """Writes to whatever ``sys.stderr`` is at the time of the write (tests swap it per test)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def configure_logging(fmt: Literal["auto", "json", "console"] = "auto", level: str = "INFO") -> None:
    """Configure structlog (and stdlib logging underneath) once per process; logs go to stderr."""
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    renderer: Any = (
        structlog.processors.JSONRenderer() if use_json else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            redact,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level)),
        logger_factory=structlog.PrintLoggerFactory(file=_CurrentStderr()),  # type: ignore[arg-type]
        cache_logger_on_first_use=False,
    )
    logging.basicConfig(level=level, stream=sys.stderr, format="%(levelname)s %(name)s %(message)s")
