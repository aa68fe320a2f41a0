"""The per-service keys that ``defaults`` may set too: health, ejection, limits, PROXY.

``read_tunables`` reads them from a ``defaults`` or a ``services[i]`` section over a base (the
built-in defaults, or the file's ``defaults``), so a service inherits every key it leaves out.
A ``healthCheck`` or ``outlierDetection`` mapping is merged key by key over the base's one.
"""

from __future__ import annotations

import dataclasses
import ipaddress

from lbd.config import fields as f
from lbd.config.durations import parse_duration
from lbd.config.errors import FieldError
from lbd.config.model import (
    HEALTH_CHECK_TYPES,
    PROXY_PROTOCOL_VERSIONS,
    SPLICE_MODES,
    STRATEGIES,
    Defaults,
    HealthCheck,
    Limits,
    OutlierDetection,
    ProxyProtocol,
    SpliceMode,
    Timeouts,
)

TUNABLE_KEYS = (
    "strategy",
    "connectTimeout",
    "idleTimeout",
    "drainTimeout",
    "udpIdleTimeout",
    "maxUdpSessions",
    "halfClosedTimeout",
    "maxConnectionDuration",
    "accessLog",
    "splice",
    "healthCheck",
    "outlierDetection",
    "slowStart",
    "maxConnections",
    "maxConnectionsPerEndpoint",
    "maxQueue",
    "queueTimeout",
    "proxyProtocol",
    "acceptProxyProtocolFrom",
)
HEALTH_CHECK_KEYS = (
    "enabled",
    "type",
    "interval",
    "timeout",
    "jitter",
    "healthyThreshold",
    "unhealthyThreshold",
    "path",
    "host",
    "expectStatus",
    "send",
    "expect",
)
HTTP_ONLY_KEYS = ("path", "host", "expectStatus")
TCP_ONLY_KEYS = ("send", "expect")
OUTLIER_KEYS = (
    "enabled",
    "consecutiveFailures",
    "baseEjectionTime",
    "maxEjectionTime",
    "maxEjectionPercent",
)

_threshold = f.int_between(1, 100)
_connections = f.int_between(1, 10_000_000)
_queue = f.int_between(0, 10_000_000)
_percent = f.int_between(0, 100)
# One session holds one socket (a file descriptor and an ephemeral port): a million is already
# past what one host's port range can carry towards one endpoint address.
_max_udp_sessions = f.int_between(1, 1_000_000)


_splice_modes = f.one_of(SPLICE_MODES)


def _splice_mode(value: object) -> SpliceMode:
    # An unquoted ``off`` is a YAML 1.1 boolean: take booleans for what they plainly mean.
    if isinstance(value, bool):
        return "auto" if value else "off"
    mode: SpliceMode = _splice_modes(value)
    return mode


def positive_duration(value: object) -> float:
    seconds = parse_duration(value)
    if seconds <= 0:
        raise FieldError("must be greater than 0")
    return seconds


def read_tunables(section: f.Section, base: Defaults) -> Defaults:
    inherited: str = base.proxy_protocol.send or "none"
    proxy = section.get("proxyProtocol", _proxy_version, inherited)
    accept = (
        _cidrs(section, "acceptProxyProtocolFrom")
        if section.has("acceptProxyProtocolFrom")
        else base.proxy_protocol.accept_from
    )
    return Defaults(
        strategy=section.get("strategy", f.one_of(STRATEGIES), base.strategy),
        timeouts=_timeouts(section, base.timeouts),
        access_log=section.get("accessLog", f.boolean, base.access_log),
        splice=section.get("splice", _splice_mode, base.splice),
        max_udp_sessions=section.get("maxUdpSessions", _max_udp_sessions, base.max_udp_sessions),
        health_check=_health_check(section, base.health_check),
        outlier_detection=_outlier(section, base.outlier_detection),
        slow_start=section.get("slowStart", parse_duration, base.slow_start),
        limits=_limits(section, base.limits),
        proxy_protocol=ProxyProtocol(
            send="v1" if proxy == "v1" else "v2" if proxy == "v2" else None, accept_from=accept
        ),
    )


def _timeouts(section: f.Section, base: Timeouts) -> Timeouts:
    return Timeouts(
        connect=section.get("connectTimeout", positive_duration, base.connect),
        idle=section.get("idleTimeout", positive_duration, base.idle),
        drain=section.get("drainTimeout", parse_duration, base.drain),
        udp_idle=section.get("udpIdleTimeout", positive_duration, base.udp_idle),
        half_closed=section.get("halfClosedTimeout", positive_duration, base.half_closed),
        max_duration=section.get("maxConnectionDuration", positive_duration, base.max_duration),
    )


