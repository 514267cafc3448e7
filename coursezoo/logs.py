"""Structured logging: one JSON object per line, quiet (WARNING) unless COURSEZOO_LOG_LEVEL says otherwise."""

from __future__ import annotations

import json
import logging
import os

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """Renders the message and every ``extra=`` field as JSON, so logs can be grepped and parsed."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": self.formatTime(record), "level": record.levelname, "logger": record.name,
               "msg": record.getMessage()}
        out.update({k: v for k, v in vars(record).items() if k not in _STANDARD})
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


#: the names logging knows (WARN and FATAL too), least severe first
LEVELS = tuple(sorted(logging.getLevelNamesMapping(), key=logging.getLevelNamesMapping().get))
DEFAULT_LEVEL = "WARNING"


class LogLevelError(ValueError):
    """COURSEZOO_LOG_LEVEL names no level."""


def setup() -> None:
    """JSON lines on stderr at ``COURSEZOO_LOG_LEVEL``, else WARNING; an empty variable is unset
    (compose passes one through empty). Raises LogLevelError for anything else but a level's name: before,
    every command, ``--help`` too, stopped with a traceback, and a server so configured crash-looped."""
    name = (os.environ.get("COURSEZOO_LOG_LEVEL", "").strip() or DEFAULT_LEVEL).upper()
    if name not in LEVELS:
        raise LogLevelError(f"COURSEZOO_LOG_LEVEL={name.lower()!r}: expected one of {', '.join(LEVELS)} "
                            f"(any case), or unset for {DEFAULT_LEVEL}")
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(name)
