"""What a fault and a mirror are (``faults:`` and ``mirror:`` of a service), as frozen values.

A ``Fault`` is one misbehaviour of a service port's traffic, Toxiproxy's toxics for TCP and
netem's for UDP datagrams: its ``type``, the ``direction`` it acts on, the ``probability`` that
it applies (per connection for TCP, per datagram for UDP) and, optionally, the ``endpoints``
whose traffic it is limited to. Each type reads only its own settings (``FAULT_SETTINGS``);
the others keep their defaults, so two equal faults are equal values. Parsing and rendering are
``lbd.config.faults``; what the data path does with them is ``lbd.net.tcp_faults`` and
``lbd.net.udp_faults``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

TcpFaultType = Literal[
    "latency", "bandwidth", "slicer", "limit_data", "timeout", "reset_peer", "slow_close", "refuse"
]
UdpFaultType = Literal["drop", "delay", "duplicate", "reorder"]
FaultType = Literal[TcpFaultType, UdpFaultType]
Direction = Literal["downstream", "upstream", "both"]
TCP_FAULTS: tuple[FaultType, ...] = get_args(TcpFaultType)
UDP_FAULTS: tuple[FaultType, ...] = get_args(UdpFaultType)
FAULT_TYPES: tuple[FaultType, ...] = (*TCP_FAULTS, *UDP_FAULTS)
DIRECTIONS: tuple[Direction, ...] = ("downstream", "upstream", "both")
# lbd/v1 keys (besides type, direction, probability, endpoints) each type reads.
FAULT_SETTINGS: dict[FaultType, tuple[str, ...]] = {
    "latency": ("latency", "jitter"),
    "bandwidth": ("rate",),
    "slicer": ("averageSize", "sizeVariation", "delay"),
    "limit_data": ("bytes",),
    "timeout": ("timeout",),
    "reset_peer": ("timeout",),
    "slow_close": ("delay",),
    "refuse": (),
    "drop": (),
    "delay": ("delay", "jitter"),
    "duplicate": (),
    "reorder": ("delay",),
}
# Toxiproxy's default stream is downstream; netem acts on every packet of the path, so a UDP
# fault acts on both directions unless told otherwise.
DEFAULT_DIRECTION: dict[bool, Direction] = {True: "downstream", False: "both"}  # by is-TCP
# Faults that may act on lbd's own active health probes too, when asked (``healthChecks``).
PROBE_FAULTS: tuple[FaultType, ...] = ("latency", "timeout", "reset_peer", "refuse")
REORDER_HOLD = 0.01  # reorder: a held datagram waits this long at most for the next one


@dataclass(frozen=True, slots=True)
class Fault:
    type: FaultType
    direction: Direction = "downstream"
    probability: float = 1.0  # per connection (TCP) or per datagram (UDP)
    # Only traffic to these endpoints: (address, port or None for every port); () is all.
    endpoints: tuple[tuple[str, int | None], ...] = ()
    latency: float = 0.0  # latency: seconds added to each chunk
    jitter: float = 0.0  # latency, delay: each delay is latency ± up to jitter
    rate: int = 0  # bandwidth: bytes per second
    average_size: int = 0  # slicer: bytes per slice, on average
    size_variation: int = 0  # slicer: each slice is averageSize ± up to this
    delay: float = 0.0  # slicer: between slices; slow_close: before the FIN; delay; reorder
    bytes: int = 0  # limit_data: the connection ends after this many bytes
    timeout: float = 0.0  # timeout: close after (0: never); reset_peer: reset after
    health_checks: bool = False  # also act on the active health probes of endpoints in scope

    @property
    def tcp(self) -> bool:
        return self.type in TCP_FAULTS

    @property
    def upstream(self) -> bool:
        """Acts on bytes or datagrams from the client towards the endpoint."""
        return self.direction != "downstream"

    @property
    def downstream(self) -> bool:
        """Acts on bytes or datagrams from the endpoint towards the client."""
        return self.direction != "upstream"


@dataclass(frozen=True, slots=True)
class Mirror:
    """A copy of every client byte of a share of the connections goes to a shadow endpoint,
    whose replies are read and dropped."""

    address: str
    port: int
    percent: float = 100.0  # of the connections

    def describe(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"{host}:{self.port}"
