"""``lbd status``: the ``/services`` view as a table people can read at a glance."""

from __future__ import annotations

from typing import Any

from lbd.config.durations import format_duration

Json = dict[str, Any]
RateKey = tuple[str, str, str]  # service, port, endpoint
COLUMNS = ("SERVICE", "PORT", "LISTENERS", "ENDPOINT", "STATE", "WEIGHT", "ACTIVE", "TOTAL", "CX/S")


def endpoint_totals(view: Json) -> dict[RateKey, int]:
    """Connections started to each endpoint so far: two of these, apart in time, give rates."""
    return {
        (route["service"], route["port"], endpoint["endpoint"]): endpoint["total"]
        for route in view["services"]
        for endpoint in route["endpoints"]
    }


def rates(
    before: dict[RateKey, int], after: dict[RateKey, int], seconds: float
) -> dict[RateKey, float]:
    if seconds <= 0:
        return {}
    return {
        key: max(0, total - before[key]) / seconds for key, total in after.items() if key in before
    }


def status_table(view: Json, cx_rates: dict[RateKey, float] | None = None) -> str:
    """One block of rows per service port: its listeners down one column, its endpoints down
    the others. A weight marked ``*`` is a runtime override set through the admin API."""
    rows: list[tuple[str, ...]] = [COLUMNS]
    overridden = False
    for route in view["services"]:
        listeners = [f"{x['address']} {x['kind']}" for x in route["listeners"]]
        endpoints = route["endpoints"]
        for i in range(max(len(listeners), len(endpoints), 1)):
            first = i == 0
            cells = [
                route["service"] if first else "",
                route["port"] if first else "",
                listeners[i] if i < len(listeners) else "",
            ]
            if i < len(endpoints):
                endpoint = endpoints[i]
                override = endpoint["override"] or {}
                overridden = overridden or "weight" in override
                key = (route["service"], route["port"], endpoint["endpoint"])
                rate = (cx_rates or {}).get(key)
                cells += [
                    endpoint["endpoint"],
                    endpoint["state"],
                    f"{endpoint['weight']}{'*' if 'weight' in override else ''}",
                    str(endpoint["active"]),
                    str(endpoint["total"]),
                    "-" if rate is None else f"{rate:.1f}",
                ]
            else:
                cells += ["(no endpoints)" if first else "", "", "", "", "", ""]
            rows.append(tuple(cells))
    widths = [max(len(row[c]) for row in rows) for c in range(len(COLUMNS))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]
    if overridden:
        lines.append(
            "* weight set through the admin API (a reload that changes the endpoint clears it)"
        )
    faults = [fault for route in view["services"] for fault in route.get("faults", ())]
    if faults:
        lines += ["", fault_table(faults)]
    for route in view["services"]:
        mirror = route.get("mirror")
        if mirror:
            lines.append(
                f"mirror {route['service']}:{route['port']} -> {mirror['endpoint']} "
                f"({mirror['percent']:g}%): {mirror['connections']} connections, "
                f"{mirror['bytesSent']} bytes sent, {mirror['bytesDropped']} dropped"
            )
    return "\n".join(lines)


FAULT_COLUMNS = ("FAULT", "SERVICE", "PORT", "TYPE", "DIRECTION", "P", "SETTINGS", "APPLIED")
COMMON = ("id", "service", "port", "origin", "type", "direction", "probability")
COUNTERS = ("applied", "bytesDelayed", "bytesDiscarded", "connectionsCut")


def fault_table(faults: list[Json]) -> str:
    """One row per fault (``GET /faults`` or ``/services``); ``*`` marks those of the config
    file (the others were added over the admin API)."""
    rows: list[tuple[str, ...]] = [FAULT_COLUMNS]
    for fault in faults:
        settings = " ".join(
            f"{key}={_setting(key, value)}"
            for key, value in fault.items()
            if key not in COMMON and key not in COUNTERS
        )
        rows.append(
            (
                f"{fault['id']}{'*' if fault['origin'] == 'config' else ''}",
                fault["service"],
                fault["port"],
                fault["type"],
                fault.get("direction", "-"),
                f"{fault['probability']:g}",
                settings or "-",
                str(fault["applied"]),
            )
        )
    widths = [max(len(row[c]) for row in rows) for c in range(len(FAULT_COLUMNS))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]
    if any(fault["origin"] == "config" for fault in faults):
        lines.append("* from the config file (the others were added over the admin API)")
    return "\n".join(lines)


DURATIONS = ("latency", "jitter", "delay", "timeout")


def _setting(key: str, value: object) -> str:
    if key in DURATIONS and isinstance(value, int | float):
        return format_duration(value)
    if isinstance(value, list):
        return ",".join(map(str, value))
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)
