"""Structured logging: one JSON object per line, quiet (WARNING) unless COURSEZOO_LOG_LEVEL says otherwise."""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import os
import time
from collections.abc import Callable, Hashable, Mapping

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """Renders the message and every ``extra=`` field as JSON, so logs can be grepped and parsed."""

    def format(self, record: logging.LogRecord) -> str:
        # ISO 8601 in UTC, as log pipelines parse it (logging's default had no zone and a comma before the ms)
        ts = dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds")
        out = {"ts": ts, "level": record.levelname, "logger": record.name, "msg": record.getMessage()}
        out.update({k: v for k, v in vars(record).items() if k not in _STANDARD})
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def one_line(exc: BaseException) -> str:
    """An unexpected exception as one line: its type and its message's first line (onnxruntime's run to pages)."""
    return f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"


class Throttle:
    """When a kind of event may be logged again: at most once per ``every_s``, so that an event any caller can
    repeat (a broken model failing every request, a client without the token) cannot flood the log. The events
    in between are counted, and the next line says how many there were. Kinds must be few (bounded by the caller).
    """

    def __init__(self, every_s: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.every_s = every_s
        self._clock = clock
        self._kinds: dict[Hashable, tuple[float, int]] = {}  # kind -> (last logged, events not logged since)

    def due(self, kind: Hashable) -> int | None:
        """None: not yet (the event is counted); else log it now, saying how many were not logged since the last."""
        now = self._clock()
        last, unlogged = self._kinds.get(kind, (-math.inf, 0))
        if now - last < self.every_s:
            self._kinds[kind] = (last, unlogged + 1)
            return None
        self._kinds[kind] = (now, 0)
        return unlogged


#: the names logging knows (WARN and FATAL too), least severe first
LEVELS = tuple(sorted(logging.getLevelNamesMapping(), key=logging.getLevelNamesMapping().get))
DEFAULT_LEVEL = "WARNING"


class LogLevelError(ValueError):
    """COURSEZOO_LOG_LEVEL names no level."""


class LogSettingError(ValueError):
    """A LogSettings change names no setting, or gives one a value of the wrong kind."""


class Severities(logging.Filter):
    """Which severities are logged, switched one by one as Triton's logging extension switches them
    (``LogSettings``: ``log_info``, ``log_warning``, ``log_error``, and ``log_verbose_level`` > 0 for DEBUG);
    a level such as ``COURSEZOO_LOG_LEVEL`` sets them all. It filters the handler, and the root logger's
    level follows the least severe one on, so records nobody wants are not even made. CRITICAL, which Triton
    has not, follows the level alone (``COURSEZOO_LOG_LEVEL=CRITICAL`` logs it, whatever ``log_error`` says)."""

    def __init__(self) -> None:
        super().__init__()
        self.set_level(DEFAULT_LEVEL)
        self.settled = False  # whether they are this process's: ``setup`` or a LogSettings change set them

    def set_level(self, level: str | int) -> None:
        """Every severity from ``level`` (a name, or a number as ``logging`` keeps it) up on, the others off."""
        level = logging.getLevelNamesMapping()[level] if isinstance(level, str) else level
        self.info, self.warning, self.error, self.critical = (level <= logging.INFO, level <= logging.WARNING,
                                                              level <= logging.ERROR, level <= logging.CRITICAL)
        self.verbose = int(level <= logging.DEBUG)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.CRITICAL:
            return self.critical or self.error
        if record.levelno >= logging.ERROR:
            return self.error
        if record.levelno >= logging.WARNING:
            return self.warning
        return self.info if record.levelno >= logging.INFO else self.verbose > 0

    def lowest(self) -> int:
        """The least severe level on (above CRITICAL when none is)."""
        on = [(self.verbose > 0, logging.DEBUG), (self.info, logging.INFO), (self.warning, logging.WARNING),
              (self.error, logging.ERROR), (self.critical, logging.CRITICAL)]
        return next((level for enabled, level in on if enabled), logging.CRITICAL + 1)


SEVERITIES = Severities()
#: Triton's log settings this process answers LogSettings with: logs go to stderr as JSON lines, which stay so.
LOG_FILE, LOG_FORMAT = "", "json"


def log_settings() -> dict[str, bool | int | str]:
    """The log settings as Triton's ``LogSettings`` names them."""
    _follow_the_host()
    return {"log_file": LOG_FILE, "log_info": SEVERITIES.info, "log_warning": SEVERITIES.warning,
            "log_error": SEVERITIES.error, "log_verbose_level": SEVERITIES.verbose, "log_format": LOG_FORMAT}


def update_log_settings(changes: Mapping[str, bool | int | str]) -> None:
    """Apply a ``LogSettings`` change, all of it or (LogSettingError) none of it; the settings left out stay."""
    current = log_settings()
    for key, value in changes.items():
        if key not in current:
            raise LogSettingError(f"log setting {key!r}: expected one of {', '.join(current)}")
        if type(value) is not type(current[key]):
            raise LogSettingError(f"log setting {key!r} is a {type(current[key]).__name__}, got {value!r}")
        if key in ("log_file", "log_format") and value != current[key]:
            raise LogSettingError(f"{key} {value!r}: logs go to stderr as JSON lines ({key} {current[key]!r}); "
                                  "only the severities and log_verbose_level can change")
    for key, value in changes.items():
        if key in ("log_info", "log_warning", "log_error", "log_verbose_level"):
            setattr(SEVERITIES, key.removeprefix("log_").removesuffix("_level"), value)
    SEVERITIES.settled = True
    root = logging.getLogger()
    for handler in root.handlers:  # a host that configured logging itself: it now goes by the settings too
        if SEVERITIES not in handler.filters:
            handler.addFilter(SEVERITIES)
    root.setLevel(SEVERITIES.lowest())


def _follow_the_host() -> None:
    """In a process whose logging ``setup`` did not configure (a server run in a test or a benchmark), the
    settings are the root logger's level, not COURSEZOO_LOG_LEVEL's default: while none of its handlers carries
    the filter (it has none yet, or the host configured them again since a change), and, with no handler at
    all, until a change sets them."""
    root = logging.getLogger()
    if not any(SEVERITIES in handler.filters for handler in root.handlers) and (
            root.handlers or not SEVERITIES.settled):
        SEVERITIES.set_level(root.getEffectiveLevel())


def setup() -> None:
    """JSON lines on stderr at ``COURSEZOO_LOG_LEVEL``, else WARNING; an empty variable is unset
    (compose passes one through empty). Raises LogLevelError for anything else but a level's name: before,
    every command, ``--help`` too, stopped with a traceback, and a server so configured crash-looped."""
    name = (os.environ.get("COURSEZOO_LOG_LEVEL", "").strip() or DEFAULT_LEVEL).upper()
    if name not in LEVELS:
        raise LogLevelError(f"COURSEZOO_LOG_LEVEL={name.lower()!r}: expected one of {', '.join(LEVELS)} "
                            f"(any case), or unset for {DEFAULT_LEVEL}")
    SEVERITIES.set_level(name)
    SEVERITIES.settled = True
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    handler.addFilter(SEVERITIES)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(SEVERITIES.lowest())
