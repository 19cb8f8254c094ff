"""Structured logs: one JSON object per line, with the request id of the request at hand.

The request id lives in a context variable, so every line logged while a
request is served (ours, asyncpg's, uvicorn's) carries it without being passed
around.  Known secret values are masked at the formatter, the last place a line
passes before it leaves the process: a defence in depth, since no code path
here is meant to log one.  They are masked in the values, before JSON encoding:
encoded, a secret holding `"` or `\\` (the settings allow both) is no longer
the text being searched for.  Tracebacks are not written (the issue forbids them
in logs too): an error line names the exception's type and where it was raised.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys
import traceback
from contextvars import ContextVar
from typing import Any

request_id: ContextVar[str | None] = ContextVar("kyrie_request_id", default=None)

# Attributes every LogRecord has; anything else passed in `extra=` becomes a field.
_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}
_MASK = "[redacted]"


class JsonLines(logging.Formatter):
    def __init__(self, secrets: list[str] | None = None) -> None:
        super().__init__()
        # Longest first, so a secret containing another is masked whole.
        self.secrets = sorted({s for s in secrets or [] if len(s) >= 4}, key=len, reverse=True)

    def _mask(self, text: str) -> str:
        for secret in self.secrets:
            if secret in text:
                text = text.replace(secret, _MASK)
        return text

    def _masked(self, value: Any) -> Any:
        """The value with every secret masked, as JSON-ready data (what json.dumps would
        have turned into text with `default=str` is turned into text here, then masked)."""
        if isinstance(value, str):
            return self._mask(value)
        if isinstance(value, dict):
            return {self._mask(str(k)): self._masked(v) for k, v in value.items()}
        if isinstance(value, list | tuple | set | frozenset):
            return [self._masked(v) for v in value]
        if value is None or isinstance(value, bool | int | float):
            return value
        return self._mask(str(value))

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        # Lines about a request name it explicitly; others pick it up from the context.
        rid = getattr(record, "request_id", None) or request_id.get()
        if rid is not None:
            line["request_id"] = rid
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_") and key != "color_message":
                line[key] = value
        if record.exc_info and record.exc_info[1] is not None:
            line.update(describe_exception(record.exc_info[1]))
        return json.dumps(self._masked(line), ensure_ascii=False)


def describe_exception(exc: BaseException) -> dict[str, str]:
    """Type and innermost frame: enough to find the bug, nothing a user typed."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = ""
    if frames:
        last = frames[-1]
        where = f"{last.filename.rsplit('/', 1)[-1]}:{last.lineno} in {last.name}"
    return {"error_type": f"{type(exc).__module__}.{type(exc).__qualname__}", "error_at": where}


def configure(level: str = "info", secrets: list[str] | None = None) -> None:
    """Route every logger (uvicorn's included) through one JSON-lines handler on stderr."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLines(secrets))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    # We write our own access line per request (with the request id and route).
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
