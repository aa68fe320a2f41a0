"""``lbd fault add|list|remove``: its command line (the calls are in ``lbd.admin.commands``).

Only argparse here, so that building lbd's parser stays cheap for ``lbd run``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

FAULT_EPILOG = (
    "examples:\n"
    "  lbd fault add web latency latency=50ms jitter=10ms direction=downstream\n"
    "  lbd fault add shop/db refuse probability=0.2 endpoints=127.0.1.2\n"
    "  lbd fault add dns drop probability=0.1 --port dns\n"
    "  lbd fault list\n"
    "  lbd fault remove f3a9c1e2b\n"
    "docs/faults.md lists every type and its settings."
)


def add_fault_parser(
    commands: argparse._SubParsersAction,  # type: ignore[type-arg]
    with_admin_target: Callable[[argparse.ArgumentParser], None],
) -> None:
    fault = commands.add_parser(
        "fault",
        help="add, list or remove load-test faults of a running lbd (admin API)",
        description="Faults over the admin API: they act on new connections (UDP: the next "
        "datagram) at once and stay across reloads. Adding and removing need the admin token "
        "(--token-file, or admin.tokenFile of --config), or the admin unix socket (--socket).",
        epilog=FAULT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = fault.add_subparsers(dest="action", required=True, metavar="ACTION")
    add = actions.add_parser("add", help="add a fault to a service port", epilog=FAULT_EPILOG)
    add.add_argument("service", help="NAMESPACE/NAME (or NAME in default)")
    add.add_argument("type", help="latency, bandwidth, slicer, limit_data, timeout, ...")
    add.add_argument(
        "settings",
        nargs="*",
        metavar="KEY=VALUE",
        help="direction, probability, endpoints (comma-separated) and the type's own keys",
    )
    add.add_argument("--port", help="port name or number; needed when the service has several")
    listing = actions.add_parser("list", help="every fault, with its id and counters")
    remove = actions.add_parser("remove", help="remove a fault added at runtime")
    remove.add_argument("id", help="the fault's id (lbd fault list), or 'all'")
    for sub in (add, listing, remove):
        sub.add_argument("--token-file", metavar="FILE", help="the admin bearer token")
        sub.add_argument("--json", action="store_true", help="print the admin API's JSON")
        with_admin_target(sub)


def fault_settings(pairs: list[str]) -> dict[str, object]:
    """``KEY=VALUE`` words as a fault's JSON: numbers become numbers, ``endpoints`` a list."""
    settings: dict[str, object] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"expected KEY=VALUE, got {pair!r}")
        value: object = text
        if key == "endpoints":
            value = [item.strip() for item in text.split(",") if item.strip()]
        else:
            for kind in (int, float):
                try:
                    value = kind(text)
                    break
                except ValueError:
                    continue
        settings[key] = value
    return settings
