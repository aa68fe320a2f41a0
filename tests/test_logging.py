"""Log output: one JSON object per line, written whole."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import structlog

from lbd.observability.logging import LogLimiter, configure_logging
from tests.support import (
    address_of,
    config,
    dead_port,
    document,
    echo_backend,
    fresh_ip,
    read_name,
    route_of,
    running,
    service_yaml,
    upstream_totals,
)


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


async def test_connect_failures_log_once_a_second_per_endpoint_and_count_all() -> None:
    dead_host = fresh_ip()
    stream = RecordingStream()
    configure_logging("json", "warning", stream)
    try:
        async with echo_backend("alive") as (bh, bp, _):
            endpoints = [(dead_host, dead_port(dead_host)), (bh, bp)]
            async with running(config(document(service_yaml("svc", endpoints)))) as runtime:
                host, port = address_of(runtime)
                began = time.monotonic()
                names = [await read_name(host, port) for _ in range(20)]
                elapsed = time.monotonic() - began
                totals = upstream_totals(route_of(runtime))
    finally:
        configure_logging("json", "error")
    assert names == ["alive"] * 20 and totals.upstream_cx_connect_fail_total == 10
    lines = [json.loads(line) for line in stream.writes]
    failed = [line for line in lines if line["event"] == "upstream connect failed"]
    # One line a second at most; each line says how many it stands for.
    assert 1 <= len(failed) <= 1 + int(elapsed)
    assert len(failed) + sum(line["similar_lines_skipped"] for line in failed) <= 10


def test_log_limiter_reports_what_it_skipped() -> None:
    limiter = LogLimiter(interval=1.0)
    assert limiter.allow("a", 10.0) == 0
    assert limiter.allow("a", 10.5) is None and limiter.allow("a", 10.9) is None
    assert limiter.allow("b", 10.9) == 0  # another key has its own second
    assert limiter.allow("a", 11.0) == 2


def test_a_failing_log_stream_drops_the_line_instead_of_raising() -> None:
    class Broken(io.StringIO):
        def write(self, text: str) -> int:
            raise BrokenPipeError(32, "Broken pipe")

        def isatty(self) -> bool:
            return False

    configure_logging("json", "info", Broken())
    try:
        structlog.get_logger("lbd.test").info("nobody reads this")  # must not raise
    finally:
        configure_logging("json", "error")


@pytest.mark.parametrize("workers", [1, 2])
def test_lbd_stops_on_sigterm_after_its_log_reader_went_away(tmp_path: Path, workers: int) -> None:
    """A log collector that dies (the reader of lbd's stderr pipe) must not leave lbd unable
    to stop: every log line now fails with EPIPE, the SIGTERM handler's first one included."""
    path = tmp_path / "lbd.yaml"
    text = document(service_yaml("svc", [(fresh_ip(), 80)]))
    path.write_text(
        text.replace("apiVersion: lbd/v1\n", f"apiVersion: lbd/v1\nworkers: {workers}\n")
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "lbd", "run", str(path), "--log-format", "json"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert process.stderr is not None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # bounded: lbd logs "lbd started" within seconds
            line = process.stderr.readline()
            if not line or b'"lbd started"' in line:
                break
        assert b'"lbd started"' in line, line
        process.stderr.close()  # the reader goes away
        process.send_signal(signal.SIGTERM)  # our own child, by PID
        assert process.wait(timeout=20) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
