"""Structured logs for the controller and the agent: plain text, JSON lines or logfmt, chosen by flag.

Every record carries time, level, logger and message, plus whatever the caller put in ``extra=``
(for example the access log's ``method``, ``path``, ``status``, ``ms``) and the id of the request
being served (:data:`request_id`, set by the controller's HTTP edge, ``controller/edge.py``), so
one request's lines can be found together. Values are escaped for their format: a JSON string, or a logfmt value
quoted when it holds a space, a quote or ``=``; control characters never reach the log raw, so a
hostile path cannot forge a log line.
"""

from __future__ import annotations

import contextvars
import datetime as dt
import json
import logging
import sys
from enum import Enum
from typing import Any, TextIO

request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("stockade_request_id", default=None)

# attributes every LogRecord has; anything else came from ``extra=``
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}


class LogFormat(Enum):
    TEXT = "text"
    JSON = "json"
    LOGFMT = "logfmt"


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    out: dict[str, Any] = {
        "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds"),
        "level": record.levelname.lower(),
        "logger": record.name,
        "msg": record.getMessage(),
    }
    rid = request_id.get()
    if rid is not None:
        out["request_id"] = rid
    for key, value in vars(record).items():
        if key not in _STANDARD and not key.startswith("_"):
            out[key] = value
    if record.exc_info:
        out["exc"] = logging.Formatter().formatException(record.exc_info)
    return out


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(_fields(record), default=str, ensure_ascii=True)


def _logfmt_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    if text and not any(c in text for c in ' "=\\') and text.isprintable():
        return text
    return json.dumps(text, ensure_ascii=True)  # quoted, with \n, \", \u00xx escapes


class LogfmtFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return " ".join(f"{k}={_logfmt_value(v)}" for k, v in _fields(record).items())


class TextFormatter(logging.Formatter):
    """Human lines: ``time level logger: message key=value ...`` (extras in logfmt)."""

    def format(self, record: logging.LogRecord) -> str:
        f = _fields(record)
        head = f"{f.pop('time')} {f.pop('level').upper()} {f.pop('logger')}: {_printable(str(f.pop('msg')))}"
        exc = f.pop("exc", None)
        tail = " ".join(f"{k}={_logfmt_value(v)}" for k, v in f.items())
        return head + (f" {tail}" if tail else "") + (f"\n{exc}" if exc else "")


def _printable(text: str) -> str:
    return text if text.isprintable() else json.dumps(text, ensure_ascii=True)[1:-1]


FORMATTERS: dict[LogFormat, type[logging.Formatter]] = {
    LogFormat.TEXT: TextFormatter,
    LogFormat.JSON: JsonFormatter,
    LogFormat.LOGFMT: LogfmtFormatter,
}


def configure_logging(level: str = "info", fmt: LogFormat | str = LogFormat.TEXT, stream: TextIO | None = None) -> None:
    """Route every logger (ours, uvicorn's, httpx's) through one handler in the chosen format."""
    fmt = LogFormat(fmt)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(FORMATTERS[fmt]())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error"):
        lg = logging.getLogger(name)
        lg.handlers.clear()
        lg.propagate = True
    # uvicorn's own access log is replaced by stockade.access (request ids, principal-free, escaped)
    logging.getLogger("uvicorn.access").disabled = True
    logging.getLogger("httpx").setLevel(max(logging.WARNING, root.level))