def _limits(section: f.Section, base: Limits) -> Limits:
    return Limits(
        max_connections=section.get("maxConnections", _connections, base.max_connections),
        max_connections_per_endpoint=section.get(
            "maxConnectionsPerEndpoint", _connections, base.max_connections_per_endpoint
        ),
        max_queue=section.get("maxQueue", _queue, base.max_queue),
        queue_timeout=section.get("queueTimeout", positive_duration, base.queue_timeout),
    )


def _health_check(parent: f.Section, base: HealthCheck | None) -> HealthCheck | None:
    if not parent.has("healthCheck"):
        return base
    path = f.join(parent.path, "healthCheck")
    section = f.Section(parent.raw("healthCheck"), path, parent.problems, HEALTH_CHECK_KEYS)
    start = base or HealthCheck()
    kind = section.get("type", f.one_of(HEALTH_CHECK_TYPES), start.type)
    wrong = TCP_ONLY_KEYS if kind == "http" else HTTP_ONLY_KEYS
    for key in wrong:
        if section.has(key):
            section.problems.add(f.join(path, key), f"not used by a {kind} check")
    check = HealthCheck(
        type=kind,
        interval=section.get("interval", positive_duration, start.interval),
        timeout=section.get("timeout", positive_duration, start.timeout),
        jitter=section.get("jitter", parse_duration, start.jitter),
        healthy_threshold=section.get("healthyThreshold", _threshold, start.healthy_threshold),
        unhealthy_threshold=section.get(
            "unhealthyThreshold", _threshold, start.unhealthy_threshold
        ),
        path=section.get("path", _http_path, start.path),
        host=section.get("host", _header_value, start.host),
        expect_status=section.get("expectStatus", _status_range, start.expect_status),
        send=section.get("send", _text_bytes, start.send),
        expect=section.get("expect", _text_bytes, start.expect),
    )
    if check.jitter >= check.interval:
        section.problems.add(f.join(path, "jitter"), "must be less than interval")
    if not section.get("enabled", f.boolean, True):
        return None
    return check


def _outlier(parent: f.Section, base: OutlierDetection | None) -> OutlierDetection | None:
    if not parent.has("outlierDetection"):
        return base
    path = f.join(parent.path, "outlierDetection")
    section = f.Section(parent.raw("outlierDetection"), path, parent.problems, OUTLIER_KEYS)
    start = base or OutlierDetection()
    outlier = dataclasses.replace(
        start,
        consecutive_failures=section.get(
            "consecutiveFailures", _threshold, start.consecutive_failures
        ),
        base_ejection_time=section.get(
            "baseEjectionTime", positive_duration, start.base_ejection_time
        ),
        max_ejection_time=section.get(
            "maxEjectionTime", positive_duration, start.max_ejection_time
        ),
        max_ejection_percent=section.get(
            "maxEjectionPercent", _percent, start.max_ejection_percent
        ),
    )
    if outlier.max_ejection_time < outlier.base_ejection_time:
        section.problems.add(
            f.join(path, "maxEjectionTime"), "must not be less than baseEjectionTime"
        )
    if not section.get("enabled", f.boolean, True):
        return None
    return outlier


def _proxy_version(value: object) -> str:
    return str(f.one_of((*PROXY_PROTOCOL_VERSIONS, "none"))(value))


def _cidrs(section: f.Section, key: str) -> tuple[str, ...]:
    networks: list[str] = []
    for path, raw in section.items(key):
        try:
            text = f.string(raw)
            networks.append(str(ipaddress.ip_network(text.strip(), strict=False)))
        except FieldError as error:
            section.problems.add(path, str(error))
        except ValueError:
            message = f"expected an address or CIDR such as 127.0.0.0/8, got {raw!r}"
            section.problems.add(path, message)
    return tuple(networks)


def _http_path(value: object) -> str:
    text = f.string(value)
    if not text.startswith("/") or any(c in text for c in " \r\n"):
        raise FieldError(f"must start with / and hold no spaces or line breaks, got {text!r}")
    return text


def _header_value(value: object) -> str:
    text = f.string(value)
    if not text or any(c in text for c in "\r\n"):
        raise FieldError(f"must be one non-empty line, got {text!r}")
    return text


def _status_range(value: object) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        low = high = value
    else:
        text = f.string(value)
        low_text, _, high_text = text.partition("-")
        try:
            low, high = int(low_text), int(high_text or low_text)
        except ValueError:
            message = f"expected a status or a range such as 200-399, got {text!r}"
            raise FieldError(message) from None
    if not 100 <= low <= high <= 599:
        raise FieldError(f"expected 100 <= low <= high <= 599, got {value!r}")
    return (low, high)


def _text_bytes(value: object) -> bytes:
    text = f.string(value)
    if len(text) > 4096:
        raise FieldError("at most 4096 characters")
    return text.encode()
