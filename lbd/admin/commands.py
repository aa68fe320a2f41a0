"""``lbd status``, ``lbd explain``, ``lbd endpoint`` and ``lbd fault``: admin API calls printed
for people."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Any
from urllib.parse import quote

from lbd.admin.client import AdminTarget, AdminUnreachable, call
from lbd.admin.fault_cli import fault_settings
from lbd.admin.server import AdminError, read_token
from lbd.admin.status import endpoint_totals, fault_table, rates, status_table

EXIT_OK = 0
EXIT_REFUSED = 1  # the admin API answered, and said no (unknown service, bad weight, token)
EXIT_ADMIN = 4
CLEAR_SCREEN = "\x1b[H\x1b[2J"


def admin_command(args: argparse.Namespace, target: AdminTarget) -> int:
    commands = {"status": status, "explain": explain, "endpoint": endpoint, "fault": fault}
    command = commands[args.command](args, target)
    try:
        return asyncio.run(command)
    except AdminUnreachable as error:
        print(f"lbd {args.command}: {error}", file=sys.stderr)
        return EXIT_ADMIN
    except KeyboardInterrupt:
        return EXIT_OK


async def _get(target: AdminTarget, path: str, params: dict[str, str] | None = None) -> Any:
    code, body = await call(target, path, params)
    if code != 200:
        raise AdminUnreachable(f"{path}: {code} {body.get('error', body)}")
    return body


async def status(args: argparse.Namespace, target: AdminTarget) -> int:
    previous: tuple[float, dict[Any, int]] | None = None
    shown = 0
    while True:
        view = await _get(target, "/services")
        now = time.monotonic()
        totals = endpoint_totals(view)
        cx_rates = rates(previous[1], totals, now - previous[0]) if previous else None
        previous = (now, totals)
        text = json.dumps(view, indent=2) if args.json else status_table(view, cx_rates)
        if args.watch and sys.stdout.isatty():
            text = CLEAR_SCREEN + f"lbd at {target.describe()}, every {args.interval:g}s\n\n" + text
        elif args.watch and shown:
            text = "\n" + text
        print(text, flush=True)
        shown += 1
        if not args.watch or (args.count and shown >= args.count):
            return EXIT_OK
        await asyncio.sleep(args.interval)


async def explain(args: argparse.Namespace, target: AdminTarget) -> int:
    params = {"service": args.service}
    if args.port:
        params["port"] = args.port
    if args.client:
        params["client"] = args.client
    if getattr(args, "kind", "clusterIP") != "clusterIP":
        params["kind"] = args.kind
    view = await _get(target, "/explain", params)
    if args.json:
        print(json.dumps(view, indent=2))
        return EXIT_OK
    client = f", client {view['client']}" if view["client"] else ""
    print(f"{view['service']} port {view['port']} ({view['strategy']}){client}:")
    width = max((len(e["endpoint"]) for e in view["endpoints"]), default=0)
    for endpoint in view["endpoints"]:
        if endpoint["eligible"]:
            verdict = "eligible"
        else:
            verdict = f"not eligible: {endpoint['reason']} ({endpoint['detail']})"
        print(f"  {endpoint['endpoint'].ljust(width)}  {verdict}")
    if not view["endpoints"]:
        print("  (no endpoints)")
    eligible = len(view["eligible"])
    print(f"{eligible} of {len(view['endpoints'])} endpoints eligible")
    return EXIT_OK


def _answered(args: argparse.Namespace, code: int, body: Any) -> int | None:
    """The exit code when the admin API refused the call, or ``--json`` printed its answer;
    None when the answer is left to print for people."""
    if code != 200:
        print(f"lbd {args.command}: {code} {body.get('error', body)}", file=sys.stderr)
        return EXIT_REFUSED
    if args.json:
        print(json.dumps(body, indent=2))
        return EXIT_OK
    return None


def _token(args: argparse.Namespace) -> str | None:
    """The bearer token of ``--token-file`` (or the config's); raises AdminError."""
    return read_token(args.token_file).decode() if args.token_file else None


async def endpoint(args: argparse.Namespace, target: AdminTarget) -> int:
    """POST /endpoints/{drain,enable,weight}; prints each service port it changed."""
    try:
        token = _token(args)
    except AdminError as error:
        print(f"lbd endpoint: {error}", file=sys.stderr)
        return EXIT_REFUSED
    params = {"service": args.service, "endpoint": args.endpoint}
    if args.port:
        params["port"] = args.port
    if args.weight is not None:
        params["weight"] = args.weight
    code, body = await call(target, f"/endpoints/{args.action}", params, "POST", token)
    if (done := _answered(args, code, body)) is not None:
        return done
    for changed in body["changed"]:
        for view in changed["endpoints"]:
            override = view["override"] or {}
            weight = f"{view['weight']}{' (override)' if 'weight' in override else ''}"
            print(
                f"{changed['service']} port {changed['port']}: {view['endpoint']} "
                f"{view['state']}, weight {weight}"
            )
    return EXIT_OK


async def fault(args: argparse.Namespace, target: AdminTarget) -> int:
    """GET/POST/DELETE /faults; prints the faults it listed, added or removed."""
    try:
        token = _token(args)
        if args.action == "add":
            body = {**fault_settings(args.settings), "service": args.service, "type": args.type}
            if args.port:
                body["port"] = args.port
            code, answer = await call(target, "/faults", None, "POST", token, body)
        elif args.action == "remove":
            path = "/faults" if args.id == "all" else f"/faults/{quote(args.id, safe='')}"
            code, answer = await call(target, path, None, "DELETE", token)
        else:
            code, answer = await call(target, "/faults")
    except (AdminError, ValueError) as error:
        print(f"lbd fault: {error}", file=sys.stderr)
        return EXIT_REFUSED
    if (done := _answered(args, code, answer)) is not None:
        return done
    shown = answer["faults"] if args.action == "list" else answer.get("removed", [answer])
    print(fault_table(shown) if shown else "(no faults)")
    return EXIT_OK
