"""Event loop choice: config word → loop factory, in one table (uvloop unless told)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Literal

import uvloop

LoopName = Literal["uvloop", "asyncio"]

LOOP_FACTORIES: dict[LoopName, Callable[[], asyncio.AbstractEventLoop]] = {
    "uvloop": uvloop.new_event_loop,
    "asyncio": asyncio.new_event_loop,
}
