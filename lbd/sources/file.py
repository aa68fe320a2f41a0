"""Watch a config file for changes and ask for a reload.

The directory is watched, not the file: editors write a new file and rename it over the old
one, and Kubernetes mounts a ConfigMap as ``config.yaml -> ..data/config.yaml`` with ``..data``
a symlink swapped to a new timestamped directory; neither changes the inode a file watch holds.
watchfiles groups a burst of events (it yields after ``QUIET_MS`` without new ones), and the
worker skips a reload when the file's bytes did not change, so an editor's truncate-then-write
or a ConfigMap swap triggers one reload, not several.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path

import structlog
import watchfiles

log = structlog.get_logger("lbd.watcher")

QUIET_MS = 50  # a burst ends after this long without events
MAX_BURST_MS = 400  # ... or after this long in any case: reloads land well within a second


def config_directory(path: str | Path) -> str:
    return os.path.dirname(os.path.abspath(path))


async def watch_config(
    path: str | Path, on_change: Callable[[], None], stop: asyncio.Event
) -> None:
    """Call ``on_change`` after every burst of changes in the file's directory until ``stop``."""
    directory = config_directory(path)
    log.info("watching config", directory=directory)
    async for _changes in watchfiles.awatch(
        directory,
        stop_event=stop,
        debounce=MAX_BURST_MS,
        step=QUIET_MS,
        recursive=False,  # the ConfigMap swap renames ..data in this directory itself
        ignore_permission_denied=True,
        watch_filter=None,
    ):
        on_change()
