"""``lbd status``: the ``/services`` view as a table people can read at a glance."""

from __future__ import annotations

from typing import Any

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
    return "\n".join(lines)
