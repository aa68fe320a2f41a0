"""What a metric is to lbd: a stats field, the kind of metric it makes, its help and labels.

The table of every metric is ``lbd.observability.metrics``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Kind = Literal["counter", "gauge", "histogram", "info"]  # info: a gauge of 1, labels from the field
Merge = Literal["sum", "max"]
Scope = Literal[
    "route",
    "endpoint",
    "health",
    "process",
    "supervisor",
    "node",
    "kubernetes",
    "kubernetes_kind",
    "fault",
]
Labels = tuple[str, ...]

SCOPE_LABELS: dict[Scope, Labels] = {
    "route": ("namespace", "service", "port"),
    "endpoint": ("namespace", "service", "port", "endpoint"),
    "health": (),
    "process": (),
    "supervisor": (),
    "node": (),
    "kubernetes": (),  # lbd run --kubernetes: KubernetesStats
    "kubernetes_kind": ("kind",),  # one per watched kind: KubernetesKindStats
    "fault": ("namespace", "service", "port", "fault", "type"),  # FaultStats, by fault id
}


@dataclass(frozen=True, slots=True)
class MetricSpec:
    field: str  # the stats field it reads; the metric is named after it
    kind: Kind
    help: str
    scope: Scope
    label: str | None = None  # the field is a family: one value of this label per sub-field
    merge: Merge = "sum"
    buckets: tuple[float, ...] = ()  # histograms: upper bounds, +Inf implied
    info: Labels = ()  # info metrics: the label names of the field's tuple
    udp_only: bool = False  # read only for UDP service ports

    @property
    def name(self) -> str:
        return f"lbd_{self.field}"

    @property
    def labels(self) -> Labels:
        extra = (self.label,) if self.label is not None else self.info
        return (*SCOPE_LABELS[self.scope], *extra)
