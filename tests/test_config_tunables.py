"""Issue 5's keys: health checks, outlier detection, slow start, limits, timeouts, PROXY."""

from __future__ import annotations

import textwrap

import pytest

from lbd.config import ConfigError, load_text
from lbd.config.model import HealthCheck, OutlierDetection, Tunables

HEAD = "apiVersion: lbd/v1\n"
SERVICE = "- name: a\n  clusterIP: 127.0.0.9\n  ports: [{port: 1}]\n"


def load(defaults: str = "", service: str = "") -> Tunables:
    text = HEAD
    if defaults:
        text += "defaults:\n" + textwrap.indent(textwrap.dedent(defaults), "  ")
    text += "services:\n" + textwrap.indent(
        SERVICE + textwrap.indent(textwrap.dedent(service), "  "), "  "
    )
    return load_text(text, "<test>").services[0].tunables


def problems(defaults: str = "", service: str = "") -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load(defaults, service)
    return [str(p) for p in caught.value.problems]


def test_everything_is_off_by_default() -> None:
    service = load()
    assert service.health_check is None and service.outlier_detection is None
    assert service.slow_start == 0.0 and not service.limited and service.max_queue == 0
    assert service.proxy_protocol is None and service.accept_proxy_protocol_from == ()
    assert service.half_closed_timeout == 60.0 and service.max_connection_duration is None
    assert service == Tunables()


def test_full_keys_parse_and_merge_over_defaults() -> None:
    service = load(
        defaults="""\
        healthCheck: {type: http, interval: 2s, path: /healthz, expectStatus: 200-299}
        outlierDetection: {consecutiveFailures: 3}
        slowStart: 30s
        maxConnections: 100
        proxyProtocol: v2
        acceptProxyProtocolFrom: [127.1.2.3/8, "::1"]
        """,
        service="""\
        healthCheck: {timeout: 500ms, host: example.org, unhealthyThreshold: 2}
        outlierDetection: {baseEjectionTime: 10s, maxEjectionPercent: 50}
        maxConnectionsPerEndpoint: 5
        maxQueue: 20
        queueTimeout: 2s
        halfClosedTimeout: 10s
        maxConnectionDuration: 1h
        """,
    )
    assert service.health_check == HealthCheck(
        type="http",
        interval=2.0,
        timeout=0.5,
        path="/healthz",
        host="example.org",
        expect_status=(200, 299),
        unhealthy_threshold=2,
    )
    assert service.outlier_detection == OutlierDetection(
        consecutive_failures=3, base_ejection_time=10.0, max_ejection_percent=50
    )
    assert service.slow_start == 30.0
    limits = (service.max_connections, service.max_connections_per_endpoint, service.max_queue)
    assert limits == (100, 5, 20) and service.queue_timeout == 2.0
    assert service.half_closed_timeout == 10.0 and service.max_connection_duration == 3600.0
    assert service.proxy_protocol == "v2"
    assert service.accept_proxy_protocol_from == ("127.0.0.0/8", "::1/128")


def test_a_service_can_switch_inherited_features_off() -> None:
    service = load(
        defaults="healthCheck: {}\noutlierDetection: {}\nproxyProtocol: v1\n",
        service="healthCheck: {enabled: false}\noutlierDetection: {enabled: false}\n"
        "proxyProtocol: none\n",
    )
    assert service.health_check is None and service.outlier_detection is None
    assert service.proxy_protocol is None


def test_tcp_send_expect() -> None:
    check = load(service="healthCheck: {send: PING, expect: PONG}\n").health_check
    assert check == HealthCheck(type="tcp", send=b"PING", expect=b"PONG")


def test_unknown_health_check_key() -> None:
    assert problems(service="healthCheck: {intervl: 1s}\n")[0].startswith(
        "services[0].healthCheck.intervl: unknown key (did you mean 'interval'?)"
    )


