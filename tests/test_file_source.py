"""The config file watcher (``lbd.sources.file``): it sees an editor's save and a ConfigMap's
symlink swap, follows the file when the swap moves it, and nothing else in the directory."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

from lbd.sources.file import resolution, watch_config
from tests.support import address_of, document, echo_backends, fresh_ip, read_name, until
from tests.test_reload import serving_file, svc


def kubelet_update(directory: Path, name: str, text: str, stamp: str) -> None:
    """What the kubelet's AtomicWriter does to update a ConfigMap volume: the new files in a new
    timestamped directory, a ``..data_tmp`` symlink to it renamed over ``..data`` (the atomic
    step), then the old timestamped directory removed."""
    old = os.readlink(directory / "..data") if (directory / "..data").is_symlink() else None
    fresh = directory / f"..{stamp}"
    fresh.mkdir()
    (fresh / name).write_text(text)
    (directory / "..data_tmp").symlink_to(fresh.name)
    os.rename(directory / "..data_tmp", directory / "..data")
    if not (directory / name).is_symlink():
        (directory / name).symlink_to(f"..data/{name}")
    if old is not None:
        for child in (directory / old).iterdir():
            child.unlink()
        (directory / old).rmdir()


def test_resolution_follows_a_configmap_layout(tmp_path: Path) -> None:
    kubelet_update(tmp_path, "config.yaml", "x", "2026_11_26_01")
    base = os.path.realpath(tmp_path)
    assert resolution(tmp_path / "config.yaml") == [
        f"{base}/config.yaml",
        f"{base}/..data",
        f"{base}/..2026_11_26_01/config.yaml",
    ]
    plain = tmp_path / "plain.yaml"
    plain.write_text("x")
    assert resolution(plain) == [f"{base}/plain.yaml"]
    elsewhere = tmp_path / "sub"
    elsewhere.mkdir()
    (elsewhere / "real.yaml").write_text("x")
    (tmp_path / "link.yaml").symlink_to(elsewhere / "real.yaml")
    assert resolution(tmp_path / "link.yaml") == [f"{base}/link.yaml", f"{base}/sub/real.yaml"]


async def test_file_watcher_picks_up_an_editor_style_write_once(tmp_path: Path) -> None:
    async with echo_backends(2) as backends:
        (a, b) = [(h, p) for h, p, _ in backends]
        ip = fresh_ip()
        path = tmp_path / "lbd.yaml"
        path.write_text(document(svc([a], ip)))
        async with serving_file(path, watch=True) as runtime:  # watching once it serves
            started = time.monotonic()
            with open(path, "w") as handle:  # truncate, then write: an editor's save
                handle.write(document(svc([b], ip)))
            await until(
                lambda: runtime.process.config_reloads_total.success == 1, what="one reload"
            )
            latency = time.monotonic() - started
            await asyncio.sleep(0.4)  # the burst window: nothing more may follow
            assert runtime.process.config_reloads_total.success == 1
            assert runtime.process.config_reloads_total.failure == 0
            assert {await read_name(*address_of(runtime)) for _ in range(3)} == {"backend-1"}
    assert latency < 1.0


async def test_configmap_swaps_reload_within_a_second_each(tmp_path: Path) -> None:
    async with echo_backends(3) as backends:
        names = [(h, p) for h, p, _ in backends]
        ip = fresh_ip()
        kubelet_update(tmp_path, "config.yaml", document(svc([names[0]], ip)), "2026_11_26_01")
        async with serving_file(tmp_path / "config.yaml", watch=True) as runtime:
            for n, stamp in ((1, "2026_11_26_02"), (2, "2026_11_26_03")):
                started = time.monotonic()
                kubelet_update(tmp_path, "config.yaml", document(svc([names[n]], ip)), stamp)
                await until(
                    lambda n=n: runtime.process.config_reloads_total.success == n,  # type: ignore[misc]
                    what=f"reload {n} after the swap",
                )
                assert time.monotonic() - started < 1.0
                assert {await read_name(*address_of(runtime)) for _ in range(3)} == {f"backend-{n}"}


async def test_other_files_in_the_directory_cause_no_reload(tmp_path: Path) -> None:
    async with echo_backends(2) as backends:
        (a, b) = [(h, p) for h, p, _ in backends]
        ip = fresh_ip()
        path = tmp_path / "lbd.yaml"
        path.write_text(document(svc([a], ip)))
        async with serving_file(path, watch=True) as runtime:
            log = tmp_path / "lbd.log"
            for n in range(100):
                with open(log, "a") as handle:
                    handle.write(f"line {n}\n")
            (tmp_path / "other.yaml").write_text("not: lbd's\n")
            path.write_text(document(svc([b], ip)))  # then one change that counts
            await until(lambda: runtime.process.config_reloads_total.success == 1)
            process = runtime.process
            assert (process.reloads_unchanged, process.config_reloads_total.failure) == (0, 0)


async def test_the_watch_is_in_place_when_ready_is_set(tmp_path: Path) -> None:
    path = tmp_path / "lbd.yaml"
    path.write_text("x")
    changes: list[float] = []
    stop, ready = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(watch_config(path, lambda: changes.append(1), stop, ready))
    try:
        await asyncio.wait_for(ready.wait(), 5)
        path.write_text("y")  # written at once: the watch must already see it
        await until(lambda: bool(changes), what="the change")
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
