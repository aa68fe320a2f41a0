"""The admin API over real sockets: read-only views, explain reasons, overrides, auth, errors."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import socket
import stat
from pathlib import Path
from typing import Any

import pytest

from lbd.admin.client import AdminTarget, call
from lbd.admin.health import STUCK_AFTER_S
from lbd.admin.server import AdminError, AdminServer
from lbd.config import load_text
from lbd.runtime.reload import Reloader
from lbd.runtime.runtime import Runtime
from tests.support import (
    admin_running,
    config,
    dead_port,
    document,
    echo_backend,
    echo_backends,
    fresh_ip,
    read_name,
    service_yaml,
    udp_client,
    udp_echo_backend,
    until,
)

TOKEN = "s3cret-token"


def two_endpoints(backends: list[tuple[str, int, Any]], extra: str = "") -> str:
    (h0, p0, _), (h1, p1, _) = backends[:2]
    return document(service_yaml("svc", [(h0, p0), (h1, p1)]), admin=extra)


async def post(target: AdminTarget, path: str, token: str | None = TOKEN, **params: str) -> Any:
    return await call(target, path, params, method="POST", token=token)


def token_admin(tmp_path: Path) -> str:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    return f"{{address: {fresh_ip()}:0, tokenFile: {token_file}}}"


async def test_healthz_and_readyz_follow_the_runtime() -> None:
    cfg = config(document(service_yaml("svc", [])))
    runtime = Runtime(cfg)
    admin = AdminServer(cfg.admin, runtime)
    await admin.start()
    try:
        target = AdminTarget(address=admin.bound)
        code, body = await call(target, "/healthz")
        assert (code, body["status"]) == (503, "not serving")  # not started yet
        assert await call(target, "/readyz") == (503, {"status": "not ready"})
        await runtime.start()
        assert await call(target, "/readyz") == (200, {"status": "ready"})
        code, body = await call(target, "/healthz")
        assert (code, body["status"], body["lastReload"]) == (200, "ok", None)
        assert body["lastUpdated"].endswith("Z") and body["currentTime"] >= body["lastUpdated"]
        runtime.stop_accepting()
        assert (await call(target, "/readyz"))[0] == 503
        assert (await call(target, "/healthz"))[0] == 503  # shutting down
    finally:
        runtime.stop_accepting()
        await admin.stop()


async def test_services_shows_listeners_endpoints_and_state() -> None:
    async with echo_backends(2) as backends:
        async with admin_running(config(two_endpoints(backends))) as (runtime, target):
            host, port = runtime.listener_for("default/svc").bound
            assert await read_name(host, port) in ("backend-0", "backend-1")
            code, body = await call(target, "/services")
    assert code == 200
    [route] = body["services"]
    assert route["service"] == "default/svc" and route["port"] == "0"
    assert route["listeners"] == [
        {"kind": "clusterIP", "protocol": "TCP", "address": f"{host}:{port}"}
    ]
    assert route["connections"]["total"] == 1
    endpoints = {e["endpoint"]: e for e in route["endpoints"]}
    assert set(endpoints) == {f"{h}:{p}" for h, p, _ in backends}
    assert sum(e["total"] for e in endpoints.values()) == 1
    for endpoint in endpoints.values():
        assert endpoint["state"] == "eligible" and endpoint["eligible"] is True
        assert endpoint["weight"] == endpoint["configWeight"] == 1
        assert endpoint["override"] is None
        assert endpoint["health"] == "unchecked" and endpoint["ejected"] is False


async def test_services_counts_refusals_by_reason() -> None:
    async with echo_backend("b") as (bh, bp, _):
        text = document(service_yaml("svc", [(bh, bp)], extra="    maxConnections: 1\n"))
        async with admin_running(config(text)) as (runtime, target):
            host, port = runtime.listener_for("default/svc").bound
            reader, writer = await asyncio.open_connection(host, port)
            try:
                assert await asyncio.wait_for(reader.readline(), 5) == b"b\n"
                try:
                    refused_reader, refused = await asyncio.open_connection(host, port)
                except ConnectionResetError:
                    pass  # over maxConnections: reset before the client's connect completed
                else:
                    with contextlib.suppress(ConnectionError):  # over maxConnections: reset
                        assert await asyncio.wait_for(refused_reader.read(), 5) == b""
                    refused.close()
                code, body = await call(target, "/services")
            finally:
                writer.close()
    assert code == 200
    connections = body["services"][0]["connections"]
    assert (connections["refused"], connections["refusedBy"]) == (1, {"overflow": 1})


async def test_services_shows_a_udp_ports_sessions() -> None:
    async with udp_echo_backend("u") as (bh, bp, _):
        text = document(
            service_yaml("svc", [(bh, bp)], protocol="UDP", extra="    maxUdpSessions: 1\n")
        )
        async with admin_running(config(text)) as (runtime, target):
            address = runtime.listener_for("default/svc").bound
            async with udp_client(address) as first, udp_client(address) as second:
                assert await first.ask(b"x") == b"u x"
                second.send(b"y")  # beyond maxUdpSessions: dropped, counted
                route = runtime.listener_for("default/svc").route
                await until(lambda: route.stats.udp_sess_dropped_total.overflow == 1)
                code, body = await call(target, "/services")
    assert code == 200
    sessions = body["services"][0]["sessions"]
    assert sessions == {"active": 1, "total": 1, "max": 1, "droppedBy": {"overflow": 1}}


async def test_services_shows_what_the_health_checks_say() -> None:
    dead_host = fresh_ip()
    async with echo_backend("live") as (live_host, live_port, _):
        dead = (dead_host, dead_port(dead_host))
        check = "    healthCheck: {interval: 100ms, timeout: 100ms, unhealthyThreshold: 1}\n"
        text = document(service_yaml("svc", [(live_host, live_port), dead], extra=check))
        async with admin_running(config(text)) as (runtime, target):
            pool = runtime.listener_for("default/svc").route.pool
            await until(lambda: sum(m.healthy for m in pool.members) == 1, what="a verdict")
            code, body = await call(target, "/services")
    assert code == 200
    endpoints = {e["endpoint"]: e for e in body["services"][0]["endpoints"]}
    assert endpoints[f"{live_host}:{live_port}"]["health"] == "healthy"
    gone = endpoints[f"{dead[0]}:{dead[1]}"]
    assert (gone["health"], gone["state"], gone["eligible"]) == ("unhealthy", "unhealthy", False)


async def test_explain_gives_each_reason(tmp_path: Path) -> None:
    async with echo_backends(4) as backends:
        (h0, p0, _), (h1, p1, _), (h2, p2, _), (h3, p3, _) = backends
        text = document(
            "  - name: svc\n"
            f"    clusterIP: {fresh_ip()}\n"
            "    ports: [{name: http, port: 0, targetPort: p}]\n"
            "    endpoints:\n"
            f"      - {{address: {h0}, ports: {{p: {p0}}}}}\n"
            f"      - {{address: {h1}, ports: {{p: {p1}}}, weight: 0}}\n"
            f"      - {{address: {h2}, ports: {{p: {p2}}}}}\n"
            f"      - {{address: {h3}, ports: {{p: {p3}}}}}\n",
            admin=token_admin(tmp_path),
        )
        async with admin_running(config(text)) as (runtime, target):
            route = runtime.listener_for("default/svc").route
            # Draining: removed by a reload while a connection to it is still open.
            held = next(m for m in route.pool.members if m.address == h3)
            route.pool.acquire(held)
            route.pool.update([(h0, p0, 1), (h1, p1, 0), (h2, p2, 1)])
            code, _ = await post(target, "/endpoints/drain", service="svc", endpoint=h2)
            assert code == 200
            code, body = await call(
                target,
                "/explain",
                {"service": "default/svc", "port": "http", "client": "127.0.0.9"},
            )
            route.pool.release(held)
            code_after, after = await call(target, "/explain", {"service": "svc"})
    assert code == 200 and code_after == 200
    assert body["client"] == "127.0.0.9" and body["strategy"] == "round-robin"
    assert body["eligible"] == [f"{h0}:{p0}"]
    reasons = {e["endpoint"]: (e["eligible"], e["reason"]) for e in body["endpoints"]}
    assert reasons == {
        f"{h0}:{p0}": (True, None),
        f"{h1}:{p1}": (False, "weight_zero"),
        f"{h2}:{p2}": (False, "admin_drained"),
        f"{h3}:{p3}": (False, "draining"),
    }
    assert all(e["detail"] for e in body["endpoints"] if not e["eligible"])
    # The draining endpoint is gone once its last connection ended.
    assert f"{h3}:{p3}" not in {e["endpoint"] for e in after["endpoints"]}


async def test_explain_errors_name_what_is_wrong() -> None:
    async with admin_running(config(document(service_yaml("svc", [])))) as (_, target):
        assert await call(target, "/explain", {"service": "nope"}) == (
            404,
            {"error": "no service default/nope", "status": 404},
        )
        code, body = await call(target, "/explain", {"service": "svc", "port": "9"})
        assert (code, body["error"]) == (404, "service default/svc has no port 9")
        code, body = await call(target, "/explain", {"service": "svc", "client": "me"})
        assert (code, body["error"]) == (400, "client must be an IP address, got 'me'")
        code, body = await call(target, "/explain")
        assert code == 400 and "service is required" in body["error"]


async def test_drain_enable_and_weight_overrides_steer_traffic(tmp_path: Path) -> None:
    async with echo_backends(2) as backends:
        (h0, p0, _), (h1, p1, _) = backends
        cfg = config(two_endpoints(backends, token_admin(tmp_path)))
        async with admin_running(cfg) as (runtime, target):
            host, port = runtime.listener_for("default/svc").bound
            code, body = await post(
                target, "/endpoints/drain", service="svc", endpoint=f"{h0}:{p0}"
            )
            assert code == 200 and body["changed"][0]["endpoints"][0]["state"] == "admin_drained"
            names = {await read_name(host, port) for _ in range(6)}
            assert names == {"backend-1"}

            assert (await post(target, "/endpoints/enable", service="svc", endpoint=h0))[0] == 200
            code, _ = await post(
                target, "/endpoints/weight", service="svc", endpoint=h1, weight="0"
            )
            assert code == 200
            names = {await read_name(host, port) for _ in range(6)}
            assert names == {"backend-0"}

            _, view = await call(target, "/services")
            endpoints = {e["endpoint"]: e for e in view["services"][0]["endpoints"]}
            assert endpoints[f"{h1}:{p1}"]["override"] == {"weight": 0}
            assert endpoints[f"{h1}:{p1}"]["configWeight"] == 1
            assert endpoints[f"{h1}:{p1}"]["state"] == "weight_zero"
            assert endpoints[f"{h0}:{p0}"]["override"] is None

            code, body = await post(
                target, "/endpoints/weight", service="svc", endpoint=h1, weight="x"
            )
            assert (code, body["error"]) == (
                400,
                "weight must be a whole number or 'config', got 'x'",
            )
            code, body = await post(target, "/endpoints/drain", service="svc", endpoint="127.0.0.1")
            assert code == 404 and "no endpoint 127.0.0.1" in body["error"]


async def test_a_reload_that_changes_an_endpoint_clears_its_override(tmp_path: Path) -> None:
    async with echo_backends(2) as backends:
        (h0, p0, _), (h1, p1, _) = backends
        cfg = config(two_endpoints(backends, token_admin(tmp_path)))
        async with admin_running(cfg) as (runtime, target):
            for address in (h0, h1):
                await post(target, "/endpoints/weight", service="svc", endpoint=address, weight="7")
            pool = runtime.listener_for("default/svc").route.pool
            pool.update([(h0, p0, 1), (h1, p1, 3)])  # what a reload does: h1's weight changed
            _, view = await call(target, "/services")
    endpoints = {e["address"]: e for e in view["services"][0]["endpoints"]}
    assert endpoints[h0]["override"] == {"weight": 7} and endpoints[h0]["weight"] == 7
    assert endpoints[h1]["override"] is None and endpoints[h1]["weight"] == 3


async def test_mutations_need_the_token(tmp_path: Path) -> None:
    cfg = config(document(service_yaml("svc", []), admin=token_admin(tmp_path)))
    async with admin_running(cfg) as (_, target):
        for token in (None, "wrong"):
            code, body = await post(target, "/endpoints/drain", token=token, service="svc")
            assert (code, body) == (401, {"error": "missing or wrong bearer token", "status": 401})
        # Authorized, but no config file to reload in this test.
        code, body = await post(target, "/reload")
        assert code == 501


async def test_without_a_token_file_tcp_mutations_are_refused() -> None:
    async with admin_running(config(document(service_yaml("svc", [])))) as (_, target):
        code, body = await post(target, "/reload", token="anything")
    assert code == 401 and "tokenFile" in body["error"]


async def test_wrong_method_and_unknown_paths_get_json_errors() -> None:
    async with admin_running(config(document(service_yaml("svc", [])))) as (_, target):
        assert await call(target, "/reload") == (
            405,
            {"error": "Method Not Allowed", "status": 405},
        )
        assert (await call(target, "/metrics", method="POST"))[0] == 405
        assert await call(target, "/nope") == (404, {"error": "Not Found", "status": 404})


async def test_reload_hook_reports_its_result(tmp_path: Path) -> None:
    calls: list[str] = []

    async def reload() -> tuple[int, dict[str, Any]]:
        calls.append("reload")
        return 200, {"ok": True}

    cfg = config(document(service_yaml("svc", []), admin=token_admin(tmp_path)))
    async with admin_running(cfg, reload) as (_, target):
        assert await post(target, "/reload") == (200, {"ok": True})
    assert calls == ["reload"]


async def test_unix_socket_is_0600_and_trusted(tmp_path: Path) -> None:
    path = tmp_path / "admin.sock"
    async with echo_backends(2) as backends:
        cfg = config(two_endpoints(backends, f"{{socket: {path}}}"))
        async with admin_running(cfg) as (_, target):
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
            assert (await call(target, "/healthz"))[0] == 200
            code, _ = await post(
                target, "/endpoints/drain", token=None, service="svc", endpoint=backends[0][0]
            )
            assert code == 200
    assert not path.exists()


async def test_admin_is_loopback_only_by_default() -> None:
    default = load_text("apiVersion: lbd/v1\nservices: []\n").admin
    assert (default.enabled, default.address, default.port) == (True, "127.0.0.1", 9180)
    runtime = Runtime(load_text("apiVersion: lbd/v1\nservices: []\n"))
    # The default address with port 0, so parallel test runs do not fight over 9180.
    admin = AdminServer(dataclasses.replace(default, port=0), runtime)
    await admin.start()
    try:
        host, port = admin.bound.rsplit(":", 1)
        assert host == "127.0.0.1"
        # Bound to 127.0.0.1 itself, not a wildcard: another address of this host refuses.
        with pytest.raises(ConnectionRefusedError):
            await asyncio.wait_for(asyncio.open_connection(fresh_ip(), int(port)), 5)
    finally:
        await admin.stop()


async def test_config_is_the_effective_config_and_loads_back(tmp_path: Path) -> None:
    text = document(
        "  - name: web\n"
        "    type: NodePort\n"
        f"    clusterIP: {fresh_ip()}\n"
        "    ports: [{name: http, port: 0, targetPort: 8080}]\n"
        "    endpoints: [127.0.1.2]\n",
        node=f"{{addresses: [{fresh_ip()}]}}",
        admin=token_admin(tmp_path),
    )
    cfg = config(text)
    async with admin_running(cfg) as (_, target):
        code, body = await call(target, "/config")
    assert code == 200
    assert body["services"][0]["ports"][0]["nodePort"] == cfg.services[0].ports[0].node_port
    assert TOKEN not in json.dumps(body)
    again = load_text(json.dumps(body))
    assert dataclasses.replace(again, admin=cfg.admin) == cfg


async def test_start_errors_name_the_config_key(tmp_path: Path) -> None:
    runtime = Runtime(config(document(service_yaml("svc", []))))
    missing = load_text(
        f"apiVersion: lbd/v1\nadmin: {{address: {fresh_ip()}:0, tokenFile: {tmp_path / 'none'}}}\n"
    )
    with pytest.raises(AdminError, match=r"admin\.tokenFile: cannot read"):
        await AdminServer(missing.admin, runtime).start()
    with socket.socket() as taken:
        taken.bind((fresh_ip(), 0))
        taken.listen()
        host, port = taken.getsockname()
        busy = load_text(f"apiVersion: lbd/v1\nadmin: {{address: '{host}:{port}'}}\n")
        with pytest.raises(AdminError, match=r"admin\.address: cannot bind"):
            await AdminServer(busy.admin, runtime).start()


async def test_connection_id_links_error_and_access_logs() -> None:
    import logging

    import structlog

    from tests.support import dead_port

    dead_host = fresh_ip()
    async with echo_backend("b") as (bh, bp, _):
        text = document(
            service_yaml("svc", [(dead_host, dead_port(dead_host)), (bh, bp)]),
            defaults="{accessLog: true}",
        )
        structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.INFO))
        try:
            with structlog.testing.capture_logs() as logs:
                async with admin_running(config(text)) as (runtime, _):
                    host, port = runtime.listener_for("default/svc").bound
                    for _ in range(8):
                        assert await read_name(host, port) == "b"
                    await asyncio.wait_for(runtime.connections.wait_empty(), 5)
        finally:
            structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    failed = [e for e in logs if e["event"] == "upstream connect failed"]
    closed = {e["connection"]: e for e in logs if e["event"] == "connection closed"}
    # Round-robin over a dead and a live endpoint: half the connections tried the dead one
    # first; the warning is logged once a second per endpoint, the rest counted as skipped.
    assert len(closed) == 8 and failed
    assert len(failed) + sum(e["similar_lines_skipped"] for e in failed) <= 4
    for event in failed:
        assert closed[event["connection"]]["endpoint"] == f"{bh}:{bp}"


async def test_healthz_reports_a_failed_reload_but_stays_200(tmp_path: Path) -> None:
    """A bad config file must not make a liveness probe restart lbd: the failure is in the
    body, lbd keeps serving its last good config, and the status stays 200."""
    path = tmp_path / "lbd.yaml"
    good = document(service_yaml("svc", []))
    path.write_text(good)
    cfg = config(good)
    async with admin_running(cfg) as (runtime, target):
        reloader = Reloader(runtime, str(path), good.encode())
        path.write_text(good.replace("round-robin", "round-robbin"))
        assert (await reloader.reload("test")).outcome == "failed"
        code, body = await call(target, "/healthz")
        assert (code, body["status"]) == (200, "ok")
        assert body["lastReload"]["outcome"] == "failed"
        assert "round-robbin" in body["lastReload"]["problems"][0]
        runtime.reloads.begin()  # a reload under way for longer than any may take:
        assert runtime.reloads.started is not None
        runtime.reloads.started -= STUCK_AFTER_S + 1
        code, body = await call(target, "/healthz")
        assert (code, body["status"]) == (503, "stuck")
