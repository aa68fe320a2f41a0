"""``lbd run --kubernetes`` against a fake API server (tests/kubeapi.py) speaking the real wire
format, through the real kubernetes_asyncio client; real traffic through lbd to loopback
backends shows what was applied. No cluster runs on these machines."""

from __future__ import annotations

import asyncio
from pathlib import Path

from lbd.admin.client import call
from lbd.sources.kube_client import API_CALLS
from tests import kubeobjects as k
from tests.kubeapi import fake_api_server
from tests.kubelbd import (
    HTTP,
    NODE,
    answers,
    errors,
    events,
    kube_lbd,
    refused,
    relists,
    web,
    web_cluster,
)
from tests.support import echo_backend, fresh_ip, read_name, until


async def test_nothing_is_applied_until_every_kind_is_listed_then_it_serves(
    tmp_path: Path,
) -> None:
    async with echo_backend("a") as (host, port, _), fake_api_server() as api:
        api.put(*web("web", host, port), k.node(NODE, [fresh_ip()]))
        api.held["Node"] = asyncio.Event()  # the Node list does not answer yet
        async with kube_lbd(api, tmp_path) as lbd:
            await until(lambda: api.lists["EndpointSlice"] == 1 and api.lists["Service"] == 1)
            await asyncio.sleep(0.2)  # several minSyncPeriods: nothing may be applied
            assert lbd.runtime.config.services == () and not lbd.stats.synced
            assert await call(lbd.admin, "/readyz") == (503, {"status": "not ready"})
            api.held["Node"].set()
            await answers(lbd, "default/web", {"a"})
            assert await call(lbd.admin, "/readyz") == (200, {"status": "ready"})
            assert lbd.stats.connected and lbd.stats.kubernetes_syncs_total.applied >= 1
    # lbd made only the calls it declares (the ClusterRole grants exactly these)
    assert set(api.calls) <= set(API_CALLS) and len(set(api.calls)) == len(API_CALLS)


async def test_services_are_added_updated_and_deleted(tmp_path: Path) -> None:
    async with (
        echo_backend("a") as (ha, pa, _),
        echo_backend("b") as (hb, pb, _),
        fake_api_server() as api,
    ):
        api.put(k.node(NODE, [fresh_ip()]))
        async with kube_lbd(api, tmp_path) as lbd:
            await until(lambda: lbd.stats.synced)
            svc, slice_a = web("web", ha, pa)
            api.put(svc, slice_a)  # added
            await answers(lbd, "default/web", {"a"})
            first = lbd.address("default/web")
            # updated: a second port, served by the same endpoint
            svc["spec"]["ports"] = [*HTTP, {"name": "alt", "port": 0, "targetPort": "alt"}]
            slice_a["ports"].append({"name": "alt", "port": pb, "protocol": "TCP"})
            slice_a["endpoints"][0]["addresses"] = [hb]
            api.put(svc, slice_a)
            await until(lambda: len(lbd.runtime.config.services[0].ports) == 2)
            assert await read_name(*lbd.address("default/web", 1)) == "b"
            assert lbd.address("default/web") == first  # the kept port kept its socket
            api.delete(svc)  # deleted: its listeners close
            await until(lambda: not lbd.has("default/web"))
            assert await refused(first)


async def test_endpoint_slices_are_added_updated_deleted_and_merged(tmp_path: Path) -> None:
    async with web_cluster(tmp_path) as cluster:
        api, lbd, slice_a = cluster.api, cluster.lbd, cluster.slice
        host, port = cluster.b
        slice_b = k.endpoint_slice("web-x2", "web", [host], [{"name": "http", "port": port}])
        api.put(slice_b)  # a second slice: both serve
        await answers(lbd, "default/web", {"a", "b"})
        # updated: a is terminating (still serving); b, ready, takes everything
        slice_a["endpoints"][0]["conditions"] = {
            "ready": False,
            "serving": True,
            "terminating": True,
        }
        api.put(slice_a)
        await answers(lbd, "default/web", {"b"})
        api.delete(slice_b)  # deleted: only the terminating one is left; it serves
        await answers(lbd, "default/web", {"a"})
        assert lbd.stats.network_programming_duration_seconds.counts[-1] == 0  # all under 60 s
        assert sum(lbd.stats.network_programming_duration_seconds.counts) >= 3


async def test_a_slice_moving_to_another_service(tmp_path: Path) -> None:
    async with (
        echo_backend("a") as (ha, pa, _),
        echo_backend("b") as (hb, pb, _),
        fake_api_server() as api,
    ):
        one, slice_a = web("one", ha, pa)
        two, slice_b = web("two", hb, pb)
        api.put(one, two, slice_a, slice_b, k.node(NODE, [fresh_ip()]))
        async with kube_lbd(api, tmp_path) as lbd:
            await answers(lbd, "default/one", {"a"})
            await answers(lbd, "default/two", {"b"})
            slice_a["metadata"]["labels"]["kubernetes.io/service-name"] = "two"
            api.put(slice_a)
            await answers(lbd, "default/two", {"a", "b"})
            assert await refused(lbd.address("default/one"))  # no endpoint left: REJECT


