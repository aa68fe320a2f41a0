"""lbd as people run it: real processes, real signals, real sockets."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import pytest

from tests.procs import lbd_process, run_cli
from tests.support import (
    dead_port,
    document,
    echo_backend,
    echo_backends,
    fresh_ip,
    read_name,
    service_yaml,
)

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, text: str, name: str = "lbd.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


async def test_check_good_config_prints_a_summary(tmp_path: Path) -> None:
    path = write(tmp_path, document(service_yaml("svc", [("127.0.0.1", 8080)])))
    code, out, err = await run_cli("check", str(path))
    assert code == 0, err
    assert (
        out
        == f"{path}: ok: 1 service, 1 port, 1 listener, 1 endpoint (node {out.split('node ')[1]}"
    )
    assert err == ""


@pytest.mark.parametrize("example", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
async def test_shipped_configs_are_valid(example: Path) -> None:
    code, _, err = await run_cli("check", str(example))
    assert code == 0, err


async def test_check_bad_config_lists_every_problem_and_exits_1(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "apiVersion: lbd/v1\nservices:\n"
        "  - name: web\n    clusterIP: 127.96.0.10\n    ports: [{port: 80, targetPort: htp}]\n"
        "    endpoints: [{address: 127.0.1.2, ports: {http: 8080}}]\n"
        "    strategy: fastest\n    maxConnections: 0\n",
    )
    code, out, err = await run_cli("check", str(path))
    assert code == 1 and out == "", err
    assert err.splitlines() == [
        f"{path}: 2 problems",
        "services[0].strategy: must be one of random, round-robin, least-connection, maglev, source-hash, got 'fastest'",
        "services[0].maxConnections: must be between 1 and 10000000, got 0",
    ]
    assert "Traceback" not in err


async def test_check_warns_of_a_port_no_endpoint_serves_and_exits_0(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "apiVersion: lbd/v1\nservices:\n"
        "  - name: web\n    clusterIP: 127.96.0.10\n    ports: [{port: 80, targetPort: htp}]\n"
        "    endpoints: [{address: 127.0.1.2, ports: {http: 8080}}]\n",
    )
    code, out, err = await run_cli("check", str(path))
    assert code == 0 and out.startswith(f"{path}: ok: 1 service"), err
    assert err.splitlines() == [
        f'{path}: warning: default/web port 80: no endpoint has a port named "htp"; '
        "connections to it are refused"
    ]


@pytest.mark.parametrize(
    "content", ["", "[1, 2", "\x00\xff binary", "apiVersion: lbd/v1\nservices: 5\n"]
)
async def test_run_refuses_bad_input_with_the_same_messages_as_check(
    tmp_path: Path, content: str
) -> None:
    path = write(tmp_path, content)
    check_code, _, check_err = await run_cli("check", str(path))
    run_code, _, run_err = await run_cli("run", str(path))
    assert check_code == run_code == 1
    assert run_err == check_err and "Traceback" not in run_err


async def test_run_missing_file(tmp_path: Path) -> None:
    code, _, err = await run_cli("run", str(tmp_path / "missing.yaml"))
    assert code == 1
    assert "cannot read: No such file or directory" in err


async def test_run_exits_3_when_a_listener_cannot_bind(tmp_path: Path) -> None:
    host = fresh_ip()
    blocker = await asyncio.start_server(lambda r, w: None, host, 0)
    port = blocker.sockets[0].getsockname()[1]
    try:
        path = write(
            tmp_path,
            document(
                service_yaml("svc", [], cluster_ip=host, port=port).replace(
                    "targetPort: p", "targetPort: 9"
                )
            ),
        )
        code, _, err = await run_cli("run", str(path))
    finally:
        blocker.close()
    assert code == 3
    assert (
        f"cannot bind TCP {host}:{port} (clusterIP of default/svc): Address already in use" in err
    )


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
async def test_run_serves_logs_listeners_and_stops_cleanly_on_sigterm(
    tmp_path: Path, loop: str
) -> None:
    async with echo_backend("b1") as (bh, bp, _):
        path = write(
            tmp_path, document(service_yaml("svc", [(bh, bp)]), defaults="{accessLog: true}")
        )
        async with lbd_process(path, "--loop", loop) as lbd:
            await lbd.wait_event("lbd started")
            host, port = lbd.listener()
            assert await read_name(host, port) == "b1"
            access = await lbd.wait_event("connection closed")
            assert access["service"] == "default/svc" and access["endpoint"] == f"{bh}:{bp}"
            assert access["bytes_sent"] == 3 and access["end"] in ("completed", "client_closed")
            assert access["client"] == "127.0.0.1"
            lbd.signal(signal.SIGTERM)
            assert await lbd.wait_exit() == 0
            await lbd.wait_event("lbd stopped")


async def test_sigterm_drains_open_connections_then_exits(tmp_path: Path) -> None:
    async with echo_backend("") as (bh, bp, _):
        path = write(
            tmp_path, document(service_yaml("svc", [(bh, bp)]), defaults="{drainTimeout: 10s}")
        )
        async with lbd_process(path) as lbd:
            await lbd.wait_event("lbd started")
            host, port = lbd.listener()
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(b"before")
            assert await asyncio.wait_for(reader.readexactly(6), 5) == b"before"
            lbd.signal(signal.SIGTERM)
            await lbd.wait_event("shutdown: draining")
            # New connections are refused; the open one keeps flowing.
            with pytest.raises(ConnectionRefusedError):
                await asyncio.open_connection(host, port)
            writer.write(b"during")
            assert await asyncio.wait_for(reader.readexactly(6), 5) == b"during"
            writer.close()
            started = time.monotonic()
            assert await lbd.wait_exit() == 0
            assert time.monotonic() - started < 2  # exits as soon as the last one is done


async def test_drain_timeout_closes_what_is_left(tmp_path: Path) -> None:
    async with echo_backend("") as (bh, bp, _):
        path = write(
            tmp_path, document(service_yaml("svc", [(bh, bp)]), defaults="{drainTimeout: 500ms}")
        )
        async with lbd_process(path) as lbd:
            await lbd.wait_event("lbd started")
            reader, writer = await asyncio.open_connection(*lbd.listener())
            writer.write(b"x")
            await asyncio.wait_for(reader.readexactly(1), 5)
            started = time.monotonic()
            lbd.signal(signal.SIGTERM)
            assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by lbd at the deadline
            assert 0.4 < time.monotonic() - started < 2
            assert await lbd.wait_exit() == 0
            writer.close()


async def test_second_signal_exits_at_once(tmp_path: Path) -> None:
    async with echo_backend("") as (bh, bp, _):
        path = write(
            tmp_path, document(service_yaml("svc", [(bh, bp)]), defaults="{drainTimeout: 1h}")
        )
        async with lbd_process(path) as lbd:
            await lbd.wait_event("lbd started")
            reader, writer = await asyncio.open_connection(*lbd.listener())
            writer.write(b"x")
            await asyncio.wait_for(reader.readexactly(1), 5)
            lbd.signal(signal.SIGINT)
            await lbd.wait_event("shutdown: draining")
            lbd.signal(signal.SIGINT)
            assert await lbd.wait_exit(timeout=3) == 0
            writer.close()


async def test_demo_once_prints_a_distribution_per_strategy() -> None:
    code, out, err = await run_cli(
        "demo", "--once", "--connections", "60", "--log-level", "warning"
    )
    assert code == 0, err
    table = out[out.index("strategy") :]
    for row in ("random", "round-robin", "least-connection", "NodePort (rr)"):
        line = next(line for line in table.splitlines() if line.startswith(row))
        counts = [int(cell.split("(")[0]) for cell in line[len(row) :].split(")") if cell.strip()]
        assert sum(counts) == 60, line
    assert "error" not in table
    assert "curl http://127.96.0.2:8080/" in out


async def test_lbd_reload_sends_sighup_via_the_pid_file(tmp_path: Path) -> None:
    async with echo_backend("old") as (h1, p1, _), echo_backend("new") as (h2, p2, _):
        ip = fresh_ip()
        path = write(tmp_path, document(service_yaml("svc", [(h1, p1)], cluster_ip=ip)))
        pid_file = tmp_path / "lbd.pid"
        async with lbd_process(path, "--pid-file", str(pid_file), "--no-watch") as lbd:
            await lbd.wait_event("lbd started")
            host, port = lbd.listener()
            assert int(pid_file.read_text()) == lbd.process.pid
            assert await read_name(host, port) == "old"
            path.write_text(document(service_yaml("svc", [(h2, p2)], cluster_ip=ip)))
            code, out, err = await run_cli("reload", "--pid-file", str(pid_file))
            assert code == 0, err
            assert out == f"lbd reload: sent SIGHUP to {lbd.process.pid}\n"
            event = await lbd.wait_event("config reloaded")
            assert event["reason"] == "SIGHUP" and event["endpoints_added"] == 1
            assert event["endpoints_draining"] == 1 and isinstance(event["duration_ms"], float)
            assert await read_name(host, port) == "new"
            path.write_text("apiVersion: lbd/v1\nservices: [{name: svc}]\n")
            lbd.signal(signal.SIGHUP)
            failed = await lbd.wait_event("config reload failed, keeping the running config")
            assert failed["problems"] == [
                "services[0].ports: at least one port is required",
                "services[0].clusterIP: required",
            ]
            assert await read_name(host, port) == "new"
            lbd.signal(signal.SIGTERM)
            assert await lbd.wait_exit() == 0
        assert not pid_file.exists()


async def test_reload_with_a_missing_pid_file_fails_cleanly(tmp_path: Path) -> None:
    code, _, err = await run_cli("reload", "--pid-file", str(tmp_path / "nope.pid"))
    assert code == 3
    assert "cannot signal the process" in err and "Traceback" not in err


async def test_check_diff_previews_a_reload(tmp_path: Path) -> None:
    running = write(
        tmp_path,
        document(
            service_yaml(
                "web", [("127.0.1.1", 8080), ("127.0.1.2", 8080)], cluster_ip="127.96.0.10", port=80
            ),
            service_yaml("db", [("127.0.2.1", 5432)], cluster_ip="127.96.0.11", port=5432),
        ),
        "running.yaml",
    )
    new = write(
        tmp_path,
        document(
            service_yaml(
                "web", [("127.0.1.2", 8080), ("127.0.1.3", 8080)], cluster_ip="127.96.0.10", port=80
            )
        ),
        "new.yaml",
    )
    code, out, err = await run_cli("check", str(running), "--diff", str(new))
    assert code == 0, err
    assert out.splitlines() == [
        "- listener TCP 127.96.0.11:5432 (clusterIP of default/db:5432)",
        "- service port default/db:5432: 1 endpoints start draining",
        "+ endpoint 127.0.1.3:8080 of default/web:80",
        "- endpoint 127.0.1.1:8080 of default/web:80 (starts draining)",
        f"{new}: ok: 0 listeners added, 1 removed, 0 re-pointed; 1 endpoint added, "
        "2 would start draining",
    ]
    code, out, _ = await run_cli("check", str(new), "--diff", str(new))
    assert code == 0
    assert out == f"{new}: ok: a reload from {new} would change nothing\n"


async def test_status_and_explain_against_a_running_lbd(tmp_path: Path) -> None:
    async with echo_backend("b1") as (bh, bp, _):
        path = write(tmp_path, document(service_yaml("svc", [(bh, bp)])))
        async with lbd_process(path) as lbd:
            started = await lbd.wait_event("lbd started")
            admin = str(started["admin"])
            host, port = lbd.listener()
            assert await read_name(host, port) == "b1"

            code, out, err = await run_cli("status", "--admin", admin)
            assert code == 0, err
            header, row = out.splitlines()
            assert header.split() == [
                "SERVICE", "PORT", "LISTENERS", "ENDPOINT", "STATE", "WEIGHT", "ACTIVE", "TOTAL", "CX/S"
            ]  # fmt: skip
            assert row.split() == [
                "default/svc", "0", f"{host}:{port}", "clusterIP", f"{bh}:{bp}", "eligible", "1", "0", "1", "-"
            ]  # fmt: skip

            code, out, err = await run_cli(
                "status", "--admin", admin, "--watch", "--count", "2", "--interval", "0.2"
            )
            assert code == 0, err
            tables = out.split("\n\n")
            assert len(tables) == 2 and tables[1].splitlines()[1].split()[-1] == "0.0"

            code, out, err = await run_cli(
                "explain", "svc", "--client", "127.0.0.9", "--admin", admin
            )
            assert code == 0, err
            assert out.splitlines() == [
                "default/svc port 0 (round-robin), client 127.0.0.9:",
                f"  {bh}:{bp}  eligible",
                "1 of 1 endpoints eligible",
            ]
            code, out, err = await run_cli("explain", "nope", "--admin", admin)
            assert (code, out) == (4, "")
            assert err.strip() == "lbd explain: /explain: 404 no service default/nope"
            lbd.signal(signal.SIGTERM)
            assert await lbd.wait_exit() == 0


async def test_endpoint_drain_weight_and_enable_against_a_running_lbd(tmp_path: Path) -> None:
    """`lbd endpoint`: the admin API's POST calls from the command line, with the token from
    the config (HAProxy's `set server ... state drain` and `weight`)."""
    token_file = tmp_path / "token"
    token_file.write_text("cli-token\n")
    token_file.chmod(0o600)
    async with echo_backends(2) as backends:
        (h0, p0, _), (h1, p1, _) = backends
        admin_host = fresh_ip()  # a fresh address: its port is free once dead_port closes it
        admin = f"{{address: {admin_host}:{dead_port(admin_host)}, tokenFile: {token_file}}}"
        path = write(tmp_path, document(service_yaml("svc", [(h0, p0), (h1, p1)]), admin=admin))
        async with lbd_process(path) as lbd:
            await lbd.wait_event("lbd started")
            host, port = lbd.listener()
            code, out, err = await run_cli("endpoint", "drain", "svc", h0, "--config", str(path))
            assert code == 0, err
            assert out.splitlines() == [f"default/svc port 0: {h0}:{p0} admin_drained, weight 1"]
            assert {await read_name(host, port) for _ in range(4)} == {"backend-1"}

            code, out, err = await run_cli(
                "endpoint", "weight", "svc", f"{h1}:{p1}", "7", "--config", str(path)
            )
            assert (code, out.split()[-2:]) == (0, ["7", "(override)"]), err
            code, _, err = await run_cli("endpoint", "enable", "svc", h0, "--config", str(path))
            assert code == 0, err
            assert "backend-0" in {await read_name(host, port) for _ in range(16)}

            # Refusals: a wrong token, an unknown endpoint, a weight out of range, usage.
            bad = tmp_path / "bad-token"
            bad.write_text("wrong\n")
            bad.chmod(0o600)
            argv = ("--config", str(path), "--token-file", str(bad))
            code, _, err = await run_cli("endpoint", "drain", "svc", h0, *argv)
            assert code == 1 and "401 missing or wrong bearer token" in err
            code, _, err = await run_cli(
                "endpoint", "drain", "svc", "127.0.0.1", "--config", str(path)
            )
            assert code == 1 and "404" in err
            code, _, err = await run_cli(
                "endpoint", "weight", "svc", h0, "-1", "--config", str(path)
            )
            assert code == 1 and "weight must be between 0 and 1000000" in err
            code, _, err = await run_cli("endpoint", "weight", "svc", h0, "--config", str(path))
            assert code == 2 and "a weight is given with 'weight', and only with it" in err
            lbd.signal(signal.SIGTERM)
            assert await lbd.wait_exit() == 0


async def test_status_reads_the_admin_address_from_the_config(tmp_path: Path) -> None:
    socket_path = tmp_path / "admin.sock"
    path = write(tmp_path, document(service_yaml("svc", []), admin=f"{{socket: {socket_path}}}"))
    async with lbd_process(path) as lbd:
        await lbd.wait_event("lbd started")
        code, out, err = await run_cli("status", "--config", str(path))
        assert code == 0, err
        assert "(no endpoints)" in out
        lbd.signal(signal.SIGTERM)
        assert await lbd.wait_exit() == 0
    code, _, err = await run_cli("status", "--config", str(path))
    assert code == 4 and f"no lbd admin API at unix:{socket_path}" in err


async def test_admin_that_cannot_bind_stops_the_start(tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind((fresh_ip(), 0))
        taken.listen()
        host, port = taken.getsockname()
        path = write(
            tmp_path, document(service_yaml("svc", []), admin=f"{{address: '{host}:{port}'}}")
        )
        code, _, err = await run_cli("run", str(path))
    assert code == 3
    assert (
        err.splitlines()[-1]
        == f"{path}: admin.address: cannot bind {host}:{port}: Address already in use"
    )


async def test_reload_over_the_admin_api_checks_the_file(tmp_path: Path) -> None:
    import aiohttp

    token = tmp_path / "token"
    token.write_text("t0ken\n")
    token.chmod(0o600)
    admin = f"{{address: '{fresh_ip()}:0', tokenFile: {token}}}"
    ip = fresh_ip()
    path = write(tmp_path, document(service_yaml("svc", [], cluster_ip=ip), admin=admin))
    async with lbd_process(path) as lbd:
        base = f"http://{(await lbd.wait_event('lbd started'))['admin']}"
        auth = {"Authorization": "Bearer t0ken"}
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{base}/reload") as response:
                assert response.status == 401
            path.write_text(
                document(service_yaml("svc", [], cluster_ip=ip), admin=admin)
                + "    connectTimeout: soon\n"
            )
            async with session.post(f"{base}/reload", headers=auth) as response:
                assert response.status == 422
                body = await response.json()
            assert [p.split(":")[0] for p in body["problems"]] == ["services[0].connectTimeout"], (
                body
            )
            async with session.get(f"{base}/metrics") as response:
                assert 'lbd_config_reloads_total{result="failure"} 1.0' in await response.text()
            async with echo_backend("b") as (bh, bp, _):
                path.write_text(
                    document(service_yaml("svc", [(bh, bp)], cluster_ip=ip), admin=admin)
                )
                async with session.post(f"{base}/reload", headers=auth) as response:
                    assert response.status == 200
                    body = await response.json()
                assert body["outcome"] == "applied" and body["changes"]["endpoints_added"] == 1
                assert await read_name(*lbd.listener()) == "b"
                async with session.post(f"{base}/reload", headers=auth) as response:
                    assert (await response.json())["outcome"] == "unchanged"
            async with session.get(f"{base}/metrics") as response:
                assert 'lbd_config_reloads_total{result="success"} 1.0' in await response.text()
        lbd.signal(signal.SIGTERM)
        assert await lbd.wait_exit() == 0


@pytest.mark.parametrize("content", ["0", "-1", "1", "not a pid"])
async def test_reload_refuses_a_pid_file_that_would_signal_a_group(
    tmp_path: Path, content: str
) -> None:
    pid_file = tmp_path / "lbd.pid"
    pid_file.write_text(content)
    code, _, err = await run_cli("reload", "--pid-file", str(pid_file))
    assert code == 3
    assert "cannot signal the process" in err


@pytest.mark.parametrize("command", ["reload", "restart"])
async def test_reload_and_restart_refuse_a_pid_file_naming_another_program(
    tmp_path: Path, command: str
) -> None:
    """A stale pid file whose pid now belongs to another program: signalling it would end that
    program (SIGHUP's and SIGUSR2's default action) and reload nothing."""
    other = await asyncio.create_subprocess_exec("sleep", "60")
    try:
        pid_file = tmp_path / "lbd.pid"
        pid_file.write_text(f"{other.pid}\n")
        code, out, err = await run_cli(command, "--pid-file", str(pid_file))
        assert code == 3 and out == "", err
        assert f"process {other.pid} is not an lbd" in err and "Traceback" not in err
        assert other.returncode is None
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(asyncio.shield(other.wait()), 0.2)  # and it still runs
    finally:
        other.kill()  # our own child, by PID
        await other.wait()


async def test_reload_refuses_a_pid_file_naming_an_exited_process(tmp_path: Path) -> None:
    gone = await asyncio.create_subprocess_exec("true")
    await gone.wait()
    pid_file = tmp_path / "lbd.pid"
    pid_file.write_text(f"{gone.pid}\n")
    code, _, err = await run_cli("reload", "--pid-file", str(pid_file))
    assert code == 3 and f"no process {gone.pid} runs" in err, err
