"""``faults:`` and ``mirror:`` of a service (or of ``defaults``): read, checked and rendered.

Both are tunables (``lbd.config.tunables``): a service that leaves them out inherits the
defaults' ones, ``faults: []`` and ``mirror: none`` switch them off. A fault mapping is read
the same way from a file and from ``POST /faults`` (``read_fault``), so both give the same
``path: message`` problems; rendering writes exactly the keys a fault's type reads, so the
rendered mapping reads back to an equal ``Fault``.
"""

from __future__ import annotations

import ipaddress
import math
import re

from lbd.config import fields as f
from lbd.config.durations import parse_duration
from lbd.config.errors import FieldError
from lbd.config.faultspec import (
    DEFAULT_DIRECTION,
    DIRECTIONS,
    FAULT_SETTINGS,
    FAULT_TYPES,
    PROBE_FAULTS,
    REORDER_HOLD,
    TCP_FAULTS,
    UDP_FAULTS,
    Fault,
    Mirror,
)

COMMON_KEYS = ("type", "direction", "probability", "endpoints", "healthChecks")
SETTING_KEYS = tuple(sorted({key for keys in FAULT_SETTINGS.values() for key in keys}))
FAULT_KEYS = (*COMMON_KEYS, *SETTING_KEYS)
MIRROR_KEYS = ("endpoint", "percent")
REQUIRED: dict[str, tuple[str, ...]] = {
    "latency": ("latency",),
    "bandwidth": ("rate",),
    "slicer": ("averageSize",),
    "limit_data": ("bytes",),
    "slow_close": ("delay",),
    "delay": ("delay",),
}
MAX_FAULTS = 64  # per service port: each one is looked at for every faulty connection
_UNITS = {"": 1, "b": 1, "kb": 10**3, "kib": 2**10, "mb": 10**6, "mib": 2**20}
_UNITS.update({"gb": 10**9, "gib": 2**30})
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmg]i?b|b)?", re.IGNORECASE)
MAX_BYTES = 2**62


def byte_size(value: object) -> int:
    """A number of bytes: ``1000``, ``64KiB``, ``1.5MB`` (KB is 1000 bytes, KiB 1024)."""
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    else:
        text = f.string(value).strip()
        match = _SIZE.fullmatch(text)
        if match is None:
            raise FieldError(f"expected a size such as 1000, 64KiB or 1MB, got {f.show(value)}")
        number = int(float(match[1]) * _UNITS[(match[2] or "").lower()])
    if not 0 <= number <= MAX_BYTES:
        raise FieldError(f"must be between 0 and {MAX_BYTES} bytes, got {f.show(value)}")
    return number


def _rate(value: object) -> int:
    """Bytes per second: a size, optionally written with ``/s``."""
    if isinstance(value, str) and value.strip().endswith("/s"):
        value = value.strip()[:-2]
    rate = byte_size(value)
    if rate < 1:
        raise FieldError("must be at least 1 byte per second")
    return rate


def _positive_size(value: object) -> int:
    size = byte_size(value)
    if size < 1:
        raise FieldError("must be at least 1 byte")
    return size


def _fraction(low: float, high: float) -> f.Parser[float]:
    def parse(value: object) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise FieldError(f"expected a number from {low:g} to {high:g}, got {f.show(value)}")
        number = float(value)
        if not (math.isfinite(number) and low <= number <= high):
            raise FieldError(f"must be between {low:g} and {high:g}, got {f.show(value)}")
        return number

    return parse


_probability = _fraction(0.0, 1.0)
_percent = _fraction(0.0, 100.0)


def _never_or_duration(value: object) -> float:
    return 0.0 if value in ("never", "none") else parse_duration(value)


def endpoint_scope(value: object) -> tuple[str, int | None]:
    """``ADDRESS`` (every port of it) or ``ADDRESS:PORT`` (``[IPv6]:PORT``)."""
    text = f.string(value).strip()
    try:
        return str(ipaddress.ip_address(text)), None
    except ValueError:
        pass  # not a bare address: ADDRESS:PORT
    host, sep, port = text.rpartition(":")
    try:
        if sep and port.isdigit() and 1 <= int(port) <= 65535:
            return str(ipaddress.ip_address(host.removeprefix("[").removesuffix("]"))), int(port)
    except ValueError:
        pass  # reported below
    raise FieldError(f"expected ADDRESS or ADDRESS:PORT, got {f.show(value)}")


def show_endpoint(address: str, port: int | None) -> str:
    host = f"[{address}]" if ":" in address and port is not None else address
    return host if port is None else f"{host}:{port}"


