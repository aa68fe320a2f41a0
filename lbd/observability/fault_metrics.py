"""The metrics of load-test faults and connection mirroring (docs/faults.md). Part of
``lbd.observability.metrics``'s table; here only so that each file reads in one sitting."""

from __future__ import annotations

from lbd.observability.metric_spec import Kind, MetricSpec

C: Kind = "counter"
FAULT_METRICS: tuple[MetricSpec, ...] = (
    MetricSpec(
        "fault_applied_total",
        C,
        "Connections (TCP) or datagrams (UDP) a fault acted on, by fault id and type.",
        "fault",
    ),
    MetricSpec(
        "fault_bytes_delayed_total",
        C,
        "Bytes a fault held back (latency, bandwidth, slicer, delay, reorder).",
        "fault",
    ),
    MetricSpec(
        "fault_bytes_discarded_total",
        C,
        "Bytes a fault kept from their destination (timeout, limit_data, drop).",
        "fault",
    ),
    MetricSpec(
        "fault_cx_cut_total",
        C,
        "Connections a fault ended (refuse, limit_data, timeout, reset_peer).",
        "fault",
    ),
    MetricSpec("mirror_cx_total", C, "Connections copied to the service's mirror.", "route"),
    MetricSpec(
        "mirror_cx_failed_total",
        C,
        "Mirrored connections whose copy ended early: the shadow refused, failed or fell behind.",
        "route",
    ),
    MetricSpec("mirror_bytes_sent_total", C, "Client bytes copied to the mirror.", "route"),
    MetricSpec(
        "mirror_bytes_dropped_total",
        C,
        "Client bytes not copied to the mirror: its buffer was full, or its copy had ended.",
        "route",
    ),
    MetricSpec(
        "fault_changes_total",
        C,
        "Faults added or removed over the admin API, by action (added, removed).",
        "process",
        label="action",
        merge="max",
    ),
)
