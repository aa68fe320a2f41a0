"""``faults:`` and ``mirror:`` (lbd.config.faults): every type's keys, the problems a bad entry
gives (with its path), inheritance from ``defaults``, and rendering back to an equal model."""

from __future__ import annotations

import json
import textwrap

import pytest

from lbd.config import ConfigError, load_text
from lbd.config.faults import byte_size, render_faults, render_mirror
from lbd.config.faultspec import FAULT_TYPES, Fault, Mirror
from lbd.config.model import Tunables
from lbd.config.render import render_config

HEAD = "apiVersion: lbd/v1\n"


def load(service: str = "", defaults: str = "", protocol: str = "TCP") -> Tunables:
    text = HEAD
    if defaults:
        text += "defaults:\n" + textwrap.indent(textwrap.dedent(defaults), "  ")
    text += (
        "services:\n  - name: a\n    clusterIP: 127.0.0.9\n"
        f"    ports: [{{port: 1, protocol: {protocol}}}]\n"
        + textwrap.indent(textwrap.dedent(service), "    ")
    )
    return load_text(text, "<test>").services[0].tunables


def problems(service: str, protocol: str = "TCP") -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load(service, protocol=protocol)
    return [str(p) for p in caught.value.problems]


EVERY_TYPE = {
    "latency": "{type: latency, latency: 50ms, jitter: 10ms}",
    "bandwidth": "{type: bandwidth, rate: 1MiB/s}",
    "slicer": "{type: slicer, averageSize: 64, sizeVariation: 16, delay: 1ms}",
    "limit_data": "{type: limit_data, bytes: 1KB}",
    "timeout": "{type: timeout, timeout: 5s}",
    "reset_peer": "{type: reset_peer, timeout: 100ms, direction: upstream}",
    "slow_close": "{type: slow_close, delay: 2s}",
    "refuse": "{type: refuse, probability: 0.25, endpoints: ['127.0.1.2:80'], healthChecks: true}",
    "drop": "{type: drop, probability: 0.1}",
    "delay": "{type: delay, delay: 20ms, jitter: 5ms, direction: downstream}",
    "duplicate": "{type: duplicate, probability: 0.5}",
    "reorder": "{type: reorder, probability: 0.3}",
}


def test_the_examples_name_every_type() -> None:
    assert set(EVERY_TYPE) == set(FAULT_TYPES)


@pytest.mark.parametrize("kind", FAULT_TYPES)
def test_every_type_reads_renders_and_reads_back(kind: str) -> None:
    protocol = "TCP" if Fault(kind).tcp else "UDP"  # type: ignore[arg-type]
    [fault] = load(f"faults: [{EVERY_TYPE[kind]}]\n", protocol=protocol).faults
    assert fault.type == kind
    rendered = json.dumps(render_faults((fault,)))
    assert load(f"faults: {rendered}\n", protocol=protocol).faults == (fault,)


def test_values_and_defaults() -> None:
    latency, bandwidth, limit, timeout, reset = load(
        "faults:\n"
        "  - {type: latency, latency: 50ms, jitter: 10ms, endpoints: [127.0.1.2, '[::1]:80']}\n"
        "  - {type: bandwidth, rate: 1MiB}\n"
        "  - {type: limit_data, bytes: 1000}\n"
        "  - {type: timeout, timeout: never}\n"
        "  - {type: reset_peer}\n"
    ).faults
    assert (latency.latency, latency.jitter, latency.direction) == (0.05, 0.01, "downstream")
    assert latency.endpoints == (("127.0.1.2", None), ("::1", 80))
    assert latency.probability == 1.0
    assert bandwidth.rate == 1024 * 1024 and limit.bytes == 1000
    assert timeout.timeout == 0.0 and reset.timeout == 0.0  # never closes; resets at once
    [udp] = load("faults: [{type: reorder}]\n", protocol="UDP").faults
    assert udp.direction == "both" and udp.delay == 0.01  # UDP faults act both ways by default


def test_sizes() -> None:
    assert [byte_size(v) for v in (1000, "1000", "1KB", "1KiB", "1.5MB", "2MiB", "1GiB")] == [
        1000,
        1000,
        1000,
        1024,
        1_500_000,
        2 * 1024 * 1024,
        1024**3,
    ]