def read_fault(section: f.Section) -> Fault | None:
    """One fault mapping (its keys already checked against ``FAULT_KEYS``); None when it has
    problems (recorded in ``section.problems``)."""
    before = section.problems.count
    kind = section.get("type", f.one_of(FAULT_TYPES))
    if f.is_missing(kind) or section.problems.count != before:
        return None
    tcp = kind in TCP_FAULTS
    for key in SETTING_KEYS:
        if section.has(key) and key not in FAULT_SETTINGS[kind]:
            section.problems.add(f.join(section.path, key), f"not used by a {kind} fault")
    if section.has("healthChecks") and kind not in PROBE_FAULTS:
        section.problems.add(
            f.join(section.path, "healthChecks"),
            f"only {', '.join(PROBE_FAULTS)} faults can act on health checks",
        )
    if kind == "refuse" and section.has("direction"):
        section.problems.add(
            f.join(section.path, "direction"), "refuse acts on new connections, not a direction"
        )
    for key in REQUIRED.get(kind, ()):
        if not section.has(key):
            section.problems.add(f.join(section.path, key), f"required by a {kind} fault")
    scope: list[tuple[str, int | None]] = []
    for path, raw in section.items("endpoints"):
        try:
            scope.append(endpoint_scope(raw))
        except FieldError as error:
            section.problems.add(path, str(error))
    fault = Fault(
        type=kind,
        direction=section.get("direction", f.one_of(DIRECTIONS), DEFAULT_DIRECTION[tcp]),
        probability=section.get("probability", _probability, 1.0),
        endpoints=tuple(dict.fromkeys(scope)),
        latency=section.get("latency", parse_duration, 0.0),
        jitter=section.get("jitter", parse_duration, 0.0),
        rate=section.get("rate", _rate, 0),
        average_size=section.get("averageSize", _positive_size, 0),
        size_variation=section.get("sizeVariation", byte_size, 0),
        delay=section.get("delay", parse_duration, REORDER_HOLD if kind == "reorder" else 0.0),
        bytes=section.get("bytes", byte_size, 0),
        timeout=section.get("timeout", _never_or_duration, 0.0),
        health_checks=section.get("healthChecks", f.boolean, False),
    )
    if kind == "slicer" and fault.average_size and fault.size_variation >= fault.average_size:
        section.problems.add(f.join(section.path, "sizeVariation"), "must be less than averageSize")
    return fault if section.problems.count == before else None


def read_faults(parent: f.Section, key: str, base: tuple[Fault, ...]) -> tuple[Fault, ...]:
    if not parent.has(key):
        return base
    items = parent.items(key)
    if len(items) > MAX_FAULTS:
        parent.problems.add(f.join(parent.path, key), f"at most {MAX_FAULTS} faults")
        return base
    faults = []
    for path, raw in items:
        fault = read_fault(f.Section(raw, path, parent.problems, FAULT_KEYS))
        if fault is not None:
            faults.append(fault)
    return tuple(faults)


def render_fault(fault: Fault) -> dict[str, object]:
    document: dict[str, object] = {"type": fault.type}
    if fault.type != "refuse":
        document["direction"] = fault.direction
    document["probability"] = fault.probability
    if fault.endpoints:
        document["endpoints"] = [show_endpoint(a, p) for a, p in fault.endpoints]
    values: dict[str, object] = {
        "latency": fault.latency,
        "jitter": fault.jitter,
        "rate": fault.rate,
        "averageSize": fault.average_size,
        "sizeVariation": fault.size_variation,
        "delay": fault.delay,
        "bytes": fault.bytes,
        "timeout": fault.timeout,
    }
    document.update((key, values[key]) for key in FAULT_SETTINGS[fault.type])
    if fault.health_checks:
        document["healthChecks"] = True
    return document


def render_faults(faults: tuple[Fault, ...]) -> list[dict[str, object]]:
    return [render_fault(fault) for fault in faults]


def read_mirror(parent: f.Section, key: str, base: Mirror | None) -> Mirror | None:
    if not parent.has(key):
        return base
    if parent.raw(key) == "none":
        return None
    path = f.join(parent.path, key)
    before = parent.problems.count
    section = f.Section(parent.raw(key), path, parent.problems, MIRROR_KEYS)
    nowhere: tuple[str, int | None] = ("", None)
    address, port = section.get("endpoint", endpoint_scope, nowhere)
    if address and port is None:
        section.problems.add(f.join(path, "endpoint"), "needs a port: ADDRESS:PORT")
    percent = section.get("percent", _percent, 100.0)
    if parent.problems.count != before or port is None:
        return base
    return Mirror(address, port, percent)


def render_mirror(mirror: Mirror | None) -> object:
    if mirror is None:
        return "none"
    return {"endpoint": mirror.describe(), "percent": mirror.percent}


def protocol_problems(section: f.Section, protocols: set[str]) -> None:
    """A service's own ``faults``/``mirror`` must fit its ports' ``protocols``: a TCP fault on
    a service without a TCP port would never act (inherited ones are not checked: ``defaults``
    speak for every service)."""
    raw_faults = section.raw("faults")
    for index, raw in enumerate(raw_faults if isinstance(raw_faults, list) else ()):
        kind = raw.get("type") if isinstance(raw, dict) else None
        if kind not in FAULT_TYPES:
            continue  # reported by read_fault
        tcp = kind in TCP_FAULTS
        wanted = "TCP" if tcp else "UDP"
        if wanted not in protocols:
            kinds = ", ".join(TCP_FAULTS if tcp else UDP_FAULTS)
            section.problems.add(
                f"{f.join(section.path, 'faults')}[{index}].type",
                f"{kind} acts on {wanted} ({kinds}), and the service has no {wanted} port",
            )
    if section.raw("mirror") not in (None, "none") and "TCP" not in protocols:
        section.problems.add(f.join(section.path, "mirror"), "mirrors TCP connections only")
