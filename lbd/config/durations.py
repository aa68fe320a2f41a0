"""Durations as people write them: ``250ms``, ``30s``, ``5m``, ``1h``, ``1h30m``, or seconds."""

from __future__ import annotations

import math
import re

from lbd.config.errors import FieldError
from lbd.config.fields import show

_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_WHOLE = re.compile(r"(?:\d+(?:\.\d+)?(?:ms|s|m|h))+")


# Ten years: long enough for any timeout, short enough for every timer API (uvloop converts a
# delay to integer milliseconds; a float of 1e300 seconds would overflow it).
MAX_SECONDS = 10 * 365 * 24 * 3600.0


def parse_duration(value: object) -> float:
    """Seconds as a float, at most MAX_SECONDS; raises FieldError with a message fit for a
    user (never OverflowError, whatever the number)."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_SECONDS:
        raise FieldError(f"at most {MAX_SECONDS:.0f} seconds (ten years), got {show(value)}")
    if isinstance(value, bool):
        raise FieldError(f"expected a duration such as 30s or 1h30m, got {show(value)}")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip()
        if not _WHOLE.fullmatch(text):
            raise FieldError(
                f"expected a duration such as 250ms, 30s, 5m or 1h30m, got {show(value)}"
            )
        seconds = sum(float(n) * _UNIT_SECONDS[unit] for n, unit in _PART.findall(text))
    else:
        raise FieldError(f"expected a duration such as 30s, got {type(value).__name__}")
    if not math.isfinite(seconds) or seconds < 0:
        raise FieldError(f"a duration must be a finite number of seconds >= 0, got {show(value)}")
    if seconds > MAX_SECONDS:
        raise FieldError(f"at most {MAX_SECONDS:.0f} seconds (ten years), got {show(value)}")
    return seconds


def format_duration(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:g}ms"
    return f"{seconds:g}s"
