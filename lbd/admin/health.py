"""``GET /healthz``: kube-proxy's answer (``lastUpdated``, ``currentTime``) and what the last
reload did, for people and for liveness probes.

When it answers 503, and why only then: a liveness probe that fails restarts lbd. A bad config
file (a failed reload) must not do that: lbd keeps serving its last good config, and a restart
would only fail to start with the same file, turning a bad edit into an outage. So a failed
reload is reported in the body (``lastReload``) and answered with 200. 503 means lbd cannot do
its job and a restart could help: it is not serving (still starting, or shutting down), or a
reload has been under way for longer than any reload may take (``STUCK_AFTER_S``: something
hung, and no further config change can be applied). An API server out of reach
(``--kubernetes``) is also 200: the last state is served, and the body says how stale it is.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from lbd.observability.stats import KubernetesStats
from lbd.runtime.reload import PLAN_TIMEOUT_S
from lbd.runtime.status import ReloadStatus

STUCK_AFTER_S = PLAN_TIMEOUT_S + 60.0  # planning's deadline, and a generous apply


@dataclass(frozen=True, slots=True)
class Health:
    serving: bool
    last_applied: float  # wall clock: the running config's apply (start counts)
    reloads: ReloadStatus
    kubernetes: KubernetesStats | None = None
    workers: tuple[int, int] | None = None  # (serving, configured) under a supervisor


def health_answer(health: Health) -> tuple[int, dict[str, Any]]:
    now = time.time()
    reloads = health.reloads
    running = reloads.running_for()
    stuck = running is not None and running > STUCK_AFTER_S
    status = "ok" if health.serving and not stuck else "stuck" if stuck else "not serving"
    body: dict[str, Any] = {
        "status": status,
        "lastUpdated": _rfc3339(health.last_applied),
        "currentTime": _rfc3339(now),
        "lastReload": None,
        "reloadRunningSeconds": None if running is None else round(running, 1),
    }
    if reloads.outcome is not None:
        body["lastReload"] = {
            "outcome": reloads.outcome,
            "time": _rfc3339(reloads.time),
            "problems": list(reloads.problems),
        }
    if health.workers is not None:
        body["workers"] = {"serving": health.workers[0], "configured": health.workers[1]}
    source = health.kubernetes
    if source is not None:
        synced = source.last_sync_time
        body["kubernetes"] = {
            "connected": source.connected,
            "synced": source.synced,
            "lastSync": _rfc3339(synced) if synced else None,
            "staleSeconds": round(now - synced, 1) if synced and not source.connected else 0,
        }
    return (200 if status == "ok" else 503), body


def _rfc3339(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat().replace("+00:00", "Z")
