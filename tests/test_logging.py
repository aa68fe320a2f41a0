"""Log output: one JSON object per line, written whole."""

from __future__ import annotations

import io
import json

import structlog

from lbd.observability.logging import configure_logging


class RecordingStream(io.StringIO):
    """A write-through stream (as stderr is under PYTHONUNBUFFERED=1): every write() is what
    another process sharing the pipe could land between."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return super().write(text)

    def isatty(self) -> bool:
        return False


def test_each_log_line_is_written_in_one_piece() -> None:
    stream = RecordingStream()
    configure_logging("auto", "info", stream)
    try:
        structlog.get_logger("lbd.test").info("restart: the next lbd serves", sockets=2)
    finally:
        configure_logging("json", "error")  # as tests/conftest.py set it
    [line] = stream.writes
    assert line.endswith("\n") and json.loads(line)["event"] == "restart: the next lbd serves"
