from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping

import pytest
import uvloop

from lbd.observability.logging import configure_logging

# Data-path tests run on both loops: uvloop is what lbd runs by default, asyncio is the
# fallback (--loop asyncio) and behaves differently around pause_reading and closed transports.
BOTH_LOOPS_MODULES = {"test_tcp_proxy", "test_udp_proxy"}


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    module = item.module.__name__.rsplit(".", 1)[-1] if item.module else ""  # type: ignore[attr-defined]
    if module in BOTH_LOOPS_MODULES:
        return {"uvloop": uvloop.new_event_loop, "asyncio": asyncio.new_event_loop}
    return {"uvloop": uvloop.new_event_loop}


@pytest.fixture(autouse=True, scope="session")
def _quiet_logs() -> None:
    configure_logging("json", "error")
