"""The Kubernetes source's pure parts: the object store → lbd/v1 document (ClusterState) and
kube-proxy's bounded-frequency runner. No sockets; the runner runs on a real loop."""

from __future__ import annotations

import asyncio
import json

from lbd.config import load_text
from lbd.config.loader import LoadOptions
from lbd.observability.stats import KubernetesStats
from lbd.sources.bounded import BoundedRunner
from lbd.sources.kube_state import NODE, SERVICE, SLICE, ClusterState
from tests import kubeobjects as k

PORTS = [{"name": "http", "port": 8080}]


def state(base: dict[str, object] | None = None, allowed: tuple[str, ...] = ()) -> ClusterState:
    clock = iter(range(1000)).__next__  # each call one "second" later
    return ClusterState(
        base or {"node": {"name": "node-a"}},
        LoadOptions("node-a"),
        allowed,
        KubernetesStats(),
        clock=lambda: float(clock()),
    )


def listed(cluster: ClusterState, *objects: k.Obj) -> ClusterState:
    for kind in (SERVICE, SLICE, NODE):
        cluster.replace(kind, [_versioned(o) for o in objects if o["kind"] == kind])
    return cluster


_version = iter(range(1, 1_000_000))


def _versioned(obj: k.Obj) -> k.Obj:
    obj["metadata"]["resourceVersion"] = str(next(_version))
    return obj


def services(cluster: ClusterState) -> dict[str, list[str]]:
    """Each service of the document, with its endpoint addresses (loaded as lbd loads it)."""
    data, _ = cluster.document()
    config = load_text(data, "<state>", LoadOptions("node-a"))
    return {s.key: [e.address for e in s.endpoints] for s in config.services}


def test_the_document_is_complete_only_once_every_kind_was_listed() -> None:
    cluster = state()
    cluster.replace(SERVICE, [])
    cluster.replace(SLICE, [])
    assert not cluster.complete
    cluster.replace(NODE, [])
    assert cluster.complete


def test_a_slice_seen_before_its_service_and_a_slice_that_moves() -> None:
    cluster = listed(state())
    slice_a = _versioned(k.endpoint_slice("a-1", "a", ["127.0.0.2"], PORTS))
    assert cluster.event(SLICE, "ADDED", slice_a)
    assert services(cluster) == {}  # no Service yet: nothing to serve
    cluster.event(SERVICE, "ADDED", _versioned(k.service("a", "127.0.0.10")))
    cluster.event(SERVICE, "ADDED", _versioned(k.service("b", "127.0.0.11")))
    assert services(cluster) == {"default/a": ["127.0.0.2"], "default/b": []}
    moved = _versioned(k.endpoint_slice("a-1", "b", ["127.0.0.2"], PORTS))
    cluster.event(SLICE, "MODIFIED", moved)
    assert services(cluster) == {"default/a": [], "default/b": ["127.0.0.2"]}
    latencies = cluster.applied()
    assert sorted(cluster.changed_at) == [] and len(latencies) == 2  # both services changed


def test_a_relist_repeating_known_versions_changes_nothing_and_drops_the_missing() -> None:
    svc, endpoints = (
        k.service("a", "127.0.0.10"),
        k.endpoint_slice("a-1", "a", ["127.0.0.2"], PORTS),
    )
    cluster = listed(state(), svc, endpoints)
    cluster.document()
    assert not cluster.replace(SERVICE, [svc])  # same resourceVersion: nothing new
    assert cluster.replace(SLICE, [])  # the slice is gone
    assert services(cluster) == {"default/a": []}


def test_headless_external_name_and_other_proxies_services_are_left_out() -> None:
    cluster = listed(
        state(),
        k.service("plain", "127.0.0.10"),
        k.service("headless", "None"),
        k.service("dns", "127.0.0.12", kind="ExternalName", externalName="db.example.com"),
        k.service(
            "other",
            "127.0.0.13",
            labels={"service.kubernetes.io/service-proxy-name": "someone-else"},
        ),
    )
    assert list(services(cluster)) == ["default/plain"]
    assert cluster.stats.kubernetes_services_rejected_total == 0