async def test_the_node_object_gives_node_port_addresses_and_zone(tmp_path: Path) -> None:
    async with echo_backend("a") as (ha, pa, _), fake_api_server() as api:
        node_ip, later_ip = fresh_ip(), fresh_ip()
        node = k.node(NODE, [node_ip], zone="zone-1")
        svc, slice_a = web("web", ha, pa, kind="NodePort")
        svc["spec"]["ports"][0]["nodePort"] = 31000 + hash(node_ip) % 700
        api.put(svc, slice_a, node, k.node("node-b", [fresh_ip()]))
        async with kube_lbd(api, tmp_path) as lbd:
            await until(lambda: lbd.stats.synced)
            assert lbd.runtime.config.node.zone == "zone-1"
            assert lbd.address("default/web", 0, "nodePort")[0] == node_ip
            node["status"]["addresses"][0]["address"] = later_ip  # updated
            api.put(node)
            await until(lambda: lbd.runtime.config.node.addresses == (later_ip,))
            host, port = lbd.address("default/web", 0, "nodePort")
            assert host == later_ip and await read_name(host, port) == "a"
            api.delete(node)  # deleted: the addresses fall back to the default
            await until(lambda: lbd.runtime.config.node.addresses == ("0.0.0.0",), 5)


async def test_410_gone_mid_watch_lists_again_and_catches_up(tmp_path: Path) -> None:
    async with web_cluster(tmp_path) as cluster:
        api, lbd = cluster.api, cluster.lbd
        # An ERROR event (410) on the open watch, after a change the history no longer
        # holds: only a new list can see it.
        api.expire()
        cluster.move_to_b()
        api.history.clear()
        await api.send_error("EndpointSlice", 410)
        await answers(lbd, "default/web", {"b"})
        assert relists(lbd.stats, "EndpointSlice") >= 1
        assert events(lbd.stats, "EndpointSlice", "ERROR") == 1
        # A watch that resumes from a compacted version gets HTTP 410: list again too.
        listed = relists(lbd.stats, "Service")
        api.expire()
        api.drop_watches()
        await until(lambda: relists(lbd.stats, "Service") > listed)
        host, port = cluster.a
        api.put(k.endpoint_slice("web-x2", "web", [host], [{"name": "http", "port": port}]))
        await answers(lbd, "default/web", {"a", "b"})


async def test_a_watch_that_ends_with_an_error_event_as_its_first_line(tmp_path: Path) -> None:
    # A real kube-apiserver answers a too-old watch with 200 and an ERROR event (code 410).
    async with echo_backend("a") as (ha, pa, _), fake_api_server() as api:
        api.gone_as_event = True
        api.put(*web("web", ha, pa), k.node(NODE, [fresh_ip()]))
        async with kube_lbd(api, tmp_path) as lbd:
            await answers(lbd, "default/web", {"a"})
            lists = dict(api.lists)
            api.expire()
            api.drop_watches()
            await until(lambda: all(api.lists[kind] > lists[kind] for kind in lists))
            assert events(lbd.stats, "Service", "ERROR") >= 1
            await answers(lbd, "default/web", {"a"})


async def test_paginated_lists_and_an_expired_continue_token(tmp_path: Path) -> None:
    async with echo_backend("a") as (ha, pa, _), fake_api_server() as api:
        objects = [obj for i in range(7) for obj in web(f"web-{i}", ha, pa)]
        api.put(*objects, k.node(NODE, [fresh_ip()]))
        original = api._list

        def expire_first_continue(request, collection):  # type: ignore[no-untyped-def]
            # The Service list's first continue: the Service list is the one listed again
            # (the EndpointSlice list runs at the same time; its tokens expire too).
            first = not getattr(api, "expired_once", False)
            if request.query.get("continue") and collection.kind == "Service" and first:
                api.expired_once = True  # type: ignore[attr-defined]
                api.pages.clear()  # the token expires between two pages: 410, list again
            return original(request, collection)

        api._list = expire_first_continue  # type: ignore[method-assign]
        async with kube_lbd(api, tmp_path, page_size=3) as lbd:
            await until(lambda: len(lbd.runtime.config.services) == 7)
            for i in range(7):
                await answers(lbd, f"default/web-{i}", {"a"})
        assert api.lists["Service"] >= 2 and api.lists["EndpointSlice"] >= 1


async def test_slow_responses_and_dropped_connections(tmp_path: Path) -> None:
    async with web_cluster(tmp_path) as cluster:
        api, lbd = cluster.api, cluster.lbd
        api.delay = 0.3  # every answer takes 300 ms from now on
        await until(lambda: len(api.watchers) == 3)
        failed = errors(lbd.stats)
        api.drop_watches()  # cut mid-stream: resumed from the last version
        cluster.move_to_b()
        await answers(lbd, "default/web", {"b"})
        assert errors(lbd.stats) > failed
        assert relists(lbd.stats) == 0  # resumed, not listed again


