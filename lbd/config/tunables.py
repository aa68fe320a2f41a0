"""The per-service keys that ``defaults`` may set too, in one table: lbd/v1 key ↔ ``Tunables``
field ↔ parser ↔ rendering.

``read_tunables`` reads them from a ``defaults`` or a ``services[i]`` section over a base (the
built-in ``Tunables()``, or the file's ``defaults``), so a service inherits every key it leaves
out; ``render_tunables`` writes every field back in the file's vocabulary, so ``GET /config``
and the config hash cover every setting by construction. A ``healthCheck`` or
``outlierDetection`` mapping is merged key by key over the base's one; ``none`` (or
``enabled: false`` for the two mappings) switches an optional setting off over a default.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lbd.config import fields as f
from lbd.config.durations import parse_duration
from lbd.config.errors import FieldError
from lbd.config.faults import read_faults, read_mirror, render_faults, render_mirror
from lbd.config.health import (
    HEALTH_CHECK_KEYS,
    OUTLIER_KEYS,
    positive_duration,
    read_health_check,
    read_outlier,
    render_health_check,
    render_outlier,
)
from lbd.config.model import (
    HASH_ON,
    PROXY_PROTOCOL_VERSIONS,
    SPLICE_MODES,
    STRATEGIES,
    SpliceMode,
    Tunables,
)

__all__ = ["HEALTH_CHECK_KEYS", "OUTLIER_KEYS", "TUNABLES", "TUNABLE_KEYS"]

NONE = "none"  # spelling of "off" for an optional setting, e.g. maxConnections: none

_connections = f.int_between(1, 10_000_000)
_queue = f.int_between(0, 10_000_000)
# One session holds one socket (a file descriptor and an ephemeral port): a million is already
# past what one host's port range can carry towards one endpoint address.
_max_udp_sessions = f.int_between(1, 1_000_000)
_udp_responses = f.int_between(1, 1000)  # replies per client datagram
_udp_session_rate = f.int_between(1, 1_000_000)  # new sessions per second per client address
_splice_modes = f.one_of(SPLICE_MODES)
MAGLEV_TABLE_MAX = 1_000_003


def _optional(parse: f.Parser[Any]) -> f.Parser[Any]:
    def parse_or_none(value: object) -> object:
        return None if value == NONE else parse(value)

    return parse_or_none


def _splice_mode(value: object) -> SpliceMode:
    # An unquoted ``off`` is a YAML 1.1 boolean: take booleans for what they plainly mean.
    if isinstance(value, bool):
        return "auto" if value else "off"
    mode: SpliceMode = _splice_modes(value)
    return mode


def _proxy_version(value: object) -> str | None:
    version = str(f.one_of((*PROXY_PROTOCOL_VERSIONS, NONE))(value))
    return None if version == NONE else version


def _prime_table_size(value: object) -> int:
    size = f.int_between(7, MAGLEV_TABLE_MAX)(value)
    if any(size % d == 0 for d in range(2, int(size**0.5) + 1)):
        raise FieldError(f"must be a prime number (65537 is the default), got {size}")
    return size


def _seconds(value: float | None) -> object:
    return NONE if value is None else value


def _same(value: object) -> object:
    return NONE if value is None else value


@dataclass(frozen=True, slots=True)
class Tunable:
    """One lbd/v1 key: how it is read from a section over a base value, and written back."""

    key: str
    field: str
    parse: f.Parser[Any] | None = None  # a scalar parser; None: ``read`` is custom
    render: Callable[[Any], object] = _same
    read: Callable[[f.Section, str, Any], Any] | None = None  # (section, key, base) -> value

    def value(self, section: f.Section, base: object) -> object:
        if self.read is not None:
            return self.read(section, self.key, base)
        assert self.parse is not None
        return section.get(self.key, self.parse, base)


def _cidrs(section: f.Section, key: str, base: tuple[str, ...]) -> tuple[str, ...]:
    if not section.has(key):
        return base
    networks: list[str] = []
    for path, raw in section.items(key):
        try:
            text = f.string(raw)
            networks.append(str(ipaddress.ip_network(text.strip(), strict=False)))
        except FieldError as error:
            section.problems.add(path, str(error))
        except ValueError:
            message = f"expected an address or CIDR such as 127.0.0.0/8, got {f.show(raw)}"
            section.problems.add(path, message)
    return tuple(networks)


T = Tunable
TUNABLES: tuple[Tunable, ...] = (
    T("strategy", "strategy", f.one_of(STRATEGIES)),
    T("connectTimeout", "connect_timeout", positive_duration),
    T("idleTimeout", "idle_timeout", positive_duration),
    T("drainTimeout", "drain_timeout", parse_duration),
    T("udpIdleTimeout", "udp_idle_timeout", positive_duration),
    T("maxUdpSessions", "max_udp_sessions", _max_udp_sessions),
    T("udpResponses", "udp_responses", _optional(_udp_responses)),
    T("udpSessionRate", "udp_session_rate", _optional(_udp_session_rate)),
    T("halfClosedTimeout", "half_closed_timeout", positive_duration),
    T("maxConnectionDuration", "max_connection_duration", _optional(positive_duration), _seconds),
    T("accessLog", "access_log", f.boolean),
    T("splice", "splice", _splice_mode),
    T("healthCheck", "health_check", read=read_health_check, render=render_health_check),
    T("outlierDetection", "outlier_detection", read=read_outlier, render=render_outlier),
    T("slowStart", "slow_start", parse_duration),
    T("maxConnections", "max_connections", _optional(_connections)),
    T("maxConnectionsPerEndpoint", "max_connections_per_endpoint", _optional(_connections)),
    T("maxQueue", "max_queue", _queue),
    T("queueTimeout", "queue_timeout", positive_duration),
    T("proxyProtocol", "proxy_protocol", _proxy_version),
    T("acceptProxyProtocolFrom", "accept_proxy_protocol_from", read=_cidrs, render=list),
    T("hashOn", "hash_on", f.one_of(HASH_ON)),
    T("maglevTableSize", "maglev_table_size", _prime_table_size),
    T("faults", "faults", read=read_faults, render=render_faults),
    T("mirror", "mirror", read=read_mirror, render=render_mirror),
)
del T
TUNABLE_KEYS = tuple(tunable.key for tunable in TUNABLES)


def read_tunables(section: f.Section, base: Tunables) -> Tunables:
    """Every tunable of ``section``; a key it leaves out keeps ``base``'s value."""
    values = {t.field: t.value(section, getattr(base, t.field)) for t in TUNABLES}
    return dataclasses.replace(base, **values)  # type: ignore[arg-type]


def render_tunables(tunables: Tunables) -> dict[str, object]:
    """Every tunable as its lbd/v1 key and value; reading it back gives ``tunables``."""
    return {t.key: t.render(getattr(tunables, t.field)) for t in TUNABLES}


def changed_tunables(old: Tunables, new: Tunables) -> tuple[str, ...]:
    """The lbd/v1 keys whose values differ (for the reload diff)."""
    return tuple(t.key for t in TUNABLES if getattr(old, t.field) != getattr(new, t.field))
