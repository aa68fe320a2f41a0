"""What a reload did: its result, and the last one's outcome for ``GET /healthz``."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

from lbd.config.diff import ConfigDiff

Outcome = Literal["applied", "unchanged", "failed"]


@dataclass(frozen=True, slots=True)
class ReloadResult:
    outcome: Outcome
    duration_s: float
    diff: ConfigDiff | None = None
    problems: tuple[str, ...] = ()


@dataclass(slots=True)
class ReloadStatus:
    """What the last reload did, and whether one is under way (``GET /healthz``)."""

    outcome: Outcome | None = None  # None: no reload yet
    time: float = 0.0  # wall clock of the last outcome
    problems: tuple[str, ...] = ()
    started: float | None = None  # monotonic, while a reload runs

    def begin(self) -> None:
        self.started = time.monotonic()

    def end(self, result: ReloadResult) -> None:
        self.started = None
        self.outcome, self.time, self.problems = result.outcome, time.time(), result.problems

    def running_for(self) -> float | None:
        return None if self.started is None else time.monotonic() - self.started
