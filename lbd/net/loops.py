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


def rearm_reader(loop: asyncio.AbstractEventLoop, fd: int, callback: Callable[[], None]) -> None:
    """Register ``callback`` for ``fd`` afresh after a wakeup that did not read it dry.

    A level-triggered reader would fire again by itself, but uvloop (libuv's uv_poll) delivers
    a socket error (POLLERR: a TCP peer reset, a unix peer closed with bytes unread) to a reader
    once and then drops the reader, leaving a dead registration behind. Bytes still queued ahead
    of the error would then never be read, nor the error seen. Removing first clears that dead
    registration; on a live one it costs two cheap calls.
    """
    loop.remove_reader(fd)
    loop.add_reader(fd, callback)
