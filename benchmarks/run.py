#!/usr/bin/env python3
"""Run lbd's benchmark suite: lbd vs HAProxy vs nginx stream vs no balancer, on loopback only.

    python benchmarks/run.py            # full run, 5 repeats (~8 min)
    python benchmarks/run.py --quick    # 2 short repeats (~1.5 min)

Writes results/bench-<time>.{json,md,png} and results/latest.{json,md,png}. See README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lbdbench.procs import cpu_busy, max_proxied_connections, raise_own_nofile
from lbdbench.report import (
    MetricInfo,
    Problems,
    Sample,
    TargetInfo,
    build_rows,
    chart,
    markdown,
    write_json,
)
from lbdbench.targets import Target, all_targets, lbd_at_revision, lbd_snapshot, lbd_status
from lbdbench.workloads import MeasureError, Settings, Workload, all_workloads

HERE = Path(__file__).resolve().parent
PROBLEM_LINE = re.compile(r"traceback|error|exception|critical|warning", re.IGNORECASE)


def wait_quiet(limit: float, threshold: float = 15.0) -> dict[str, float]:
    """Per-CPU busy % of the last second, after waiting (up to `limit`) for a quiet machine."""
    deadline = time.monotonic() + limit
    busy = cpu_busy()
    while max(busy.values(), default=0) >= threshold and time.monotonic() < deadline:
        print(f"waiting for a quiet machine: CPUs busy {busy}", flush=True)
        busy = cpu_busy(2.0)
    return busy


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    workload_keys = [w.key for w in all_workloads()]
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer, shorter samples (~1.5 min)")
    parser.add_argument("--repeats", type=int, help="samples per target and workload (5; quick 2)")
    parser.add_argument("--duration", type=float, help="seconds of load per sample (3; quick 1)")
    parser.add_argument(
        "--workloads",
        default=",".join(workload_keys),
        help=f"comma-separated subset of: {','.join(workload_keys)}",
    )
    parser.add_argument("--targets", help="comma-separated target keys to keep (default: all)")
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="also run N-worker/thread variants of every proxy (default: 1 = off)",
    )
    parser.add_argument(
        "--lbd-loops", default="uvloop", help="lbd event loops to compare, e.g. uvloop,asyncio"
    )
    parser.add_argument("--no-lbd", action="store_true", help="only the reference targets")
    parser.add_argument(
        "--compare-with",
        metavar="REV",
        help="also run lbd as it was at git revision REV (target lbd-base): before/after rows "
        "of a change in one run",
    )
    parser.add_argument(
        "--reference-buffer-kib",
        type=int,
        default=64,
        help="HAProxy tune.bufsize / nginx proxy_buffer_size in KiB "
        "(default 64; 0 = their 16 KiB defaults)",
    )
    parser.add_argument("--idle-connections", type=int, help="memory workload (10000; quick 2000)")
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=0,
        metavar="S",
        help="first wait up to S seconds for every CPU to be < 15%% busy",
    )
    parser.add_argument("--output", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)
    unknown = set(args.workloads.split(",")) - set(workload_keys)
    if unknown:
        parser.error(f"unknown workloads: {', '.join(sorted(unknown))}")
    return args


def pinning() -> tuple[str | None, str | None, str]:
    """(load generator CPUs, single-process proxy CPUs, description)."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None, None, "none (fewer than 2 CPUs)"
    load, proxy = str(cpus[0]), str(cpus[-1])
    return (
        load,
        proxy,
        (
            f"load generator + backend on CPU {load}, single-process proxies on "
            f"CPU {proxy} (latency workload: all on CPU {load}), multi-worker "
            "proxies unpinned (taskset)"
        ),
    )


def version(argv: list[str], pattern: str, check: bool = False) -> str:
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    match = re.search(pattern, result.stdout + result.stderr)
    return match.group(1) if match and (result.returncode == 0 or not check) else "?"


def versions(include_lbd: bool) -> dict[str, str]:
    found = {
        "python": platform.python_version(),
        "uvloop": version([sys.executable, "-m", "pip", "show", "uvloop"], r"Version: (\S+)"),
        "haproxy": version(["haproxy", "-v"], r"version (\S+)"),
        "nginx": version(["nginx", "-v"], r"nginx/(\S+)"),
        "iperf3": version(["iperf3", "--version"], r"iperf (\S+)"),
        "wrk": version(["wrk", "--version"], r"wrk (\S+)"),
    }
    if include_lbd:
        found["lbd"] = version([sys.executable, "-m", "pip", "show", "lbd"], r"Version: (\S+)")
        found["lbd commit"] = version(
            ["git", "-C", str(HERE.parent), "rev-parse", "--short", "HEAD"], r"(\S+)", check=True
        )
    return found


