"""The Kubernetes source under faults and load, against the fake API server: the API server
down and back, a burst of updates, and the in-cluster service account over TLS with a rotated
token."""

from __future__ import annotations

import asyncio
import os
import ssl
import subprocess
from pathlib import Path

import pytest

from lbd.admin.client import call
from tests import kubeobjects as k
from tests.kubeapi import fake_api_server
from tests.kubelbd import NODE, answers, errors, events, kube_lbd, relists, syncs, web, web_cluster
from tests.support import echo_backend, fresh_ip, until


@pytest.mark.slow
async def test_api_server_down_for_10_seconds_keeps_serving_then_catches_up(
    tmp_path: Path,
) -> None:
    async with web_cluster(tmp_path, backoff=(0.1, 1.0)) as cluster:
        api, lbd = cluster.api, cluster.lbd
        synced_at = lbd.stats.last_sync_time
        await api.stop()
        await until(lambda: not lbd.stats.connected)
        cluster.move_to_b()  # a change the watcher cannot see while the server is down
        loop = asyncio.get_running_loop()
        down_until = loop.time() + 10
        while loop.time() < down_until:  # 10 s: lbd serves the last state all along
            await answers(lbd, "default/web", {"a"})
            assert await call(lbd.admin, "/readyz") == (200, {"status": "ready"})
            await asyncio.sleep(1)
        assert lbd.stats.last_sync_time == synced_at  # how stale the state is
        assert lbd.runtime.metrics_snapshot().value("lbd_kubernetes_connected") == 0
        assert errors(lbd.stats) >= 3  # each kind failed, then backed off (capped at 1 s)
        await api.start()
        await answers(lbd, "default/web", {"b"})  # caught up from where it was
        await until(lambda: lbd.stats.connected)
        assert lbd.stats.last_sync_time > synced_at
        assert relists(lbd.stats) == 0  # resumed from its resourceVersion


async def test_a_burst_of_500_slice_updates_is_applied_in_at_most_2_applies(
    tmp_path: Path,
) -> None:
    async with web_cluster(tmp_path, min_sync_period="1s") as cluster:
        api, lbd, endpoints = cluster.api, cluster.lbd, cluster.slice
        await asyncio.sleep(1.1)  # a quiet spell: the first event of the burst applies at once
        before = syncs(lbd.stats)
        for i in range(499):  # zone flips: each one a real change of the slice
            endpoints["endpoints"][0]["zone"] = f"zone-{i % 2}"
            api.put(endpoints)
        cluster.move_to_b()  # the 500th
        await until(lambda: events(lbd.stats, "EndpointSlice", "MODIFIED") == 500, 10)
        await answers(lbd, "default/web", {"b"})
        await asyncio.sleep(1.2)  # a minSyncPeriod for any late apply
        applies = syncs(lbd.stats) - before
        assert 1 <= applies <= 2, lbd.stats.kubernetes_syncs_total


def _certificate(directory: Path, host: str) -> tuple[Path, Path]:
    """A self-signed certificate for ``host`` (an IP), as the cluster CA and server cert."""
    cert, key = directory / "ca.crt", directory / "server.key"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-keyout", str(key), "-out", str(cert), "-subj", "/CN=fake-apiserver",
            "-addext", f"subjectAltName=IP:{host}",
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )  # fmt: skip
    return cert, key


async def test_in_cluster_service_account_over_tls_with_a_rotated_token(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    account = tmp_path / "serviceaccount"
    account.mkdir()
    host = fresh_ip()
    cert, key = _certificate(account, host)
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(cert, key)
    token = account / "token"
    token.write_text("token-1\n")
    async with (
        echo_backend("a") as (ha, pa, _),
        echo_backend("b") as (hb, pb, _),
        fake_api_server(host=host, ssl_context=tls, tokens={"token-1"}) as api,
    ):
        monkeypatch.delenv("KUBECONFIG", raising=False)
        monkeypatch.setenv("KUBERNETES_SERVICE_HOST", host)
        monkeypatch.setenv("KUBERNETES_SERVICE_PORT", str(api.port))
        service, endpoints = web("web", ha, pa)
        api.put(service, endpoints, k.node(NODE, [fresh_ip()]))
        async with kube_lbd(
            api, tmp_path, in_cluster=True, service_account_dir=str(account)
        ) as lbd:
            await answers(lbd, "default/web", {"a"})
            # The kubelet rotates the projected token (a new file swapped in); the old one
            # stops working.
            rotated = account / "token.new"
            rotated.write_text("token-2\n")
            os.replace(rotated, token)
            api.tokens = {"token-2"}
            await until(lambda: len(api.watchers) == 3)
            api.drop_watches()
            endpoints["endpoints"][0]["addresses"] = [hb]
            endpoints["ports"][0]["port"] = pb
            api.put(endpoints)
            await answers(lbd, "default/web", {"b"})
        assert api.tokens_seen == {"token-1", "token-2"}
