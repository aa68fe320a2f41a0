"""Services and EndpointSlices as kube-proxy merges them (issue 12, item 1), and lbd's own
settings from ``lbd.io/`` annotations; real traffic on 127.x and ::1 where it shows the merge."""

from __future__ import annotations

import json

import pytest

from lbd.config import ConfigError, load_text
from lbd.config.routes import route_specs
from tests import kubeobjects as k
from tests.support import echo_backend, fresh_ip, read_name, running


def manifests(*objects: k.Obj) -> str:
    return json.dumps(k.listing(*objects))


def two_port_service() -> k.Obj:
    """Service ``svc`` with ports http and metrics (port 0: the kernel picks each)."""
    ports = [
        {"name": "http", "port": 0, "targetPort": "http"},
        {"name": "metrics", "port": 0, "targetPort": "metrics"},
    ]
    return k.service("svc", fresh_ip(), ports)


async def test_each_port_of_a_multi_port_service_is_served_by_the_pods_that_have_it() -> None:
    # Per-port pods: the "web" pods have only http, the "stats" pods only metrics. Before the
    # fix the whole input was refused ("endpoint X has no port named ...").
    async with (
        echo_backend("web") as (web_host, web_port, _),
        echo_backend("stats") as (stats_host, stats_port, _),
    ):
        text = manifests(
            two_port_service(),
            k.endpoint_slice("svc-a", "svc", [web_host], [{"name": "http", "port": web_port}]),
            k.endpoint_slice(
                "svc-b", "svc", [stats_host], [{"name": "metrics", "port": stats_port}]
            ),
        )
        config = load_text(text, "<manifests>")
        assert config.warnings == ()
        async with running(config) as runtime:
            http = runtime.listener_for("default/svc", 0).bound
            metrics = runtime.listener_for("default/svc", 1).bound
            assert {await read_name(*http) for _ in range(4)} == {"web"}
            assert {await read_name(*metrics) for _ in range(4)} == {"stats"}


async def test_an_address_in_several_slices_serves_the_union_of_their_ports() -> None:
    host = fresh_ip()
    async with (
        echo_backend("http", host) as (_, http_port, _),
        echo_backend("metrics", host) as (_, metrics_port, _),
    ):
        text = manifests(
            two_port_service(),
            k.endpoint_slice("svc-a", "svc", [host], [{"name": "http", "port": http_port}]),
            k.endpoint_slice("svc-b", "svc", [host], [{"name": "metrics", "port": metrics_port}]),
        )
        config = load_text(text, "<manifests>")
        [service] = config.services
        assert [(e.address, e.ports) for e in service.endpoints] == [
            (host, (("http", http_port), ("metrics", metrics_port)))
        ]
        async with running(config) as runtime:
            assert await read_name(*runtime.listener_for("default/svc", 0).bound) == "http"
            assert await read_name(*runtime.listener_for("default/svc", 1).bound) == "metrics"


def test_a_ready_copy_of_an_address_wins_over_a_not_ready_one() -> None:
    host = fresh_ip()
    ports = [{"name": "http", "port": 8080}]
    text = manifests(
        k.service("svc", fresh_ip(), [{"name": "http", "port": 80, "targetPort": "http"}]),
        k.endpoint_slice("svc-a", "svc", [host], ports, ready=False),
        k.endpoint_slice("svc-b", "svc", [host], ports, ready=True),
    )
    [service] = load_text(text, "<manifests>").services
    [endpoint] = service.endpoints
    assert endpoint.conditions.ready


def test_slices_of_a_family_the_service_has_no_cluster_ip_for_are_skipped_with_a_warning() -> None:
    v4 = fresh_ip()
    ports = [{"name": "http", "port": 8080}]
    text = manifests(
        k.service("svc", fresh_ip(), [{"name": "http", "port": 80, "targetPort": "http"}]),
        k.endpoint_slice("svc-v4", "svc", [v4], ports),
        k.endpoint_slice("svc-v6", "svc", ["::1"], ports),
    )
    config = load_text(text, "<manifests>")
    [spec] = route_specs(config).values()
    assert [t[0] for t in spec.targets] == [v4]
    assert config.warnings == (
        "items[2]: EndpointSlice svc-v6 ignored: default/svc has no IPv6 clusterIP",
    )


async def test_a_dual_stack_service_is_served_on_both_cluster_ips() -> None:
    async with (
        echo_backend("v4") as (v4_host, v4_port, _),
        echo_backend("v6", "::1") as (_, v6_port, _),
    ):
        text = manifests(
            k.service(
                "svc", [fresh_ip(), "::1"], [{"name": "http", "port": 0, "targetPort": "http"}]
            ),
            k.endpoint_slice("svc-v4", "svc", [v4_host], [{"name": "http", "port": v4_port}]),
            k.endpoint_slice("svc-v6", "svc", ["::1"], [{"name": "http", "port": v6_port}]),
        )
        config = load_text(text, "<manifests>")
        assert config.warnings == ()
        async with running(config) as runtime:
            bound = sorted(
                listener.bound
                for listener in runtime.listeners.values()
                if listener.spec.kind == "clusterIP"
            )
            assert len(bound) == 2 and {":" in host for host, _ in bound} == {False, True}
            for host, port in bound:
                # round-robin over both endpoints, whichever family the client used
                assert {await read_name(host, port) for _ in range(4)} == {"v4", "v6"}


def test_annotations_set_lbd_keys_of_the_service() -> None:
    annotations = {
        "lbd.io/strategy": "least-connection",
        "lbd.io/connectTimeout": "2s",
        "lbd.io/maxConnections": "100",
        "lbd.io/healthCheck": "{type: http, path: /healthz, interval: 2s}",
        "lbd.io/proxyProtocol": "v2",
        "other.io/strategy": "random",  # not lbd's: ignored
    }
    text = manifests(k.service("svc", fresh_ip(), annotations=annotations))
    [service] = load_text(text, "<manifests>").services
    tunables = service.tunables
    assert tunables.strategy == "least-connection"
    assert tunables.connect_timeout == 2.0
    assert tunables.max_connections == 100
    assert tunables.health_check is not None and tunables.health_check.path == "/healthz"
    assert tunables.proxy_protocol == "v2"


@pytest.mark.parametrize(
    ("annotation", "problem"),
    [
        (
            {"lbd.io/strategee": "random"},
            "items[0].metadata.annotations[lbd.io/strategee]: unknown lbd annotation; known: "
            "lbd.io/strategy,",
        ),
        (
            {"lbd.io/healthCheck": "{type: http"},
            "items[0].metadata.annotations[lbd.io/healthCheck]: not one YAML value",
        ),
        (
            {"lbd.io/strategy": " "},
            "items[0].metadata.annotations[lbd.io/strategy]: expected a non-empty",
        ),
        ({"lbd.io/strategy": "fastest"}, "services[0].strategy: must be one of"),
    ],
)
def test_bad_annotations_are_problems(annotation: dict[str, str], problem: str) -> None:
    text = manifests(k.service("svc", fresh_ip(), annotations=annotation))
    with pytest.raises(ConfigError) as caught:
        load_text(text, "<manifests>")
    [found] = [str(p) for p in caught.value.problems]
    assert found.startswith(problem)


def test_lbd_convert_of_a_dual_stack_service_loads_back_the_same() -> None:
    from lbd.config.render import render_config

    text = manifests(k.service("svc", [fresh_ip(), "::1"]))
    config = load_text(text, "<manifests>")
    again = load_text(json.dumps(render_config(config)), "<rendered>")
    assert again.services == config.services
