"""The node's addresses, read and changed over netlink (pyroute2): the OS-touching half of
``lbd.net.addresses``.

Blocking calls, meant for a worker thread (``asyncio.to_thread``): pyroute2's asyncio API needs
a netlink datagram endpoint, which uvloop cannot open, while its synchronous ``IPRoute`` runs
its own private loop in whatever thread calls it. A round trip takes a millisecond or so.

Where lbd puts an address, as kube-proxy's IPVS mode does with ``kube-ipvs0``: on a dummy
interface ``lbd0`` when the kernel has the dummy driver (created if missing, and left in place
at exit, as ``kube-ipvs0`` is), else on ``lo``. Either way as a /32 (/128), so no prefix route
comes with it. What marks an address as lbd's, so that it never touches anyone else's:
- on ``lbd0``: being there;
- on ``lo``: the label ``lo:lbd`` (IPv4 has labels; ``ip address`` shows it), and the address
  protocol ``IFA_PROTO`` 108 (Linux 6.1 and later; IPv6 has no labels, so an IPv6 address on
  ``lo`` is known as lbd's by its protocol alone).
"""

from __future__ import annotations

import errno
import ipaddress
import os
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl.ifaddrmsg import IFA_F_NODAD

DUMMY = "lbd0"
LABEL = "lo:lbd"
PROTO = 108  # IFA_PROTO of lbd's addresses: 'l'; ``ip address`` prints "proto 108"
RTN_LOCAL = 2


class NetlinkFailure(Exception):
    """A netlink request failed: what was asked and the kernel's error, for the log."""


@dataclass(slots=True)
class Outcome:
    """What one ``reconcile`` changed, and what it could not change."""

    device: str
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)  # lbd's already, and still wanted
    failed: list[tuple[str, str]] = field(default_factory=list)  # (address, why)


def is_ours(message: Any, dummy_index: int | None) -> bool:
    if dummy_index is not None and message["index"] == dummy_index:
        return True
    return bool(message.get("IFA_PROTO") == PROTO or message.get("IFA_LABEL") == LABEL)


class NodeNetlink:
    """One netlink conversation per call; remembers which device it put addresses on."""

    def __init__(self) -> None:
        self.device: tuple[int, str] | None = None  # (index, name) of lbd0 or lo
        self.dummy_index: int | None = None

    def reconcile(self, wanted: Collection[str]) -> Outcome:
        """Add each of ``wanted`` that no interface has; remove each address of lbd's that
        ``wanted`` lacks (``()``: all of them). NetlinkFailure when the node cannot be read."""
        try:
            with IPRoute() as ipr:
                index, name = self._device(ipr)
                present: set[str] = set()
                ours: dict[str, int] = {}  # address -> the interface it is on
                for message in ipr.get_addr():
                    address = _normal(message.get("IFA_ADDRESS") or message.get("IFA_LOCAL"))
                    if address is None:
                        continue
                    present.add(address)
                    if is_ours(message, self.dummy_index):
                        ours[address] = message["index"]
                outcome = Outcome(name)
                for address in sorted(set(wanted) - present):
                    self._change(ipr, "add", index, address, outcome)
                for address in sorted(set(ours) - set(wanted)):
                    self._change(ipr, "del", ours[address], address, outcome)
                outcome.kept = sorted(set(ours) & set(wanted))
                return outcome
        except (NetlinkError, OSError) as error:
            raise NetlinkFailure(f"cannot read the node's addresses: {_why(error)}") from None

    def _device(self, ipr: Any) -> tuple[int, str]:
        if self.device is not None:
            return self.device
        found = ipr.link_lookup(ifname=DUMMY)
        if not found:
            try:
                ipr.link("add", ifname=DUMMY, kind="dummy")
                found = ipr.link_lookup(ifname=DUMMY)
            except NetlinkError as error:
                # No dummy driver (EOPNOTSUPP), or not allowed to load it: lo it is.
                if error.code not in (errno.EOPNOTSUPP, errno.ENODEV, errno.EPERM, errno.ENOENT):
                    raise
        if found:
            ipr.link("set", index=found[0], state="up")
            self.device = (found[0], DUMMY)
            self.dummy_index = found[0]
        else:
            self.device = (ipr.link_lookup(ifname="lo")[0], "lo")
        return self.device

    def _change(self, ipr: Any, command: str, index: int, address: str, outcome: Outcome) -> None:
        v6 = ":" in address
        request: dict[str, Any] = {
            "index": index,
            "address": address,
            "prefixlen": 128 if v6 else 32,
        }
        if command == "add":
            request["proto"] = PROTO
            if v6:
                request["flags"] = IFA_F_NODAD  # a dummy link would hold it tentative for DAD
            elif self.dummy_index is None:
                request["label"] = LABEL
        try:
            ipr.addr(command, **request)
        except NetlinkError as error:
            # Someone else did it first: the address is (or is no longer) there, as wanted.
            benign = errno.EEXIST if command == "add" else errno.EADDRNOTAVAIL
            if error.code != benign:
                outcome.failed.append((address, f"{command}: {_why(error)}"))
            return
        (outcome.added if command == "add" else outcome.removed).append(address)


def _normal(text: object) -> str | None:
    if not isinstance(text, str):
        return None
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return None


def _why(error: NetlinkError | OSError) -> str:
    code = error.code if isinstance(error, NetlinkError) else error.errno
    if isinstance(code, int) and code > 0:
        return f"{errno.errorcode.get(code, str(code))}: {os.strerror(code)}"
    return str(error)
