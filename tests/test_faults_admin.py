"""Faults at runtime: ``GET/POST/DELETE /faults`` (behind the token), ``lbd fault``, ``lbd
status``; switching on and off takes effect for the next connection, byte or datagram; runtime
faults survive reloads that keep their port; several workers all take them."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path
from typing import Any

import pytest

from lbd.admin.client import AdminTarget, call
from tests.procs import lbd_process, run_cli
from tests.support import (
    address_of,
    admin_running,
    config,
    document,
    echo_backend,
    read_name,
    route_of,
    service_yaml,
    udp_client,
    udp_echo_backend,
    until,
)
from tests.test_admin import TOKEN, token_admin
from tests.test_faults_tcp import round_trips
from tests.test_supervisor import with_workers, write

CONFIG_FAULT = "    faults: [{type: latency, latency: 1s, probability: 0}]\n"  # never applies


async def add(target: AdminTarget, token: str | None = TOKEN, **fault: Any) -> tuple[int, Any]:
    return await call(target, "/faults", None, "POST", token, {"service": "svc", **fault})


async def remove(target: AdminTarget, fault_id: str, token: str | None = TOKEN) -> tuple[int, Any]:
    return await call(target, f"/faults/{fault_id}", None, "DELETE", token)


async def test_add_list_and_remove_faults_over_the_admin_api(tmp_path: Path) -> None:
    async with echo_backend() as (host, port, _):
        text = document(
            service_yaml("svc", [(host, port)], extra=CONFIG_FAULT), admin=token_admin(tmp_path)
        )
        async with admin_running(config(text)) as (runtime, target):
            assert (await add(target, None, type="latency", latency="100ms"))[0] == 401
            assert (await remove(target, "f1", None))[0] == 401
            code, body = await add(target, type="latency")
            assert (code, body["error"]) == (400, "latency: required by a latency fault")
            code, body = await add(target, type="drop")
            assert (code, body["error"]) == (400, "type: drop does not act on a TCP port")
            code, body = await call(target, "/faults", None, "POST", TOKEN, {"service": "nope"})
            assert (code, body["error"]) == (404, "no service default/nope")
            code, body = await call(target, "/faults", None, "POST", TOKEN, [1])  # type: ignore[arg-type]
            assert code == 400 and "JSON object" in body["error"]

            code, added = await add(target, type="latency", latency="100ms", namespace="default")
            assert code == 200, added
            assert added["origin"] == "runtime" and added["latency"] == 0.1
            assert added["direction"] == "downstream" and added["port"] == "0"
            code, listing = await call(target, "/faults")
            assert [f["origin"] for f in listing["faults"]] == ["config", "runtime"]
            assert (await round_trips(runtime, 1))[0] >= 0.099  # the next connection takes it

            config_id = listing["faults"][0]["id"]
            code, body = await remove(target, config_id)
            assert code == 400 and "config file" in body["error"]
            assert (await remove(target, "f-nope"))[0] == 404
            code, body = await remove(target, added["id"])
            assert code == 200 and body["removed"][0]["applied"] == 1
            assert (await round_trips(runtime, 1))[0] < 0.05
            text = (await call_metrics(target)).splitlines()
    assert 'lbd_fault_changes_total{action="added"} 1.0' in text
    assert 'lbd_fault_changes_total{action="removed"} 1.0' in text
    assert any(line.startswith("lbd_fault_applied_total{") for line in text)


async def call_metrics(target: AdminTarget) -> str:
    import aiohttp

    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://{target.address}/metrics") as response:
            return await response.text()


async def test_removing_a_fault_takes_effect_for_the_next_byte(tmp_path: Path) -> None:
    async with echo_backend() as (host, port, _):
        text = document(service_yaml("svc", [(host, port)]), admin=token_admin(tmp_path))
        async with admin_running(config(text)) as (runtime, target):
            code, added = await add(target, type="latency", latency="150ms", direction="both")
            assert code == 200
            loop = asyncio.get_running_loop()
            reader, writer = await asyncio.open_connection(*address_of(runtime))
            started = loop.time()
            writer.write(b"ping")
            await asyncio.wait_for(reader.readexactly(4), 5)
            assert loop.time() - started >= 0.299  # 150 ms each way
            assert (await remove(target, added["id"]))[0] == 200
            started = loop.time()
            writer.write(b"pong")  # the same connection: no delay any more
            await asyncio.wait_for(reader.readexactly(4), 5)
            assert loop.time() - started < 0.05
            writer.close()
            assert route_of(runtime).faults is None  # the port is back to the plain path


async def test_runtime_faults_survive_a_reload_that_keeps_their_port(tmp_path: Path) -> None:
    async with echo_backend() as (host, port, _):
        admin = token_admin(tmp_path)
        svc = service_yaml("svc", [(host, port)], cluster_ip="127.0.0.77")
        other = service_yaml("other", [(host, port)])
        async with admin_running(config(document(svc, admin=admin))) as (runtime, target):
            code, added = await add(target, type="latency", latency="100ms")
            assert code == 200
            changed = svc.replace("round-robin", "random") + "    accessLog: false\n"
            await runtime.apply(config(document(changed, other, admin=admin)))
            code, listing = await call(target, "/faults")
            assert [f["id"] for f in listing["faults"]] == [added["id"]]
            assert (await round_trips(runtime, 1))[0] >= 0.099
            await runtime.apply(config(document(other, admin=admin)))  # the port is gone
            assert (await call(target, "/faults"))[1] == {"faults": []}


async def test_a_udp_fault_switches_for_the_next_datagram_of_an_open_session(
    tmp_path: Path,
) -> None:
    async with udp_echo_backend() as (host, port, backend):
        svc = service_yaml("svc", [(host, port)], protocol="UDP")
        async with admin_running(config(document(svc, admin=token_admin(tmp_path)))) as (
            runtime,
            target,
        ):
            async with udp_client(address_of(runtime)) as client:
                assert await client.ask(b"one") == b"one"
                code, added = await add(target, type="drop", direction="upstream")
                assert code == 200
                client.send(b"two")
                stats = route_of(runtime).fault_book.faults[0].stats
                await until(lambda: stats.fault_applied_total == 1)
                assert (await remove(target, added["id"]))[0] == 200
                assert await client.ask(b"three") == b"three"  # the same session
                assert route_of(runtime).stats.udp_sess_total == 1
    assert backend.datagrams == 2


async def test_lbd_fault_and_lbd_status(tmp_path: Path) -> None:
    async with echo_backend() as (host, port, _):
        admin = token_admin(tmp_path)
        token_file = str(tmp_path / "token")
        async with admin_running(
            config(document(service_yaml("svc", [(host, port)]), admin=admin))
        ) as (
            runtime,
            target,
        ):
            where = ("--admin", str(target.address))
            code, out, err = await run_cli(
                "fault", "add", "svc", "latency", "latency=50ms", "probability=0.5",
                "endpoints=127.0.0.1,127.0.0.2:80", *where, "--token-file", token_file,
            )  # fmt: skip
            assert code == 0, err
            [fault] = route_of(runtime).fault_book.faults
            assert fault.spec.probability == 0.5 and fault.spec.latency == 0.05
            assert fault.id in out and "endpoints=127.0.0.1,127.0.0.2:80" in out
            code, out, _ = await run_cli("fault", "list", *where)
            assert code == 0 and fault.id in out and "latency" in out
            code, out, _ = await run_cli("status", *where)
            assert code == 0 and fault.id in out
            code, _, err = await run_cli("fault", "add", "svc", "latency", "latency=1ms", *where)
            assert code == 1 and "401 missing or wrong bearer token" in err
            code, _, err = await run_cli(
                "fault", "add", "svc", "latency", *where, "--token-file", token_file
            )
            assert code == 1 and "latency: required by a latency fault" in err
            code, out, _ = await run_cli(
                "fault", "remove", fault.id, *where, "--token-file", token_file
            )
            assert code == 0 and fault.id in out
            assert route_of(runtime).faults is None


@pytest.mark.slow
async def test_every_worker_takes_a_fault_and_a_replacement_too(tmp_path: Path) -> None:
    async with echo_backend("b") as (host, port, _):
        socket_path = tmp_path / "admin.sock"
        text = with_workers(
            document(service_yaml("svc", [(host, port)]), admin=f"{{socket: {socket_path}}}")
        )
        async with lbd_process(write(tmp_path, text)) as lbd:
            event = await lbd.wait_event("lbd started", timeout=30)
            assert event["workers"] == 2
            target = AdminTarget(socket=str(socket_path))
            code, added = await add(target, None, type="latency", latency="100ms")
            assert code == 200, added
            listener = lbd.listener()
            loop = asyncio.get_running_loop()

            async def slowest_and_fastest(count: int) -> tuple[float, float]:
                times = []
                for _ in range(count):  # the kernel spreads them over both workers
                    started = loop.time()
                    assert await read_name(*listener) == "b"
                    times.append(loop.time() - started)
                return max(times), min(times)

            assert (await slowest_and_fastest(10))[1] >= 0.099
            pids = [int(str(e["pid"])) for e in lbd.events if e.get("event") == "worker started"]
            os.kill(pids[0], signal.SIGKILL)  # a worker this test started, by its PID
            await lbd.wait_event("worker serving", count=3, timeout=30)
            # The supervisor replays runtime changes once the replacement serves (the moment
            # in between is documented in docs/faults.md).
            await lbd.wait_event("fault added", count=3, timeout=30)
            assert (await slowest_and_fastest(10))[1] >= 0.099  # the replacement took it
            code, listing = await call(target, "/faults")
            assert [f["id"] for f in listing["faults"]] == [added["id"]]
            assert (await remove(target, added["id"], None))[0] == 200
            assert (await slowest_and_fastest(10))[0] < 0.05
            lbd.signal(signal.SIGTERM)
            assert await lbd.wait_exit() == 0
