"""Watch a config file for changes and ask for a reload: the file, and only the file.

The directory is watched, not the file: editors write a new file and rename it over the old
one, and Kubernetes mounts a ConfigMap as ``config.yaml -> ..data/config.yaml`` with ``..data``
a symlink swapped to a new timestamped directory; neither changes the inode a file watch holds.
Only events on the paths a lookup of the config path goes through count (``resolution``: the
path, each symlink on the way, and the file it resolves to), so a log file or anything else
written beside the config never triggers a reload. After each relevant change the resolution
is computed again, and the watch moves if the file now lives in another directory.

watchfiles groups a burst of events (it yields after ``QUIET_MS`` without new ones), and the
reloader skips bytes it has already seen, so an editor's truncate-then-write or a ConfigMap
swap triggers one reload, not several.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable
from pathlib import Path

import structlog
import watchfiles

log = structlog.get_logger("lbd.watcher")

QUIET_MS = 50  # a burst ends after this long without events
MAX_BURST_MS = 400  # ... or after this long in any case: reloads land well within a second
MAX_LINKS = 40  # as the kernel's ELOOP limit


def resolution(path: str | Path) -> list[str]:
    """The paths whose change can change what ``path`` names: ``path`` itself, every symlink a
    lookup goes through below its directory (``..data`` for a ConfigMap), and the final file.
    The directories above the config's own are taken as they resolve now."""
    directory = os.path.realpath(os.path.dirname(os.path.abspath(path)))
    current = os.path.join(directory, os.path.basename(path))
    chain: list[str] = []
    for _ in range(MAX_LINKS):
        link = _first_link(current, directory)
        if link is None:
            break
        chain.append(link)
        rest = os.path.relpath(current, link)
        target = os.path.join(os.path.dirname(link), os.readlink(link))
        current = os.path.normpath(target if rest == "." else os.path.join(target, rest))
        directory = os.path.dirname(link)
    chain.append(current)
    return list(dict.fromkeys(chain))


def _first_link(path: str, below: str) -> str | None:
    """The shortest prefix of ``path`` under ``below`` (or ``path`` itself) that is a symlink."""
    parts = Path(os.path.relpath(path, below)).parts
    if parts and parts[0] == "..":  # outside the directory: look at the path itself only
        return path if os.path.islink(path) else None
    for depth in range(1, len(parts) + 1):
        prefix = os.path.join(below, *parts[:depth])
        if os.path.islink(prefix):
            return prefix
    return None


async def watch_config(
    path: str | Path,
    on_change: Callable[[], None],
    stop: asyncio.Event,
    ready: asyncio.Event | None = None,
) -> None:
    """Call ``on_change`` after every burst of changes to the config until ``stop``;
    ``ready`` is set once the first watch is in place (a write after it is seen)."""
    while not stop.is_set():
        relevant = set(resolution(path))
        directories = sorted({os.path.dirname(p) for p in relevant})
        log.info("watching config", path=str(path), directories=directories)
        moved = await _watch(path, directories, relevant, on_change, stop, ready)
        ready = None
        if not moved:
            return


async def _watch(
    path: str | Path,
    directories: list[str],
    relevant: set[str],
    on_change: Callable[[], None],
    stop: asyncio.Event,
    ready: asyncio.Event | None,
) -> bool:
    """Watch ``directories`` for changes to ``relevant`` paths until ``stop`` (then False),
    or until the config resolves into another directory (then True: watch again there)."""
    done = asyncio.Event()  # this watch's own end, so a move can stop it without ``stop``
    forward = asyncio.ensure_future(_set_when(stop, done))
    watcher = watchfiles.awatch(
        *directories,
        stop_event=done,
        debounce=MAX_BURST_MS,
        step=QUIET_MS,
        recursive=False,  # the ConfigMap swap renames ..data in this directory itself
        ignore_permission_denied=True,
        watch_filter=lambda _change, changed: changed in relevant,
    )
    try:
        batch = asyncio.ensure_future(anext(watcher, None))
        # Its first step created the inotify watches, synchronously, before it awaits.
        await asyncio.sleep(0)
        if ready is not None:
            ready.set()
        while await batch is not None:
            on_change()
            now = set(resolution(path))
            if now != relevant:
                if not {os.path.dirname(p) for p in now} <= set(directories):
                    return True
                relevant.clear()  # the filter holds this set: it sees the new one at once
                relevant.update(now)
            batch = asyncio.ensure_future(anext(watcher, None))
        return False
    finally:
        done.set()
        forward.cancel()
        with contextlib.suppress(RuntimeError, StopAsyncIteration):
            await watcher.aclose()


async def _set_when(source: asyncio.Event, target: asyncio.Event) -> None:
    await source.wait()
    target.set()
