"""Logging: one setup for every logger, JSON lines or logfmt, key material redacted.

Anything shaped like a key or a management token is cut to its display prefix
wherever it appears in a message or a field, query strings included.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from typing import Any

import orjson

from gateway.config import LoggingSettings
from gateway.text import safe_text

__all__ = ["LogFormatter", "configure_logging", "logfmt_value", "redact"]

_SECRET = re.compile(r"(ckiq_(?:live|test|mgmt)_[0-9A-Za-z]{4})[0-9A-Za-z]+")
_BEARER = re.compile(r"(?i)(bearer\s+)(?!ckiq_)[^\s\"',;]+")


def redact(text: str) -> str:
    """Cut key-shaped strings to their display prefix, and hide other bearer tokens."""
    return _BEARER.sub(r"\1[redacted]", _SECRET.sub(r"\1…", text))


def _clean(value: Any) -> Any:
    return redact(value) if isinstance(value, str) else value


class LogFormatter(logging.Formatter):
    """JSON lines or logfmt; every string redacted."""

    def __init__(self, style: str) -> None:
        super().__init__()
        self._json = style == "json"

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": redact(record.getMessage()),
        }
        extra = getattr(record, "fields", None)
        if isinstance(extra, dict):
            fields.update({k: _clean(v) for k, v in extra.items()})
        if record.exc_info:
            fields["error"] = redact(self.formatException(record.exc_info))
        if self._json:
            try:
                return orjson.dumps(fields).decode()
            except TypeError:
                # Text that is not UTF-8 (a client's header bytes arrive as lone
                # surrogates), an integer beyond 64 bits or an object orjson does
                # not know: the line is still written, with those escaped.
                return orjson.dumps(_encodable(fields)).decode()
        return " ".join(f"{k}={logfmt_value(v)}" for k, v in fields.items())


def _encodable(value: Any) -> Any:
    """``value`` with every string made UTF-8, and what JSON has no type for made text."""
    if isinstance(value, str):
        return _text(value)
    if isinstance(value, dict):
        return {_text(str(k)): _encodable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_encodable(v) for v in value]
    if value is None or isinstance(value, bool | float) or _int64(value):
        return value
    return _text(redact(str(value)))


def _int64(value: Any) -> bool:
    return isinstance(value, int) and -(2**63) <= value < 2**64


def _text(text: str) -> str:
    """``text`` if every character encodes, else with the ones that cannot escaped."""
    if text.isascii():
        return text
    try:
        text.encode()
    except UnicodeEncodeError:
        return safe_text(text)
    return text


def logfmt_value(value: Any) -> str:
    if value is None:
        return ""
    text = _text(str(value))
    if text == "" or any(c in text for c in ' "=\n\\'):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return text


class _ClientErrors(logging.Filter):
    """A malformed request is the client's problem, not ours: one info line, no traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        from aiohttp.http_exceptions import HttpProcessingError

        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.msg, record.args = "bad request from a client: %s", (exc.message,)
            record.exc_info = record.exc_text = None
        return True


def configure_logging(settings: LoggingSettings) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LogFormatter(settings.format))
    handler.addFilter(_ClientErrors())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.level)
    logging.getLogger("gateway.access").disabled = not settings.access_log
    # aiohttp's own access log would repeat ours without the fields that matter.
    logging.getLogger("aiohttp.access").disabled = True
