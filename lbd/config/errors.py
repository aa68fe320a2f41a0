"""Config problems: every one names the YAML path it is about."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Problem:
    path: str  # e.g. services[1].ports[0].targetPort; "" for the document itself
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class ConfigError(Exception):
    """A config that cannot be used; carries every problem found, not just the first."""

    def __init__(self, problems: Iterable[Problem], source: str = "") -> None:
        self.problems = tuple(problems)
        self.source = source
        super().__init__(self.format())

    def format(self) -> str:
        return "\n".join(str(problem) for problem in self.problems)


class FieldError(ValueError):
    """Raised by a field parser; the reader turns it into a Problem at the field's path."""