def test_only_allowed_external_and_load_balancer_ips_are_kept() -> None:
    svc = k.service("a", "127.0.0.10", kind="LoadBalancer", externalIPs=["127.1.0.1", "127.2.0.1"])
    svc["spec"]["ports"][0]["nodePort"] = 30080
    svc["status"]["loadBalancer"]["ingress"] = [{"ip": "127.2.0.2"}, {"ip": "127.1.0.2"}]
    cluster = listed(state(allowed=("127.1.0.0/16",)), svc)
    data, _ = cluster.document()
    [service] = json.loads(data)["services"]
    assert service["externalIPs"] == ["127.1.0.1"]
    assert service["loadBalancerIPs"] == ["127.1.0.2"]
    assert cluster.stats.kubernetes_service_ips_skipped_total == 2


def test_an_invalid_update_keeps_the_last_good_form_and_names_the_annotation() -> None:
    svc = k.service("a", "127.0.0.10", annotations={"lbd.io/strategy": "random"})
    cluster = listed(state(), svc)
    assert json.loads(cluster.document()[0])["services"][0]["strategy"] == "random"
    bad = k.service("a", "127.0.0.10", annotations={"lbd.io/maxConnections": "lots"})
    cluster.event(SERVICE, "MODIFIED", _versioned(bad))
    [service] = json.loads(cluster.document()[0])["services"]
    assert service["strategy"] == "random" and "maxConnections" not in service
    assert cluster.stats.kubernetes_services_rejected_total == 1
    assert cluster.services["default/a"].converted.annotations == {  # type: ignore[union-attr]
        "maxConnections": "lbd.io/maxConnections"
    }


def test_a_conflict_in_the_whole_document_reverts_the_named_service() -> None:
    one, two = k.service("one", "127.0.0.10"), k.service("two", "127.0.0.11")
    cluster = listed(state(), one, two)
    _, keys = cluster.document()
    cluster.applied()
    changed = k.service("two", "127.0.0.11", [{"name": "http", "port": 81}])
    cluster.event(SERVICE, "MODIFIED", _versioned(changed))
    _, keys = cluster.document()
    problem = f"services[{keys.index('default/two')}].ports[0]: conflicts with ..."
    assert cluster.reject_conflicts((problem,), keys)
    [port] = json.loads(cluster.document()[0])["services"][1]["ports"]
    assert port["port"] == 80  # the form last applied
    # "one" fails in the form already applied (its address went away): it is left out
    unbindable = "lbd.yaml: cannot bind TCP 127.0.0.10:80 (clusterIP of default/one): gone"
    assert cluster.reject_conflicts((unbindable,), keys)
    assert cluster.services["default/one"].good is None
    assert not cluster.reject_conflicts(("node.addresses[0]: not an address",), keys)


def test_the_file_node_settings_win_over_the_node_object() -> None:
    node = k.node("node-a", ["127.0.0.5"], zone="from-node")
    # a cloud's ExternalIP is not on the host (NAT): a NodePort could not bind it
    node["status"]["addresses"].append({"type": "ExternalIP", "address": "203.0.113.7"})
    cluster = listed(state({"node": {"name": "node-a", "zone": "from-file"}}), node)
    assert cluster.node_document() == {
        "name": "node-a",
        "zone": "from-file",
        "addresses": ["127.0.0.5"],
    }
    unchanged = k.node("node-a", ["127.0.0.5"], zone="from-node")
    assert not cluster.event(NODE, "MODIFIED", _versioned(unchanged))  # a heartbeat: no sync


async def test_the_bounded_runner_coalesces_bursts_and_keeps_its_interval() -> None:
    loop = asyncio.get_running_loop()
    started: list[float] = []

    async def work() -> None:
        started.append(loop.time())
        await asyncio.sleep(0.01)

    runner = BoundedRunner(work, 0.2)
    task = asyncio.create_task(runner.run())
    try:
        begin = loop.time()
        runner.request()  # after a quiet spell: at once
        await asyncio.sleep(0.05)
        for _ in range(100):  # a burst: one more run, a min interval after the first
            runner.request()
            await asyncio.sleep(0.001)
        await asyncio.sleep(0.4)
        assert len(started) == 2
        assert started[0] - begin < 0.05
        assert 0.19 <= started[1] - started[0] < 0.3
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def test_the_file_proxy_name_selects_services_labelled_for_this_proxy() -> None:
    label = {"service.kubernetes.io/service-proxy-name": "lbd"}
    mine = k.service("mine", "127.0.0.10", labels=label)
    cluster = listed(state({"node": {"name": "node-a", "proxyName": "lbd"}}), mine)
    assert list(services(cluster)) == ["default/mine"]
    assert list(services(listed(state(), mine))) == []  # another proxy's, for a default lbd
