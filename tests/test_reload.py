"""Hot reload: apply in place, change nothing on failure, drain what was removed."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from lbd.process.worker import ShutdownState, serve
from lbd.runtime.reload import Reloader
from lbd.runtime.runtime import ListenerError, Runtime
from tests.support import (
    address_of,
    config,
    document,
    echo_backend,
    echo_backends,
    fresh_ip,
    read_name,
    route_of,
    running,
    service_yaml,
)


def svc(backends: list[tuple[str, int]], cluster_ip: str, **kw: str) -> str:
    return service_yaml("svc", backends, cluster_ip=cluster_ip, **kw)


async def test_identical_config_is_a_no_op() -> None:
    async with echo_backends(3) as backends:
        ip = fresh_ip()
        text = document(svc([(h, p) for h, p, _ in backends], ip))
        async with running(config(text)) as runtime:
            listener = next(iter(runtime.listeners.values()))
            sock_before, route_before = listener.sock, route_of(runtime)
            host, port = address_of(runtime)
            first = [await read_name(host, port) for _ in range(2)]
            diff = await runtime.apply(config(text))
            assert diff.empty
            # Same socket, same route object, rotation and counters carry on.
            assert listener.sock is sock_before and route_of(runtime) is route_before
            assert route_before.stats.downstream_cx_total == 2
            then = [await read_name(host, port) for _ in range(1)]
    assert len(set(first + then)) == 3  # the third pick continues the rotation


async def test_changed_endpoints_apply_in_place_and_keep_the_socket() -> None:
    async with echo_backends(3) as backends:
        ip = fresh_ip()
        (a, b, c) = [(h, p) for h, p, _ in backends]
        async with running(config(document(svc([a, b], ip)))) as runtime:
            listener = next(iter(runtime.listeners.values()))
            fd = listener.sock.fileno()
            await runtime.apply(config(document(svc([c], ip))))
            assert next(iter(runtime.listeners.values())) is listener
            assert listener.sock.fileno() == fd
            host, port = address_of(runtime)
            assert {await read_name(host, port) for _ in range(5)} == {"backend-2"}


async def test_added_service_binds_and_removed_service_closes() -> None:
    async with echo_backend("one") as (h, p, _):
        ip1, ip2 = fresh_ip(), fresh_ip()
        first = service_yaml("first", [(h, p)], cluster_ip=ip1)
        second = service_yaml("second", [(h, p)], cluster_ip=ip2)
        async with running(config(document(first))) as runtime:
            await runtime.apply(config(document(first, second)))
            second_addr = address_of(runtime, "default/second")
            assert await read_name(*second_addr) == "one"
            await runtime.apply(config(document(first)))
            with pytest.raises(ConnectionRefusedError):
                await asyncio.open_connection(*second_addr)
            assert await read_name(*address_of(runtime, "default/first")) == "one"


async def test_failed_apply_changes_nothing() -> None:
    busy_ip = fresh_ip()
    blocker = await asyncio.start_server(lambda r, w: None, busy_ip, 0)
    busy_port = blocker.sockets[0].getsockname()[1]
    try:
        async with echo_backends(2) as backends:
            (a, b) = [(h, p) for h, p, _ in backends]
            ip = fresh_ip()
            old = document(svc([a], ip))
            async with running(config(old)) as runtime:
                routes_before = dict(runtime.routes)
                listeners_before = dict(runtime.listeners)
                new = document(
                    svc([b], ip),  # an endpoint change that must NOT apply ...
                    service_yaml(
                        "other", [b], cluster_ip=busy_ip, port=busy_port
                    ),  # ... as this fails
                )
                with pytest.raises(ListenerError, match="Address already in use"):
                    await runtime.apply(config(new))
                assert runtime.routes == routes_before and runtime.listeners == listeners_before
                assert [m.address for m in route_of(runtime).pool.members] == [a[0]]
                assert await read_name(*address_of(runtime)) == "backend-0"
                assert runtime.process.listener_bind_failures_total == 1
    finally:
        blocker.close()


async def test_listener_moved_to_another_service_keeps_its_socket() -> None:
    async with echo_backends(2) as backends:
        (a, b) = [(h, p) for h, p, _ in backends]
        ip = fresh_ip()  # a fresh address, so a fixed port cannot collide
        old = service_yaml("old", [a], cluster_ip=ip, port=18080)
        async with running(config(document(old))) as runtime:
            [listener] = runtime.listeners.values()
            assert await read_name(ip, 18080) == "backend-0"
            new = service_yaml("new", [b], cluster_ip=ip, port=18080)
            diff = await runtime.apply(config(document(new)))
            assert len(diff.listeners_repointed) == 1 and not diff.listeners_added
            assert list(runtime.listeners.values()) == [listener]  # same socket, new service
            assert await read_name(ip, 18080) == "backend-1"


async def test_removed_endpoint_drains_until_drain_timeout() -> None:
    async with echo_backends(2) as backends:
        (a, b) = [(h, p) for h, p, _ in backends]
        ip = fresh_ip()
        defaults = "{drainTimeout: 600ms}"
        async with running(config(document(svc([a], ip), defaults=defaults))) as runtime:
            host, port = address_of(runtime)
            reader, writer = await asyncio.open_connection(host, port)
            assert (await reader.readline()).strip() == b"backend-0"
            await runtime.apply(config(document(svc([b], ip), defaults=defaults)))
            started = time.monotonic()
            # The old connection keeps flowing for a while ...
            writer.write(b"still here")
            assert await asyncio.wait_for(reader.readexactly(10), 1) == b"still here"
            # ... new connections never reach the removed endpoint ...
            assert {await read_name(host, port) for _ in range(4)} == {"backend-1"}
            # ... and it is closed at the drain deadline.
            assert await asyncio.wait_for(reader.read(), 3) == b""
            assert 0.4 < time.monotonic() - started < 1.5
            writer.close()


async def test_endpoint_added_back_before_the_deadline_stops_draining() -> None:
    async with echo_backends(2) as backends:
        (a, b) = [(h, p) for h, p, _ in backends]
        ip = fresh_ip()
        defaults = "{drainTimeout: 300ms}"
        async with running(config(document(svc([a], ip), defaults=defaults))) as runtime:
            reader, writer = await asyncio.open_connection(*address_of(runtime))
            await reader.readline()
            await runtime.apply(config(document(svc([b], ip), defaults=defaults)))
            await runtime.apply(config(document(svc([a, b], ip), defaults=defaults)))
            endpoint = next(m for m in route_of(runtime).pool.members if m.address == a[0])
            assert endpoint.active == 1  # the same endpoint object came back, with its count
            await asyncio.sleep(0.5)  # past the first deadline: must still be open
            writer.write(b"ok")
            assert await asyncio.wait_for(reader.readexactly(2), 1) == b"ok"
            writer.close()


# -- through the file: Reloader and the watcher ---------------------------------------------


@contextlib.asynccontextmanager
async def serving_file(path: Path, watch: bool) -> AsyncIterator[Runtime]:
    state = ShutdownState()
    started: asyncio.Future[Runtime] = asyncio.get_running_loop().create_future()

    async def ready(runtime: Runtime) -> None:
        started.set_result(runtime)

    data = path.read_bytes()
    task = asyncio.create_task(
        serve(
            config(data.decode()), source=(str(path), data), watch=watch, ready=ready, state=state
        )
    )
    try:
        yield await asyncio.wait_for(started, 10)
    finally:
        state.should_exit.set()
        state.force_exit.set()
        assert await asyncio.wait_for(task, 10) == 0


async def test_50_reloads_under_load_lose_nothing(tmp_path: Path) -> None:
    async with echo_backends(3) as backends:
        (a, b, c) = [(h, p) for h, p, _ in backends]
        ip, other_ip = fresh_ip(), fresh_ip()
        path = tmp_path / "lbd.yaml"
        defaults = "{drainTimeout: 1h}"
        sets = [[a, b], [b, c]]
        other = service_yaml("unrelated", [a], cluster_ip=other_ip)
        texts = [
            document(svc(sets[i % 2], ip), *([other] if i % 4 < 2 else []), defaults=defaults)
            for i in range(51)
        ]
        path.write_text(texts[0])
        async with serving_file(path, watch=False) as runtime:
            host, port = address_of(runtime)
            reloader = Reloader(runtime, str(path), texts[0].encode())
            stop = asyncio.Event()
            failures: list[str] = []
            short_done = Counter[str]()

            async def short_connections() -> None:
                while not stop.is_set():
                    try:
                        short_done[await read_name(host, port, timeout=3)] += 1
                    except (OSError, TimeoutError) as error:
                        failures.append(f"short: {error!r}")

            async def long_lived(i: int) -> None:
                reader, writer = await asyncio.open_connection(host, port)
                await reader.readline()
                n = 0
                while not stop.is_set():
                    chunk = f"{i}:{n};".encode()
                    writer.write(chunk)
                    try:
                        echoed = await asyncio.wait_for(reader.readexactly(len(chunk)), 3)
                    except (OSError, TimeoutError, asyncio.IncompleteReadError) as error:
                        failures.append(f"long {i}: {error!r}")
                        return
                    if echoed != chunk:
                        failures.append(f"long {i}: corrupted {echoed!r}")
                    n += 1
                    await asyncio.sleep(0.05)
                writer.close()

            workers = [asyncio.create_task(short_connections())]
            workers += [asyncio.create_task(long_lived(i)) for i in range(20)]
            for text in texts[1:]:
                path.write_text(text)
                result = await reloader.reload("test")
                assert result.outcome == "applied", result.problems
                await asyncio.sleep(0.02)
            stop.set()
            await asyncio.wait_for(asyncio.gather(*workers), 10)
            assert failures == []
            assert runtime.process.config_reloads_total.success == 50
            assert sum(short_done.values()) > 50
            final = {await read_name(host, port) for _ in range(10)}
            assert final == {"backend-0", "backend-1"}  # texts[50] uses sets[0] = [a, b]


async def test_bad_files_are_rejected_and_traffic_continues(tmp_path: Path) -> None:
    busy_ip = fresh_ip()
    blocker = await asyncio.start_server(lambda r, w: None, busy_ip, 0)
    busy_port = blocker.sockets[0].getsockname()[1]
    async with echo_backend("alive") as (h, p, _):
        ip = fresh_ip()
        path = tmp_path / "lbd.yaml"
        good = document(svc([(h, p)], ip))
        path.write_text(good)
        async with serving_file(path, watch=False) as runtime:
            reloader = Reloader(runtime, str(path), good.encode())
            host, port = address_of(runtime)
            port_in_use = service_yaml("other", [(h, p)], cluster_ip=busy_ip, port=busy_port)
            bad_files = [
                "",
                "apiVersion: lbd/v1\nservices: [\n",
                good.replace("round-robin", "round-robbin"),
                good.replace("apiVersion: lbd/v1", "apiVersion: v2"),
                document(svc([(h, p)], ip), port_in_use),  # valid, but cannot be applied
            ]
            for n, bad in enumerate(bad_files, start=1):
                path.write_text(bad)
                result = await reloader.reload("test")
                assert result.outcome == "failed" and result.problems
                assert runtime.process.config_reloads_total.failure == n
                assert await read_name(host, port) == "alive"
            path.unlink()
            assert (await reloader.reload("test")).problems[0].endswith("No such file or directory")
            path.write_text(good.replace("round-robin", "random"))
            assert (await reloader.reload("test")).outcome == "applied"
            assert route_of(runtime).tunables.strategy == "random"
            assert len(runtime.listeners) == 1  # nothing of the failed reloads was left bound
    blocker.close()
