"""``source: kubernetes``: the services come from the Kubernetes API server, not the file.

The file then supplies everything else (``node``, ``admin``, ``defaults``, ``dns``,
``workers``) and an optional ``kubernetes:`` section; ``lbd run --kubernetes`` flags override
that section. ``lbd.sources.kubernetes`` does the watching.
"""

from __future__ import annotations

import argparse

from lbd.config import fields as f
from lbd.config.durations import parse_duration
from lbd.config.errors import FieldError
from lbd.config.model import KubernetesSettings, SourceKind
from lbd.config.semantics import cidr

SOURCES: tuple[SourceKind, ...] = ("file", "kubernetes")
SOURCE_KEYS = ("source", "kubernetes")  # top-level keys of an lbd/v1 document
KUBERNETES_KEYS = ("kubeconfig", "minSyncPeriod", "allowedServiceIPs")
DEFAULT_MIN_SYNC_PERIOD = KubernetesSettings().min_sync_period


def kubernetes_arguments(run: argparse.ArgumentParser) -> None:
    """``lbd run``'s flags for ``source: kubernetes`` (they override the file's section)."""
    group = run.add_argument_group("services from the Kubernetes API (docs/kubernetes.md)")
    group.add_argument("--kubernetes", action="store_true", help="as `source: kubernetes`")
    group.add_argument("--kubeconfig", metavar="PATH", help="default: $KUBECONFIG, in-cluster")
    group.add_argument("--min-sync-period", metavar="DURATION", help="default 1s")
    group.add_argument("--allowed-service-ips", metavar="CIDR,...", help="default: none")


def read_source(top: f.Section) -> tuple[SourceKind, KubernetesSettings]:
    """``source`` and the ``kubernetes`` section of an ``lbd/v1`` document."""
    source: SourceKind = top.get("source", f.one_of(SOURCES), "file")
    if source == "kubernetes" and top.has("services"):
        top.problems.add(
            "services", "with source: kubernetes the services come from the API server"
        )
    section = f.Section(top.raw("kubernetes"), "kubernetes", top.problems, KUBERNETES_KEYS)
    allowed = tuple(
        network
        for path, raw in section.items("allowedServiceIPs")
        if (network := _cidr_at(section, path, raw))
    )
    return source, KubernetesSettings(
        kubeconfig=section.get("kubeconfig", f.string, None),
        min_sync_period=section.get("minSyncPeriod", min_sync_period, DEFAULT_MIN_SYNC_PERIOD),
        allowed_service_ips=allowed,
    )


def min_sync_period(value: object) -> float:
    seconds = parse_duration(value)
    if not 0 <= seconds <= 3600:
        raise FieldError(f"must be between 0 and 1h, got {value!r}")
    return seconds


def allowed_cidrs(text: str) -> tuple[str, ...]:
    """``--allowed-service-ips``: comma-separated CIDRs (or addresses); FieldError if bad."""
    return tuple(cidr(part) for part in text.split(",") if part.strip())


def _cidr_at(section: f.Section, path: str, raw: object) -> str:
    try:
        return cidr(raw)
    except FieldError as error:
        section.problems.add(path, str(error))
        return ""
