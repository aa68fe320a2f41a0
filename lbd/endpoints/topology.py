"""Which endpoints a kind of listener may use: kube-proxy's endpoint categories, as a pure function.

kube-proxy (pkg/proxy/topology.go, CategorizeEndpoints) builds two sets per service:
- cluster endpoints: the ready ones (narrowed to this zone by topology when it can be); when none
  is ready, the ones that are serving and terminating;
- local endpoints: the same rule over the endpoints on this node only.
A clusterIP listener uses the local set under ``internalTrafficPolicy: Local`` and the cluster set
otherwise; every other listener (NodePort, LoadBalancer IPs, externalIPs) does the same with
``externalTrafficPolicy``. A Local set that is empty is empty: no fallback to other nodes.

The pool computes both sets once per change (``Pool._refresh``), never per connection.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from lbd.config.routes import TrafficPolicy

if TYPE_CHECKING:
    from lbd.endpoints.endpoint import UpstreamEndpoint


def select(
    endpoints: Sequence[UpstreamEndpoint], policy: TrafficPolicy, external: bool
) -> list[UpstreamEndpoint]:
    """The endpoints (already eligible by their own state) a listener of this kind may use."""
    local_only = policy.external_local if external else policy.internal_local
    candidates = [e for e in endpoints if e.state.local] if local_only else list(endpoints)
    chosen = [e for e in candidates if e.state.ready]
    if not chosen:
        chosen = [e for e in candidates if e.state.serving and e.state.terminating]
    if policy.prefer_close and not local_only:
        close = [e for e in chosen if e.state.same_zone]
        if close:
            chosen = close
    return chosen


def reason(
    endpoint: UpstreamEndpoint,
    endpoints: Sequence[UpstreamEndpoint],
    policy: TrafficPolicy,
    external: bool,
) -> str | None:
    """Why ``endpoint`` is not in ``select(endpoints, ...)``: a ``REASONS`` code."""
    if endpoint in select(endpoints, policy, external):
        return None
    state = endpoint.state
    if (policy.external_local if external else policy.internal_local) and not state.local:
        return "other_node"
    if state.ready:
        return "other_zone"
    if state.serving and state.terminating:
        return "terminating"
    return "not_ready"