async def test_an_invalid_annotation_keeps_the_last_good_form_and_the_rest_apply(
    tmp_path: Path,
) -> None:
    async with (
        echo_backend("a") as (ha, pa, _),
        echo_backend("b") as (hb, pb, _),
        fake_api_server() as api,
    ):
        svc, slice_a = web("web", ha, pa, annotations={"lbd.io/strategy": "least-connection"})
        api.put(svc, slice_a, k.node(NODE, [fresh_ip()]))
        async with kube_lbd(api, tmp_path) as lbd:
            await answers(lbd, "default/web", {"a"})
            assert lbd.runtime.config.services[0].tunables.strategy == "least-connection"
            svc["metadata"]["annotations"]["lbd.io/connectTimeout"] = "soon"
            api.put(svc, *web("other", hb, pb))
            await answers(lbd, "default/other", {"b"})  # the rest applied
            assert lbd.stats.kubernetes_services_rejected_total == 1
            [web_now] = [s for s in lbd.runtime.config.services if s.name == "web"]
            assert web_now.tunables.strategy == "least-connection"  # its last good form
            assert web_now.tunables.connect_timeout == 1.0
            del svc["metadata"]["annotations"]["lbd.io/connectTimeout"]
            svc["metadata"]["annotations"]["lbd.io/strategy"] = "random"
            api.put(svc)  # fixed: applies
            await until(lambda: lbd.runtime.config.services[-1].tunables.strategy == "random")


async def test_external_ips_outside_the_allow_list_are_skipped_and_counted(
    tmp_path: Path,
) -> None:
    async with echo_backend("a") as (ha, pa, _), fake_api_server() as api:
        allowed, other = fresh_ip(), fresh_ip()
        svc, slice_a = web("web", ha, pa, externalIPs=[allowed, other])
        api.put(svc, slice_a, k.node(NODE, [fresh_ip()]))
        async with kube_lbd(api, tmp_path, allowed_service_ips=f"{allowed}/32") as lbd:
            await until(lambda: lbd.stats.synced)
            [service] = lbd.runtime.config.services
            assert service.external_ips == (allowed,)
            assert lbd.stats.kubernetes_service_ips_skipped_total == 1
            assert await read_name(*lbd.address("default/web", 0, "externalIP")) == "a"


async def test_a_listener_conflict_rejects_the_later_service_only(tmp_path: Path) -> None:
    async with (
        echo_backend("a") as (ha, pa, _),
        echo_backend("b") as (hb, pb, _),
        fake_api_server() as api,
    ):
        shared = fresh_ip()
        one = web("one", ha, pa, externalIPs=[shared])
        one[0]["spec"]["ports"][0]["port"] = 20000 + hash(shared) % 9000
        api.put(*one, k.node(NODE, [fresh_ip()]))
        async with kube_lbd(api, tmp_path, allowed_service_ips=shared) as lbd:
            await until(lambda: lbd.stats.synced)
            two = web("two", hb, pb, externalIPs=[shared])  # the same externalIP:port
            two[0]["spec"]["ports"][0]["port"] = one[0]["spec"]["ports"][0]["port"]
            api.put(*two, *web("three", hb, pb))
            await answers(lbd, "default/three", {"b"})
            assert not lbd.has("default/two") and lbd.has("default/one")
            assert lbd.stats.kubernetes_services_rejected_total >= 1


async def test_the_file_settings_reload_on_sighup_style_requests(tmp_path: Path) -> None:
    async with echo_backend("a") as (ha, pa, _), fake_api_server() as api:
        api.put(*web("web", ha, pa), k.node(NODE, [fresh_ip()]))
        async with kube_lbd(api, tmp_path) as lbd:
            await answers(lbd, "default/web", {"a"})
            text = lbd.config_path.read_text()
            lbd.config_path.write_text(text + "defaults: {strategy: random}\n")
            result = await lbd.mode.reload("SIGHUP")
            assert result.outcome == "applied"
            assert lbd.runtime.config.services[0].tunables.strategy == "random"
            lbd.config_path.write_text(text + "defaults: {strategy: fastest}\n")
            result = await lbd.mode.reload("SIGHUP")
            assert result.outcome == "failed" and "defaults.strategy" in result.problems[0]
            assert lbd.runtime.config.services[0].tunables.strategy == "random"


async def test_metrics_name_events_relists_errors_and_latency(tmp_path: Path) -> None:
    async with web_cluster(tmp_path) as cluster:
        lbd = cluster.lbd
        cluster.move_to_b()
        await answers(lbd, "default/web", {"b"})
        await until(lambda: sum(lbd.stats.network_programming_duration_seconds.counts) >= 2)
        snap = lbd.runtime.metrics_snapshot()
        assert snap.value("lbd_kubernetes_watch_events_total", "EndpointSlice", "MODIFIED") == 1
        assert snap.value("lbd_kubernetes_connected") == 1
        assert snap.value("lbd_kubernetes_syncs_total", "applied") >= 2
        assert snap.value("lbd_kubernetes_last_sync_timestamp_seconds") > 0
        counts, _ = snap.histograms["lbd_network_programming_duration_seconds"][()]
        assert sum(counts) >= 2
