"""Finding what an admin call is about: a service port of the runtime, by name; and the two
errors every admin view raises (the server turns them into 404 and 400 JSON errors)."""

from __future__ import annotations

from typing import Any

from lbd.endpoints.route import Route
from lbd.runtime.runtime import Runtime

Json = dict[str, Any]


class NotFound(LookupError):
    pass


class BadRequest(ValueError):
    pass


def find_route(runtime: Runtime, service: str | None, port: str | None) -> Route:
    """The route of ``service`` (NAMESPACE/NAME, or NAME in ``default``) and ``port`` (its name,
    or its number when unnamed; optional when the service has one port)."""
    routes = routes_of(runtime, service)
    key = f"{routes[0].namespace}/{routes[0].service}"
    if not port:
        if len(routes) == 1:
            return routes[0]
        names = ", ".join(r.port_name for r in routes)
        raise BadRequest(f"service {key} has several ports ({names}); say which with port")
    for route in routes:
        if route.port_name == port:
            return route
    raise NotFound(f"service {key} has no port {port}")


def routes_of(runtime: Runtime, service: str | None) -> list[Route]:
    """Every port of ``service`` (NAMESPACE/NAME, or NAME in ``default``)."""
    if not service:
        raise BadRequest("service is required (NAMESPACE/NAME)")
    key = service if "/" in service else f"default/{service}"
    routes = [r for r in runtime.routes.values() if f"{r.namespace}/{r.service}" == key]
    if not routes:
        raise NotFound(f"no service {key}")
    return routes
