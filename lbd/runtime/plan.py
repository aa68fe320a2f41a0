"""What applying a config takes, worked out before the event loop is involved.

Parsing, validating and diffing a large config is seconds of Python (10,000 services); on the
event loop that would stall every connection of every other service. A ``Plan`` is computed in
a worker thread (``Reloader``) from immutable inputs: the config that runs, its route specs, and
the new one. The loop then applies it in time proportional to what changed.

A thread is not enough on its own: planning allocates a million objects, and with the cyclic
collector on they trigger full collections that walk every object of the process while holding
the GIL (measured: up to 450 ms at 10,000 services). So the collector pauses while a plan is
made (``collector_paused``), and what was allocated meanwhile goes straight to the oldest
generation (``freeze`` then ``unfreeze``: two list splices) instead of through the young ones,
where the first collection after the pause would walk all of it. It is collected at the next
full collection, like anything long-lived. Connections leave no reference cycles behind
(``Downstream.finish``), so none pile up meanwhile; big garbage is freed in pieces
(``lbd.config.release``), since one huge cascade of frees holds the GIL just as long.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator
from dataclasses import dataclass

from lbd.config.diff import ConfigDiff, diff_configs
from lbd.config.model import Config
from lbd.config.render import config_hash
from lbd.config.routes import RouteKey, RouteSpec, route_specs


@dataclass(frozen=True, slots=True)
class Plan:
    config: Config
    base: Config  # the config ``diff`` is against: a plan applies only on top of it
    diff: ConfigDiff
    specs: dict[RouteKey, RouteSpec]  # every route spec of ``config``
    hash: str  # config_hash(config)


def make_plan(base: Config, base_specs: dict[RouteKey, RouteSpec], new: Config) -> Plan:
    specs = route_specs(new)
    diff = diff_configs(base, new, base_specs, specs)
    return Plan(new, base, diff, specs, config_hash(new))


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """No cyclic collection while the block runs (one reload plans at a time per process)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        gc.unfreeze()
        if was_enabled:
            gc.enable()