def test_bad_entries_name_their_paths() -> None:
    found = problems(
        "faults:\n"
        "  - {type: latncy, latency: 50ms}\n"
        "  - {type: latency, rate: 5, endpoints: [foo], probability: 2}\n"
        "  - {type: refuse, direction: upstream}\n"
        "  - {type: slicer, averageSize: 10, sizeVariation: 10}\n"
        "  - {type: bandwidth, rate: 0}\n"
        "  - {type: latency, latency: 1ms, colour: red}\n"
        "  - {type: drop}\n"
        "  - {type: bandwidth, rate: 1KB, healthChecks: true}\n"
        "mirror: {endpoint: '127.0.1.9'}\n"
    )
    assert found == [
        "services[0].faults[0].type: must be one of latency, bandwidth, slicer, limit_data, "
        "timeout, reset_peer, slow_close, refuse, drop, delay, duplicate, reorder, got 'latncy' "
        "(did you mean 'latency'?)",
        "services[0].faults[1].rate: not used by a latency fault",
        "services[0].faults[1].latency: required by a latency fault",
        "services[0].faults[1].endpoints[0]: expected ADDRESS or ADDRESS:PORT, got 'foo'",
        "services[0].faults[1].probability: must be between 0 and 1, got 2",
        "services[0].faults[2].direction: refuse acts on new connections, not a direction",
        "services[0].faults[3].sizeVariation: must be less than averageSize",
        "services[0].faults[4].rate: must be at least 1 byte per second",
        "services[0].faults[5].colour: unknown key; known keys: averageSize, bytes, delay, "
        "direction, endpoints, healthChecks, jitter, latency, probability, rate, sizeVariation, "
        "timeout, type",
        "services[0].faults[7].healthChecks: only latency, timeout, reset_peer, refuse faults "
        "can act on health checks",
        "services[0].mirror.endpoint: needs a port: ADDRESS:PORT",
        "services[0].faults[6].type: drop acts on UDP (drop, delay, duplicate, reorder), and the "
        "service has no UDP port",
    ]


def test_faults_must_fit_the_service_protocols() -> None:
    assert problems("faults: [{type: latency, latency: 1ms}]\n", protocol="UDP") == [
        "services[0].faults[0].type: latency acts on TCP (latency, bandwidth, slicer, "
        "limit_data, timeout, reset_peer, slow_close, refuse), and the service has no TCP port"
    ]
    assert problems("mirror: {endpoint: '127.0.0.1:9'}\n", protocol="UDP") == [
        "services[0].mirror: mirrors TCP connections only"
    ]


def test_services_inherit_from_defaults_and_switch_off() -> None:
    defaults = (
        "faults: [{type: latency, latency: 5ms}]\nmirror: {endpoint: '127.0.1.9:81', percent: 5}\n"
    )
    inherited = load(defaults=defaults)
    assert inherited.faults == (Fault("latency", latency=0.005),)
    assert inherited.mirror == Mirror("127.0.1.9", 81, 5.0)
    off = load("faults: []\nmirror: none\n", defaults=defaults)
    assert off.faults == () and off.mirror is None
    assert render_faults(off.faults) == [] and render_mirror(off.mirror) == "none"


def test_a_udp_only_service_inherits_tcp_faults_without_complaint() -> None:
    # ``defaults`` speak for every service: a TCP fault simply never acts on a UDP port.
    tunables = load(defaults="faults: [{type: latency, latency: 5ms}]\n", protocol="UDP")
    assert tunables.faults[0].type == "latency"


def test_the_rendered_config_loads_back_equal() -> None:
    text = (
        HEAD + "services:\n  - name: a\n    clusterIP: 127.0.0.9\n    ports: [{port: 1}]\n"
        "    faults: [{type: limit_data, bytes: 10KiB, endpoints: ['127.0.0.2:80']}]\n"
        "    mirror: {endpoint: '[::1]:8080'}\n"
    )
    config = load_text(text, "<test>")
    again = load_text(json.dumps(render_config(config)), "<rendered>")
    assert again == config
    assert again.services[0].tunables.mirror == Mirror("::1", 8080, 100.0)
