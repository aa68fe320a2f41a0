"""Faults over the admin API: list, add, remove (``GET/POST/DELETE /faults``; docs/faults.md).

A fault added here is the same object a file's ``faults:`` entry makes, read by the same parser
(so a bad one is a 400 with ``path: message`` problems); it acts on new connections (and, for
UDP, on the next datagram of open sessions) of its service port at once, stays across reloads
while the port exists, and is removed by its id. Faults of the config file are listed too; they
change by editing the file. Each change is logged and counted (``lbd_fault_changes_total``).
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable

import structlog

from lbd.admin.lookup import BadRequest, Json, NotFound, find_route
from lbd.config import fields as f
from lbd.config.faults import FAULT_KEYS, MAX_FAULTS, read_fault, render_fault
from lbd.endpoints.faults import RUNTIME, LiveFault
from lbd.endpoints.route import Route
from lbd.runtime.runtime import Runtime

log = structlog.get_logger("lbd.admin")

TARGET_KEYS = ("service", "namespace", "port")


def new_fault_id() -> str:
    """A fresh id for a runtime fault: random, so several workers and their supervisor never
    need to agree on a counter (the supervisor picks it and sends it to every worker)."""
    return f"f{secrets.token_hex(4)}"


def fault_json(route: Route, fault: LiveFault) -> Json:
    stats = fault.stats
    return {
        "id": fault.id,
        "service": f"{route.namespace}/{route.service}",
        "port": route.port_name,
        "origin": fault.origin,
        **render_fault(fault.spec),
        "applied": stats.fault_applied_total,
        "bytesDelayed": stats.fault_bytes_delayed_total,
        "bytesDiscarded": stats.fault_bytes_discarded_total,
        "connectionsCut": stats.fault_cx_cut_total,
    }


def route_faults(route: Route) -> Json:
    """What ``/services`` (and so ``lbd status``) shows of a port's faults and mirror."""
    book = route.fault_book
    if book.empty:
        return {}
    stats = route.stats
    mirror = book.mirror
    return {
        "faults": [fault_json(route, fault) for fault in book.faults],
        "mirror": None
        if mirror is None
        else {
            "endpoint": mirror.describe(),
            "percent": mirror.percent,
            "connections": stats.mirror_cx_total,
            "failed": stats.mirror_cx_failed_total,
            "bytesSent": stats.mirror_bytes_sent_total,
            "bytesDropped": stats.mirror_bytes_dropped_total,
        },
    }


def list_faults(runtime: Runtime, query: dict[str, str]) -> Json:
    return {
        "faults": [
            fault_json(route, fault)
            for route in runtime.routes.values()
            for fault in route.fault_book.faults
        ]
    }


def add_fault(runtime: Runtime, query: dict[str, str]) -> Json:
    """``query["body"]``: the JSON request, ``{"service", "namespace", "port", ...one fault}``;
    ``query["id"]``: the id to give it (a supervisor's), else a new one."""
    body = _body(query.get("body", ""))
    namespace = body.pop("namespace", None)
    service, port = body.pop("service", None), body.pop("port", None)
    if not isinstance(service, str) or not service:
        raise BadRequest("service: required (NAME, or NAMESPACE/NAME)")
    if namespace is not None and not isinstance(namespace, str):
        raise BadRequest("namespace: expected a string")
    if port is not None and not isinstance(port, str | int):
        raise BadRequest("port: expected the port's name or number")
    if namespace and "/" not in service:
        service = f"{namespace}/{service}"
    route = find_route(runtime, service, None if port is None else str(port))
    problems = f.Problems()
    spec = read_fault(f.Section(body, "", problems, FAULT_KEYS))
    if problems.count or spec is None:
        raise BadRequest("; ".join(str(problem) for problem in problems.all()))
    if spec.tcp != (route.protocol == "TCP"):
        raise BadRequest(f"type: {spec.type} does not act on a {route.protocol} port")
    if len(route.fault_book.runtime) >= MAX_FAULTS:
        raise BadRequest(f"service port {route.label} has {MAX_FAULTS} faults already")
    fault_id = query.get("id") or new_fault_id()
    if _find(runtime, fault_id) is not None:
        raise BadRequest(f"id: {fault_id} is taken")
    fault = route.add_fault(fault_id, spec)
    runtime.follow_faults(route)
    runtime.process.fault_changes_total.added += 1
    log.info("fault added", id=fault_id, route=route.label, **render_fault(spec))
    return fault_json(route, fault)


def remove_fault(runtime: Runtime, query: dict[str, str]) -> Json:
    """``query["id"]``: one runtime fault; ``all``: every one."""
    fault_id = query.get("id", "")
    if fault_id == "all":
        found = [(r, x) for r in runtime.routes.values() for x in r.fault_book.runtime]
    else:
        one = _find(runtime, fault_id)
        if one is None:
            raise NotFound(f"no fault {fault_id}")
        if one[1].origin != RUNTIME:
            raise BadRequest(f"fault {fault_id} comes from the config file: change it there")
        found = [one]
    removed = []
    for route, fault in found:
        route.remove_fault(fault.id)
        runtime.follow_faults(route)
        runtime.process.fault_changes_total.removed += 1
        log.info("fault removed", id=fault.id, route=route.label, type=fault.spec.type)
        removed.append(fault_json(route, fault))
    return {"removed": removed}


def _find(runtime: Runtime, fault_id: str) -> tuple[Route, LiveFault] | None:
    for route in runtime.routes.values():
        for fault in route.fault_book.faults:
            if fault.id == fault_id:
                return route, fault
    return None


MAX_BODY = 64 * 1024


def _body(text: str) -> dict[str, object]:
    if len(text) > MAX_BODY:
        raise BadRequest(f"the request body is longer than {MAX_BODY} bytes")
    try:
        body = json.loads(text)
    except ValueError as error:
        raise BadRequest(f"the request body is not JSON: {error}") from None
    if not isinstance(body, dict):
        raise BadRequest(f"the request body must be a JSON object, got {f.type_name(body)}")
    return body


CALLS: dict[str, Callable[[Runtime, dict[str, str]], Json]] = {
    "faults": list_faults,
    "fault_add": add_fault,
    "fault_remove": remove_fault,
}