def lbd_dirty() -> str:
    """Whether the lbd sources differ from the commit named in the versions."""
    try:
        result = subprocess.run(
            ["git", "-C", str(HERE.parent), "status", "--porcelain", "lbd"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    if result.returncode != 0:
        return ""
    return " (with uncommitted changes)" if result.stdout.strip() else " (committed)"


def machine() -> str:
    model = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} x {model}, Linux {platform.release()}"


def lbd_problems(log: Path) -> list[str]:
    try:
        lines = log.read_text(errors="replace").splitlines()[1:]  # line 1 is the command
    except OSError:
        return []
    return [line.strip()[:300] for line in lines if PROBLEM_LINE.search(line)]


def run_cell(
    workload: Workload, target: Target, settings: Settings, repeat: int, problems: Problems
) -> list[Sample]:
    """Start `target` in front of the workload's backend, measure once, stop it."""
    log_dir = settings.log_dir / workload.key / f"r{repeat}"
    started = time.monotonic()
    error: str | None = None
    values: dict[str, float] = {}
    extra: dict[str, Any] = {}
    running = None
    try:
        colocate = settings.load_cpus if workload.colocate else None
        with target.run(workload.route, settings.workdir, log_dir, colocate) as running:
            measured = workload.measure(settings, running, repeat)
            values, extra = measured.values, measured.extra
    except (MeasureError, RuntimeError, OSError, ValueError, KeyError) as exc:
        error = f"{type(exc).__name__}: {exc}"
    if running is not None:
        # Kept apart from `error`: the measurement itself may still be valid.
        for problem in running.problems:
            problems.add(f"{workload.key} / {target.label}", repeat, problem)
    if target.kind == "lbd":
        for line in lbd_problems(log_dir / f"{target.key}.log"):
            problems.add(f"{workload.key} / {target.label} log", repeat, line)
    took = time.monotonic() - started
    shown = (
        ", ".join(f"{k}={v:,.4g}" for k, v in values.items())
        or f"FAILED {(error or '').splitlines()[0]}"
    )
    print(f"  [{workload.key} r{repeat}] {target.label:<22} {shown}  ({took:.1f}s)", flush=True)
    if error:
        problems.add(f"{workload.key} / {target.label}", repeat, error.splitlines()[0])
    # A metric this target cannot have (proxy CPU of "direct") is left out, not failed.
    return [
        Sample(
            workload.key,
            metric.key,
            target.key,
            repeat,
            values.get(metric.key),
            extra,
            error if metric.key not in values else None,
        )
        for metric in workload.metrics
        if metric.key in values or error
    ]


def choose_targets(
    args: argparse.Namespace, workdir: Path, problems: Problems
) -> tuple[list[Target], str, str]:
    """The targets of this run, the pinning text, and where the lbd code came from."""
    include_lbd, lbd_workers = False, False
    launcher: tuple[str, ...] = ("lbd",)
    lbd_source = "not run"
    if not args.no_lbd:
        launcher, lbd_source = lbd_snapshot(workdir / "lbd-snapshot")
        include_lbd, lbd_workers, reason = lbd_status(launcher)
        if include_lbd:
            lbd_source += lbd_dirty()
        else:
            print(f"lbd is not runnable ({reason}); running the reference targets only")
            problems.add("lbd", None, f"not runnable: {reason}")
    base = None
    if include_lbd and args.compare_with:
        base_launcher = lbd_at_revision(args.compare_with, workdir / "lbd-base")
        base = (args.compare_with, base_launcher)
        lbd_source += f"; lbd-base: {args.compare_with}"
    _, proxy_cpus, pin_text = pinning()
    targets = all_targets(
        proxy_cpus or "",
        None,
        args.workers,
        include_lbd,
        lbd_workers,
        tuple(args.lbd_loops.split(",")),
        args.reference_buffer_kib or None,
        launcher,
        base,
    )
    if proxy_cpus is None:
        for t in targets:
            t.cpus = None
    if args.targets:
        keep = set(args.targets.split(","))
        targets = [t for t in targets if t.key in keep]
    return targets, pin_text, lbd_source


def run_all(
    workloads: list[Workload],
    targets: list[Target],
    settings: Settings,
    repeats: int,
    problems: Problems,
) -> list[Sample]:
    """Every workload; inside it, `repeats` rounds over the targets, in a rotating order."""
    samples: list[Sample] = []
    for workload in workloads:
        eligible = [
            t
            for t in targets
            if t.supports(workload.transport) and not (workload.needs_proxy and t.kind == "direct")
        ]
        if not eligible:
            continue
        print(f"{workload.title}: {workload.describe(settings)}", flush=True)
        try:
            with workload.backend(settings):
                for repeat in range(repeats):
                    # Rotate the order so no target always runs first (or right after another).
                    shift = repeat % len(eligible)
                    for target in eligible[shift:] + eligible[:shift]:
                        samples += run_cell(workload, target, settings, repeat, problems)
        except (RuntimeError, OSError) as exc:
            problems.add(f"{workload.key} backend", None, str(exc))
            print(f"  backend failed: {exc}", flush=True)
    return samples


def write_outputs(
    output: Path,
    stamp: str,
    samples: list[Sample],
    workloads: list[Workload],
    targets: list[Target],
    settings: Settings,
    meta: dict[str, Any],
) -> str:
    """bench-<stamp>.{json,md,png}, copied to latest.*; returns the Markdown."""
    infos = [TargetInfo(t.key, t.label, t.kind, t.workers, t.cpus) for t in targets]
    metrics = [
        MetricInfo(w.key, m.key, m.title, m.unit, m.higher_is_better, m.scale, w.describe(settings))
        for w in workloads
        for m in w.metrics
    ]
    rows = build_rows(samples, metrics, infos)
    output.mkdir(parents=True, exist_ok=True)
    base = output / f"bench-{stamp}"
    write_json(base.with_suffix(".json"), samples, rows, infos, meta)
    text = markdown(rows, infos, meta)
    base.with_suffix(".md").write_text(text)
    chart(
        base.with_suffix(".png"),
        rows,
        infos,
        f"lbd benchmark {meta['started']} ({meta['mode']}, {meta['repeats']} repeats)",
    )
    for suffix in (".json", ".md", ".png"):
        if base.with_suffix(suffix).exists():
            shutil.copyfile(base.with_suffix(suffix), (output / "latest").with_suffix(suffix))
    return text


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    quick = args.quick
    repeats = args.repeats or (2 if quick else 5)
    duration = args.duration or (1.0 if quick else 3.0)
    raise_own_nofile()
    for tool in ("haproxy", "nginx", "iperf3", "wrk", "taskset", "dnsmasq"):
        if shutil.which(tool) is None:
            print(f"{tool} is missing: run benchmarks/setup.sh", file=sys.stderr)
            return 2

    stamp = time.strftime("%Y%m%d-%H%M%S")
    workdir = args.output / "work" / stamp
    problems = Problems()
    targets, pin_text, lbd_source = choose_targets(args, workdir, problems)
    if not targets:
        print("no targets left to run", file=sys.stderr)
        return 2
    workloads = [w for w in all_workloads() if w.key in args.workloads.split(",")]
    settings = Settings(
        duration=duration,
        load_cpus=pinning()[0],
        workdir=workdir,
        log_dir=args.output / "logs" / stamp,
        idle_connections=min(
            args.idle_connections or (2000 if quick else 10000), max_proxied_connections()
        ),
        latency_count=1000 if quick else 3000,
    )
    meta: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "mode": "quick" if quick else "full",
        "repeats": repeats,
        "duration": duration,
        "pinning": pin_text,
        "machine": machine(),
        "versions": versions(any(t.kind == "lbd" for t in targets)),
        "lbd_source": lbd_source,
        "settings": {k: str(v) for k, v in vars(settings).items()},
        "cpu_busy_before_pct": wait_quiet(args.wait_quiet),  # others' load, before we start
    }
    print(f"targets: {', '.join(t.label for t in targets)}")
    print(f"pinning: {pin_text}; logs: {settings.log_dir}")
    print(f"CPU busy before start (other processes): {meta['cpu_busy_before_pct']}")

    began = time.monotonic()
    samples = run_all(workloads, targets, settings, repeats, problems)
    meta["elapsed_s"] = round(time.monotonic() - began, 1)
    meta["cpu_busy_after_pct"] = cpu_busy()
    meta["loadavg_after"] = Path("/proc/loadavg").read_text().split()[:3]
    meta["problems"] = problems.as_list()
    text = write_outputs(args.output, stamp, samples, workloads, targets, settings, meta)
    shutil.rmtree(settings.workdir, ignore_errors=True)
    with contextlib.suppress(OSError):  # another run's work directory is still there
        settings.workdir.parent.rmdir()
    print()
    print(text)
    print(f"wrote {args.output}/bench-{stamp}.{{json,md,png}} in {meta['elapsed_s']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
