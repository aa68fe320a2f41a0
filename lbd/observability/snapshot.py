"""Metric values at one instant (``Snapshot``): read from the plain-int stats through the table in
``lbd.observability.metrics``, merged across workers, and rendered for prometheus-client.

Several worker processes (``workers: N``) are summed by the supervisor, not by prometheus-client's
multiprocess mode: each worker hands its ``Snapshot`` over (it pickles in a few KB) and the
supervisor serves ``WorkerSnapshots.total()``. Multiprocess mode would need the data path to write
through client objects into per-process mmap files (a cost per increment, a directory to clean up
when a worker is replaced, no custom collectors); a snapshot costs nothing until someone scrapes.
Counters of a worker that exits are kept (``retire``), so a restart never makes a summed counter
go down.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from lbd.observability.metric_spec import Labels, MetricSpec, Scope
from lbd.observability.metrics import BY_SCOPE, METRICS
from lbd.observability.stats import Buckets

HistogramValue = tuple[list[int], float]  # per-bucket counts (last is +Inf), sum of values


@dataclass(slots=True)
class Snapshot:
    """Values of every metric at one instant: plain data, picklable, mergeable."""

    values: dict[str, dict[Labels, float]] = field(default_factory=dict)
    histograms: dict[str, dict[Labels, HistogramValue]] = field(default_factory=dict)

    def add(self, name: str, labels: Labels, value: float) -> None:
        series = self.values.setdefault(name, {})
        series[labels] = series.get(labels, 0) + value

    def set_histogram(self, name: str, labels: Labels, counts: list[int], total: float) -> None:
        self.histograms.setdefault(name, {})[labels] = (list(counts), total)

    def value(self, name: str, *labels: str) -> float:
        """One series' value (0 when absent): for tests and ``lbd status``."""
        return self.values.get(name, {}).get(labels, 0)


def merge(snapshots: Iterable[Snapshot]) -> Snapshot:
    """One snapshot for several workers, each metric combined by its ``merge`` rule."""
    total = Snapshot()
    for snap in snapshots:
        for name, series in snap.values.items():
            rule = METRICS[name].merge
            into = total.values.setdefault(name, {})
            for labels, value in series.items():
                if labels in into:
                    into[labels] = (
                        into[labels] + value if rule == "sum" else max(into[labels], value)
                    )
                else:
                    into[labels] = value
        for name, hist_series in snap.histograms.items():
            hist_into = total.histograms.setdefault(name, {})
            for labels, (counts, value_sum) in hist_series.items():
                if labels in hist_into:
                    old_counts, old_sum = hist_into[labels]
                    hist_into[labels] = (
                        [a + b for a, b in zip(old_counts, counts, strict=True)],
                        old_sum + value_sum,
                    )
                else:
                    hist_into[labels] = (list(counts), value_sum)
    return total


def read_stats(
    snap: Snapshot, scope: Scope, stats: object, labels: Labels, udp: bool = False
) -> None:
    """Add every metric of ``scope`` that ``stats`` (that scope's stats object) holds, under the
    scope's ``labels``; ``udp``: the UDP-only metrics of a service port too."""
    for spec in BY_SCOPE[scope]:
        if spec.udp_only and not udp:
            continue
        value = getattr(stats, spec.field)
        if spec.kind == "histogram":
            assert isinstance(value, Buckets)
            snap.set_histogram(spec.name, labels, value.counts, value.total)
        elif spec.kind == "info":
            snap.add(spec.name, (*labels, *value), 1)
        elif spec.label is not None:
            for item in dataclasses.fields(value):
                snap.add(spec.name, (*labels, item.name), getattr(value, item.name))
        else:
            snap.add(spec.name, labels, value)


class WorkerSnapshots:
    """The supervisor's sum over its workers: the latest snapshot of each live worker, plus the
    counters and histograms of workers that exited (so summed counters never go down)."""

    def __init__(self) -> None:
        self.live: dict[int, Snapshot] = {}
        self.retired = Snapshot()

    def update(self, worker: int, snapshot: Snapshot) -> None:
        self.live[worker] = snapshot

    def retire(self, worker: int) -> None:
        last = self.live.pop(worker, None)
        if last is None:
            return
        kept = Snapshot(
            values={
                name: series
                for name, series in last.values.items()
                if METRICS[name].kind == "counter" and METRICS[name].merge == "sum"
            },
            histograms=last.histograms,
        )
        self.retired = merge([self.retired, kept])

    def total(self) -> Snapshot:
        return merge([self.retired, *self.live.values()])


class SnapshotCollector(Collector):
    """Renders the snapshot ``source()`` returns, at each scrape, as prometheus-client families."""

    def __init__(self, source: Callable[[], Snapshot]) -> None:
        self.source = source

    def describe(self) -> Iterable[Metric]:
        return []  # registering must not call source(): the runtime may not exist yet

    def collect(self) -> Iterator[Metric]:
        snap = self.source()
        for spec in METRICS.values():
            labels = list(spec.labels)
            if spec.kind == "histogram":
                yield _histogram(spec, snap.histograms.get(spec.name, {}))
                continue
            family: CounterMetricFamily | GaugeMetricFamily
            if spec.kind == "counter":
                family = CounterMetricFamily(spec.name, spec.help, labels=labels)
            else:
                family = GaugeMetricFamily(spec.name, spec.help, labels=labels)
            for values, value in sorted(snap.values.get(spec.name, {}).items()):
                family.add_metric(list(values), value)
            yield family


def _histogram(spec: MetricSpec, series: dict[Labels, HistogramValue]) -> HistogramMetricFamily:
    family = HistogramMetricFamily(spec.name, spec.help, labels=list(spec.labels))
    bounds = [*(_le(bound) for bound in spec.buckets), "+Inf"]
    for labels, (counts, value_sum) in sorted(series.items()):
        cumulative: list[tuple[str, float]] = []
        running = 0
        for bound, count in zip(bounds, counts, strict=True):
            running += count
            cumulative.append((bound, running))
        family.add_metric(list(labels), cumulative, value_sum)
    return family


def _le(bound: float) -> str:
    return repr(float(bound))