def test_health_check_type_and_numbers() -> None:
    assert problems(
        service="healthCheck: {type: udp, interval: 0s, healthyThreshold: 0, unhealthyThreshold: x}\n"
    ) == [
        "services[0].healthCheck.type: must be one of tcp, http, got 'udp'",
        "services[0].healthCheck.interval: must be greater than 0",
        "services[0].healthCheck.healthyThreshold: must be between 1 and 100, got 0",
        "services[0].healthCheck.unhealthyThreshold: expected a whole number, got a string 'x'",
    ]


def test_health_check_keys_of_the_other_type() -> None:
    assert problems(service="healthCheck: {type: tcp, path: /x}\n") == [
        "services[0].healthCheck.path: not used by a tcp check"
    ]
    assert problems(defaults="healthCheck: {type: http, expect: x}\n") == [
        "defaults.healthCheck.expect: not used by a http check"
    ]


def test_health_check_http_values() -> None:
    assert problems(
        service="healthCheck: {type: http, path: health, expectStatus: 99-200, host: ''}\n"
    ) == [
        "services[0].healthCheck.path: must start with / and hold no spaces or line breaks, got 'health'",
        "services[0].healthCheck.host: must be one non-empty line, got ''",
        "services[0].healthCheck.expectStatus: expected 100 <= low <= high <= 599, got '99-200'",
    ]
    assert problems(service="healthCheck: {type: http, expectStatus: ok}\n") == [
        "services[0].healthCheck.expectStatus: expected a status or a range such as 200-399, got 'ok'"
    ]


def test_jitter_below_interval() -> None:
    assert problems(service="healthCheck: {interval: 1s, jitter: 1s}\n") == [
        "services[0].healthCheck.jitter: must be less than interval"
    ]


def test_health_check_must_be_a_mapping() -> None:
    assert problems(service="healthCheck: tcp\n") == [
        "services[0].healthCheck: expected a mapping, got a string"
    ]


def test_outlier_detection_values() -> None:
    assert problems(
        service="outlierDetection: {consecutiveFailures: 0, maxEjectionPercent: 101, "
        "baseEjectionTime: 1m, maxEjectionTime: 30s}\n"
    ) == [
        "services[0].outlierDetection.consecutiveFailures: must be between 1 and 100, got 0",
        "services[0].outlierDetection.maxEjectionPercent: must be between 0 and 100, got 101",
        "services[0].outlierDetection.maxEjectionTime: must not be less than baseEjectionTime",
    ]


def test_limits_values() -> None:
    assert problems(
        service="maxConnections: 0\nmaxConnectionsPerEndpoint: -1\nmaxQueue: x\nqueueTimeout: 0s\n"
    ) == [
        "services[0].maxConnections: must be between 1 and 10000000, got 0",
        "services[0].maxConnectionsPerEndpoint: must be between 1 and 10000000, got -1",
        "services[0].maxQueue: expected a whole number, got a string 'x'",
        "services[0].queueTimeout: must be greater than 0",
    ]


def test_timeouts_values() -> None:
    assert problems(
        service="halfClosedTimeout: 0\nmaxConnectionDuration: soon\nslowStart: -1\n"
    ) == [
        "services[0].halfClosedTimeout: must be greater than 0",
        "services[0].maxConnectionDuration: expected a duration such as 250ms, 30s, 5m or 1h30m, got 'soon'",
        "services[0].slowStart: a duration must be a finite number of seconds >= 0, got -1",
    ]


def test_proxy_protocol_values() -> None:
    assert problems(service="proxyProtocol: v3\nacceptProxyProtocolFrom: [127.0.0.0/33, 7]\n") == [
        "services[0].proxyProtocol: must be one of v1, v2, none, got 'v3'",
        "services[0].acceptProxyProtocolFrom[0]: expected an address or CIDR such as 127.0.0.0/8, got '127.0.0.0/33'",
        "services[0].acceptProxyProtocolFrom[1]: expected a string, got a number",
    ]


def test_splice_mode_inherits_and_rejects_other_values() -> None:
    assert load().splice == "auto"
    assert load(defaults="splice: off\n").splice == "off"
    assert load(defaults="splice: 'off'\n", service="splice: auto\n").splice == "auto"
    assert problems(service="splice: always\n") == [
        "services[0].splice: must be one of auto, off, got 'always'"
    ]
