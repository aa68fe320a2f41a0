"""structlog set-up: readable on a terminal, JSON lines anywhere else."""

from __future__ import annotations

import contextlib
import logging
import sys
from typing import Literal, TextIO, cast

import structlog

LogFormat = Literal["auto", "console", "json"]
LOG_LEVELS = ("debug", "info", "warning", "error")


def configure_logging(
    log_format: LogFormat = "auto", level: str = "info", stream: TextIO | None = None
) -> None:
    out = stream if stream is not None else sys.stderr
    if log_format == "auto":
        log_format = "console" if out.isatty() else "json"
    renderer: structlog.typing.Processor
    if log_format == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=out.isatty())
    else:
        renderer = structlog.processors.JSONRenderer()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,  # a supervised worker's ``worker=N``
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        # One write per line (print() writes the newline separately, and unbuffered, e.g.
        # PYTHONUNBUFFERED=1 as container images set it, the supervisor's and workers' lines
        # on the shared stderr then interleave into broken JSON).
        logger_factory=structlog.WriteLoggerFactory(file=cast(TextIO, _NeverFailing(out))),
        cache_logger_on_first_use=False,
    )


class _NeverFailing:
    """The log stream, as seen by structlog: a write that fails (the reader of a pipe went
    away, a full disk) drops the line instead of raising. A log call must never stop what
    called it; a SIGTERM handler whose first act is to log would otherwise never stop lbd."""

    __slots__ = ("__weakref__", "_stream", "dropped")  # structlog keys its lock by a weakref

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self.dropped = 0  # lines lost; nowhere to report them but here

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except (OSError, ValueError):  # ValueError: the stream was closed
            self.dropped += 1
            return 0

    def flush(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self._stream.flush()


class LogLimiter:
    """At most one line per key and interval (a dead endpoint under load would otherwise log
    thousands of lines a second). ``allow`` says whether to log now and how many lines were
    skipped since the last one; what is skipped is still counted in the metrics."""

    __slots__ = ("_next", "_skipped", "interval")

    MAX_KEYS = 10_000  # keys are endpoints and routes; forget them all if that many piled up

    def __init__(self, interval: float = 1.0) -> None:
        self.interval = interval
        self._next: dict[object, float] = {}
        self._skipped: dict[object, int] = {}

    def allow(self, key: object, now: float) -> int | None:
        """None: skip this line. Else log it, with this many lines skipped before it."""
        if now < self._next.get(key, float("-inf")):
            self._skipped[key] = self._skipped.get(key, 0) + 1
            return None
        if len(self._next) >= self.MAX_KEYS:
            self._next.clear()
            self._skipped.clear()
        self._next[key] = now + self.interval
        return self._skipped.pop(key, 0)
