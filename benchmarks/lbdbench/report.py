"""JSON, Markdown and PNG output of one run."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lbdbench.stats import Summary, best, ratio, summarize


@dataclass
class Sample:
    workload: str
    metric: str
    target: str
    repeat: int
    value: float | None
    extra: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


class Problems:
    """What went wrong during a run, grouped: the same text from many samples is one entry."""

    def __init__(self) -> None:
        self._seen: dict[tuple[str, str], list[int]] = {}

    def add(self, where: str, repeat: int | None, text: str) -> None:
        repeats = self._seen.setdefault((where, text.strip()[:300]), [])
        if repeat is not None:
            repeats.append(repeat)

    def as_list(self) -> list[dict[str, Any]]:
        return [
            {
                "where": where,
                "text": text,
                "count": max(1, len(repeats)),
                "repeats": sorted(set(repeats)),
            }
            for (where, text), repeats in self._seen.items()
        ]


@dataclass(frozen=True)
class TargetInfo:
    key: str
    label: str
    kind: str
    workers: int
    cpus: str | None


@dataclass(frozen=True)
class MetricInfo:
    workload: str
    key: str
    title: str
    unit: str
    higher_is_better: bool
    scale: float
    describe: str


@dataclass
class Row:
    """One metric: a summary per target, and the ratios for every lbd target."""

    metric: MetricInfo
    cells: dict[str, Summary]
    ratios: dict[str, dict[str, Any]]


def build_rows(
    samples: list[Sample], metrics: list[MetricInfo], targets: list[TargetInfo]
) -> list[Row]:
    rows = []
    for metric in metrics:
        cells: dict[str, Summary] = {}
        for target in targets:
            mine = [
                s
                for s in samples
                if s.workload == metric.workload
                and s.metric == metric.key
                and s.target == target.key
            ]
            if not mine:
                continue
            values = [s.value for s in mine if s.value is not None]
            cells[target.key] = summarize(values, len(mine) - len(values))
        rows.append(Row(metric, cells, _ratios(metric, cells, targets)))
    return rows


def _ratios(
    metric: MetricInfo, cells: dict[str, Summary], targets: list[TargetInfo]
) -> dict[str, dict[str, Any]]:
    """lbd/direct and lbd/best reference with the same worker count, per lbd target."""
    direct = cells.get("direct")
    out: dict[str, dict[str, Any]] = {}
    for lbd in (t for t in targets if t.kind == "lbd" and t.key in cells):
        refs = {
            t.key: cells[t.key].median
            for t in targets
            if t.kind == "reference" and t.workers == lbd.workers and t.key in cells
        }
        chosen = best(refs, metric.higher_is_better)
        out[lbd.key] = {
            "vs_direct": ratio(cells[lbd.key].median, direct.median if direct else None),
            "vs_reference": ratio(cells[lbd.key].median, chosen[1]) if chosen else None,
            "reference": chosen[0] if chosen else None,
        }
    return out


def _fmt(value: float | None, scale: float = 1.0) -> str:
    if value is None:
        return "-"
    shown = value * scale
    if abs(shown) >= 1000:
        return f"{shown:,.0f}"
    if abs(shown) >= 100:
        return f"{shown:.0f}"
    if abs(shown) >= 10:
        return f"{shown:.1f}"
    return f"{shown:.2f}"


def _busy(busy: dict[str, float] | None) -> str:
    return "/".join(f"{v:.0f}" for v in busy.values()) if busy else "?"


def _ratio_text(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def markdown(rows: list[Row], targets: list[TargetInfo], meta: dict[str, Any]) -> str:
    labels = {t.key: t.label for t in targets}
    used = [t for t in targets if any(t.key in row.cells for row in rows)]
    lines = [f"# lbd benchmark — {meta['started']}", ""]
    lines += [
        f"- mode: {meta['mode']}, {meta['repeats']} repeats per cell, "
        f"{meta['duration']:g} s of load per throughput sample; medians, [min-max]",
        f"- CPU pinning: {meta['pinning']}",
        f"- machine: {meta['machine']}",
        f"- lbd: {meta.get('lbd_source', '?')}",
        f"- other load: CPUs busy {_busy(meta.get('cpu_busy_before_pct'))} in the second "
        f"before the run and {_busy(meta.get('cpu_busy_after_pct'))} in the second after "
        "it (%); anything well above 0 means the numbers were disturbed",
        f"- versions: {', '.join(f'{k} {v}' for k, v in meta['versions'].items())}",
        "",
    ]
    lbd_targets = [t for t in used if t.kind == "lbd"]
    if lbd_targets:
        lines += [
            "## Ratios",
            "",
            "Throughput rows: higher is better, 1.00 = as fast as the reference. Latency "
            "and memory rows: lower is better, 1.00 = as small as the reference.",
            "",
        ]
        header = ["metric", "better"]
        for t in lbd_targets:
            header += [f"{t.label} / direct", f"{t.label} / best ref"]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for row in rows:
            cells = [
                f"{row.metric.title} ({row.metric.unit})",
                "higher" if row.metric.higher_is_better else "lower",
            ]
            for t in lbd_targets:
                r = row.ratios.get(t.key)
                if r is None:
                    cells += ["-", "-"]
                    continue
                ref = f" ({labels[r['reference']]})" if r["reference"] else ""
                cells += [_ratio_text(r["vs_direct"]), _ratio_text(r["vs_reference"]) + ref]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## Medians", ""]
    header = ["metric", *[t.label for t in used]]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [f"{row.metric.title} ({row.metric.unit})"]
        for t in used:
            s = row.cells.get(t.key)
            if s is None:
                cells.append("n/a")
            elif s.median is None:
                cells.append(f"failed x{s.failures}")
            else:
                text = (
                    f"{_fmt(s.median, row.metric.scale)} "
                    f"[{_fmt(s.low, row.metric.scale)}-{_fmt(s.high, row.metric.scale)}]"
                )
                if s.failures:
                    text += f" ({s.failures} failed)"
                cells.append(text)
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## What each row measures", ""]
    seen = set()
    for row in rows:
        if row.metric.workload not in seen:
            seen.add(row.metric.workload)
            lines.append(f"- **{row.metric.workload}**: {row.metric.describe}")
    problems: list[dict[str, Any]] = meta.get("problems", [])
    if problems:
        lines += ["", "## Problems seen", ""]
        for p in problems[:MAX_PROBLEMS_SHOWN]:
            notes = []
            if p["repeats"]:
                notes.append(f"repeats {','.join(map(str, p['repeats']))}")
            if p["count"] > len(set(p["repeats"])):
                notes.append(f"{p['count']} times")
            where = f"{p['where']} ({', '.join(notes)})" if notes else p["where"]
            lines.append(f"- {where}: `{p['text']}`")
        if len(problems) > MAX_PROBLEMS_SHOWN:
            lines.append(f"- ... and {len(problems) - MAX_PROBLEMS_SHOWN} more in the JSON")
    return "\n".join(lines) + "\n"


def write_json(
    path: Path,
    samples: list[Sample],
    rows: list[Row],
    targets: list[TargetInfo],
    meta: dict[str, Any],
) -> None:
    document = {
        "meta": meta,
        "targets": [asdict(t) for t in targets],
        "summary": [
            {
                "metric": asdict(r.metric),
                "cells": {k: asdict(v) for k, v in r.cells.items()},
                "ratios": r.ratios,
            }
            for r in rows
        ],
        "samples": [asdict(s) for s in samples],
    }
    path.write_text(json.dumps(document, indent=1) + "\n")


MAX_PROBLEMS_SHOWN = 40
COLORS = {"direct": "#9e9e9e", "lbd": "#1f77b4", "reference": "#ff7f0e"}


def chart(path: Path, rows: list[Row], targets: list[TargetInfo], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in rows if any(s.median is not None for s in r.cells.values())]
    if not shown:
        return
    columns = 2
    rows_n = (len(shown) + columns - 1) // columns
    fig, axes = plt.subplots(rows_n, columns, figsize=(12, 3.2 * rows_n), squeeze=False)
    for ax, row in zip(axes.flat, shown, strict=False):
        keys = [t for t in targets if t.key in row.cells and row.cells[t.key].median is not None]
        scale = row.metric.scale
        medians = [(row.cells[t.key].median or 0) * scale for t in keys]
        low = [m - (row.cells[t.key].low or 0) * scale for m, t in zip(medians, keys, strict=True)]
        high = [
            (row.cells[t.key].high or 0) * scale - m for m, t in zip(medians, keys, strict=True)
        ]
        ax.barh(
            [t.label for t in keys],
            medians,
            xerr=[low, high],
            capsize=3,
            color=[COLORS.get(t.kind, "#555555") for t in keys],
        )
        ax.invert_yaxis()
        better = "higher" if row.metric.higher_is_better else "lower"
        ax.set_title(f"{row.metric.title} ({better} is better)", fontsize=10)
        ax.set_xlabel(row.metric.unit)
        ax.tick_params(labelsize=8)
    for ax in list(axes.flat)[len(shown) :]:
        ax.axis("off")
    fig.suptitle(title + "  (bars: median, whiskers: min-max)", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    fig.savefig(path, dpi=110)
    plt.close(fig)
