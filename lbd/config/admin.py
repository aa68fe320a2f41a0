"""The sections that configure the lbd process rather than its services: ``admin`` (where the
admin HTTP API listens) and ``workers`` (how many processes serve)."""

from __future__ import annotations

import os

from lbd.config import fields as f
from lbd.config.errors import FieldError
from lbd.config.model import MAX_WORKERS, Admin

ADMIN_KEYS = ("enabled", "address", "socket", "tokenFile")
# Port 0 asks the kernel for a free port: for tests and ad-hoc runs.
_port_number = f.int_between(0, 65535)


def admin_section(section: f.Section) -> Admin:
    base = Admin()
    address, port = section.get("address", _host_port, (base.address, base.port))
    socket_path = section.get("socket", _path, None)
    if socket_path is not None and section.has("address"):
        section.problems.add(
            f.join(section.path, "socket"), "address and socket are alternatives; set one"
        )
    return Admin(
        enabled=section.get("enabled", f.boolean, base.enabled),
        address=address,
        port=port,
        socket=socket_path,
        token_file=section.get("tokenFile", _path, None),
    )


def workers_count(value: object) -> int:
    """``workers``: a process count, or ``auto`` for one per CPU this process may run on."""
    if value == "auto":
        return len(os.sched_getaffinity(0)) or 1
    if isinstance(value, str):
        raise FieldError(f"expected a number of processes or 'auto', got {value!r}")
    return _workers(value)


_workers = f.int_between(1, MAX_WORKERS)


def _host_port(value: object) -> tuple[str, int]:
    """``HOST:PORT`` or ``[IPv6]:PORT``, HOST an IP literal; port 0 lets the kernel pick."""
    text = f.string(value)
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit():
        raise FieldError(f"expected ADDRESS:PORT such as 127.0.0.1:9180, got {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise FieldError(f"write an IPv6 address in brackets, as [::1]:9180, got {text!r}")
    return f.ip_address(host), _port_number(int(port_text))


def _path(value: object) -> str:
    text = f.string(value)
    if not text or "\0" in text:
        raise FieldError("expected a file path")
    return text
