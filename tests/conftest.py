from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Callable, Mapping

import pytest
import uvloop

from lbd.observability.logging import configure_logging

# Data-path tests run on both loops: uvloop is what lbd runs by default, asyncio is the
# fallback (--loop asyncio) and behaves differently around pause_reading and closed transports.
BOTH_LOOPS_MODULES = {"test_splice", "test_tcp_proxy", "test_udp_proxy"}


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    module = item.module.__name__.rsplit(".", 1)[-1] if item.module else ""  # type: ignore[attr-defined]
    if module in BOTH_LOOPS_MODULES:
        return {"uvloop": uvloop.new_event_loop, "asyncio": asyncio.new_event_loop}
    return {"uvloop": uvloop.new_event_loop}


@pytest.fixture(autouse=True, scope="session")
def _not_under_systemd() -> None:
    # A runner started by systemd passes its notification socket on: lbd processes started by
    # tests would report READY/STOPPING for the runner's own unit. Tests set their own.
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        os.environ.pop(name, None)


@pytest.fixture(autouse=True, scope="session")
def _quiet_logs() -> None:
    configure_logging("json", "error")


def _stray_signal(signum: int, frame: object) -> None:
    # lbd's tests start real lbd processes and signal them by PID (SIGHUP reload, SIGUSR2
    # restart). A signal that reaches the test runner itself instead would end it silently
    # (their default action is to terminate); it is reported here rather than obeyed.
    name = signal.Signals(signum).name
    print(f"\n[conftest] the test runner received {name}; ignored", file=sys.stderr, flush=True)


@pytest.fixture(autouse=True, scope="session")
def _runner_survives_stray_signals() -> None:
    # A Python-level handler, not SIG_IGN: children exec'd from here get the default back.
    for signum in (signal.SIGHUP, signal.SIGUSR2, signal.SIGUSR1):
        signal.signal(signum, _stray_signal)
