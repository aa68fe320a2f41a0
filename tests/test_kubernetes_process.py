"""``lbd run --kubernetes`` as people run it: a real lbd process, its kubeconfig pointing at the
fake API server of this test, real traffic to loopback backends."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from tests import kubeobjects as k
from tests.kubeapi import FakeApiServer, fake_api_server, kubeconfig
from tests.kubelbd import NODE, same_port_backends
from tests.procs import lbd_process, run_cli
from tests.support import echo_backend, fresh_ip, read_name
from tests.test_sdnotify import notify_socket

pytestmark = pytest.mark.slow
SERVICE_PORT = 8080


def files(tmp_path: Path, api: FakeApiServer, extra: str = "") -> tuple[Path, Path]:
    config, kube = tmp_path / "lbd.yaml", tmp_path / "kubeconfig"
    kube.write_text(kubeconfig(api))
    config.write_text(
        f"apiVersion: lbd/v1\nsource: kubernetes\nnode: {{name: {NODE}}}\n"
        f"admin: {{address: '{fresh_ip()}:0'}}\n{extra}"
    )
    return config, kube


def cluster(api: FakeApiServer, count: int, hosts: list[str], port: int) -> list[str]:
    """``count`` services with one slice each, every backend an endpoint; their clusterIPs."""
    ips = [fresh_ip() for _ in range(count)]
    api.put(k.node(NODE, [fresh_ip()]))
    for index, ip in enumerate(ips):
        name = f"svc-{index}"
        api.put(
            k.service(name, ip, [{"name": "http", "port": SERVICE_PORT, "targetPort": "http"}]),
            k.endpoint_slice(f"{name}-1", name, hosts, [{"name": "http", "port": port}]),
        )
    return ips


async def first_answer(address: str, want: str, timeout: float = 10.0) -> float:
    """Seconds until a connection to ``address`` is answered by ``want``."""
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        try:
            if await read_name(address, SERVICE_PORT, 1.0) == want:
                return time.perf_counter() - start
        except OSError:
            pass
        await asyncio.sleep(0.005)
    raise AssertionError(f"{address} not answered by {want} within {timeout}s")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


async def test_1000_services_with_10_endpoints_each(tmp_path: Path) -> None:
    async with same_port_backends(10) as (hosts, port), fake_api_server() as api:
        ips = cluster(api, 1000, hosts, port)
        config, kube = files(tmp_path, api)
        started = time.perf_counter()
        async with lbd_process(config, "--kubeconfig", str(kube)) as lbd:
            ready = await lbd.wait_event("kubernetes state applied; ready", timeout=60)
            synced_s = time.perf_counter() - started
            [reload] = [e for e in lbd.events if e.get("event") == "config reloaded"]
            memory = rss_mib(lbd.process.pid)
            assert ready["services"] == 1000
            for ip in (ips[0], ips[500], ips[-1]):
                assert (await read_name(ip, SERVICE_PORT)).startswith("backend-")
            async with echo_backend("new") as (new_host, new_port, _):
                moved = k.endpoint_slice("svc-500-1", "svc-500", [new_host], [])
                moved["ports"] = [{"name": "http", "port": new_port, "protocol": "TCP"}]
                api.put(moved)
                latency = await first_answer(ips[500], "new")
            lbd.signal()
            assert await lbd.wait_exit(30) == 0
        print(
            f"\n1000 services x 10 endpoints: start to applied {synced_s:.2f} s "
            f"(the apply itself {reload['duration_ms']} ms), lbd RSS {memory:.0f} MiB; "
            f"one slice change to first connection served {latency * 1000:.0f} ms"
        )
        assert latency < 3.0


async def test_with_workers_every_worker_applies_the_same_state(tmp_path: Path) -> None:
    async with (
        same_port_backends(2) as (hosts, port),
        echo_backend("new") as (new_host, new_port, _),
        fake_api_server() as api,
    ):
        [ip] = cluster(api, 1, hosts, port)
        config, kube = files(tmp_path, api, "workers: 2\n")
        async with lbd_process(config, "--kubeconfig", str(kube)) as lbd:
            await lbd.wait_event("kubernetes state applied; ready", timeout=30)
            assert (await read_name(ip, SERVICE_PORT)).startswith("backend-")
            moved = k.endpoint_slice("svc-0-1", "svc-0", [new_host], [])
            moved["ports"] = [{"name": "http", "port": new_port, "protocol": "TCP"}]
            api.put(moved)
            await first_answer(ip, "new")
            # connections land on either worker: every one of them must have applied it
            assert {await read_name(ip, SERVICE_PORT) for _ in range(20)} == {"new"}
            reloads = [e for e in lbd.events if e.get("event") == "config reloaded"]
            assert {e.get("worker") for e in reloads} >= {0, 1}


async def test_run_kubernetes_refuses_what_it_cannot_use(tmp_path: Path) -> None:
    code, _, err = await run_cli("run", "--kubernetes", "--kubeconfig", str(tmp_path / "none"))
    assert code == 3 and "lbd run --kubernetes: cannot use" in err, err
    code, _, err = await run_cli("run")
    assert code == 2 and "give a config file, or --kubernetes" in err, err
    code, _, err = await run_cli("run", "--kubernetes", "--allowed-service-ips", "10.0.0.0/33")
    assert code == 1 and "--allowed-service-ips: expected a CIDR" in err, err
    config = tmp_path / "lbd.yaml"
    config.write_text("apiVersion: lbd/v1\nsource: kubernetes\nservices: []\n")
    code, _, err = await run_cli("run", str(config))
    assert code == 1 and "services: with source: kubernetes" in err, err


async def test_under_systemd_ready_waits_for_the_first_sync(tmp_path: Path) -> None:
    async with same_port_backends(1) as (hosts, port), fake_api_server() as api:
        [ip] = cluster(api, 1, hosts, port)
        api.held["Node"] = asyncio.Event()  # nothing can be applied yet
        config, kube = files(tmp_path, api)
        address = str(tmp_path / "notify")
        async with notify_socket(address) as systemd:
            env = {"NOTIFY_SOCKET": address}
            async with lbd_process(config, "--kubeconfig", str(kube), env=env) as lbd:
                await lbd.wait_event("lbd started")
                await asyncio.sleep(0.3)  # a while with lists answered but Node's held
                systemd.read()
                assert systemd.matching("READY=1") == []  # serving nothing yet: not ready
                api.held["Node"].set()
                await systemd.wait_for("READY=1")
                assert (await read_name(ip, SERVICE_PORT)).startswith("backend-")
