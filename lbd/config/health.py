"""The two tunables that are mappings of their own: ``healthCheck`` and ``outlierDetection``.

Each is merged key by key over the base's one (``defaults``, or the built-in defaults), and
``enabled: false`` switches it off; rendering writes back exactly the keys that apply, so the
rendered mapping reads back to the same object.
"""

from __future__ import annotations

import dataclasses

from lbd.config import fields as f
from lbd.config.durations import parse_duration
from lbd.config.errors import FieldError
from lbd.config.model import HEALTH_CHECK_TYPES, HealthCheck, OutlierDetection

HEALTH_CHECK_KEYS = (
    "enabled",
    "type",
    "interval",
    "timeout",
    "jitter",
    "healthyThreshold",
    "unhealthyThreshold",
    "path",
    "host",
    "expectStatus",
    "send",
    "expect",
)
HTTP_ONLY_KEYS = ("path", "host", "expectStatus")
TCP_ONLY_KEYS = ("send", "expect")
OUTLIER_KEYS = (
    "enabled",
    "consecutiveFailures",
    "baseEjectionTime",
    "maxEjectionTime",
    "maxEjectionPercent",
)
OFF = {"enabled": False}

_threshold = f.int_between(1, 100)
_percent = f.int_between(0, 100)


def positive_duration(value: object) -> float:
    seconds = parse_duration(value)
    if seconds <= 0:
        raise FieldError("must be greater than 0")
    return seconds


def read_health_check(parent: f.Section, key: str, base: HealthCheck | None) -> HealthCheck | None:
    if not parent.has(key):
        return base
    path = f.join(parent.path, key)
    section = f.Section(parent.raw(key), path, parent.problems, HEALTH_CHECK_KEYS)
    start = base or HealthCheck()
    kind = section.get("type", f.one_of(HEALTH_CHECK_TYPES), start.type)
    wrong = TCP_ONLY_KEYS if kind == "http" else HTTP_ONLY_KEYS
    for name in wrong:
        if section.has(name):
            section.problems.add(f.join(path, name), f"not used by a {kind} check")
    check = HealthCheck(
        type=kind,
        interval=section.get("interval", positive_duration, start.interval),
        timeout=section.get("timeout", positive_duration, start.timeout),
        jitter=section.get("jitter", parse_duration, start.jitter),
        healthy_threshold=section.get("healthyThreshold", _threshold, start.healthy_threshold),
        unhealthy_threshold=section.get(
            "unhealthyThreshold", _threshold, start.unhealthy_threshold
        ),
        path=section.get("path", _http_path, start.path),
        host=section.get("host", _header_value, start.host),
        expect_status=section.get("expectStatus", _status_range, start.expect_status),
        send=section.get("send", _text_bytes, start.send),
        expect=section.get("expect", _text_bytes, start.expect),
    )
    if check.jitter >= check.interval:
        section.problems.add(f.join(path, "jitter"), "must be less than interval")
    if not section.get("enabled", f.boolean, True):
        return None
    return check


def render_health_check(check: HealthCheck | None) -> dict[str, object]:
    if check is None:
        return dict(OFF)
    document: dict[str, object] = {
        "type": check.type,
        "interval": check.interval,
        "timeout": check.timeout,
        "jitter": check.jitter,
        "healthyThreshold": check.healthy_threshold,
        "unhealthyThreshold": check.unhealthy_threshold,
    }
    if check.type == "http":
        document["path"] = check.path
        if check.host is not None:
            document["host"] = check.host
        low, high = check.expect_status
        document["expectStatus"] = f"{low}-{high}"
    else:
        document["send"] = check.send.decode()
        document["expect"] = check.expect.decode()
    return document


def read_outlier(
    parent: f.Section, key: str, base: OutlierDetection | None
) -> OutlierDetection | None:
    if not parent.has(key):
        return base
    path = f.join(parent.path, key)
    section = f.Section(parent.raw(key), path, parent.problems, OUTLIER_KEYS)
    start = base or OutlierDetection()
    outlier = dataclasses.replace(
        start,
        consecutive_failures=section.get(
            "consecutiveFailures", _threshold, start.consecutive_failures
        ),
        base_ejection_time=section.get(
            "baseEjectionTime", positive_duration, start.base_ejection_time
        ),
        max_ejection_time=section.get(
            "maxEjectionTime", positive_duration, start.max_ejection_time
        ),
        max_ejection_percent=section.get(
            "maxEjectionPercent", _percent, start.max_ejection_percent
        ),
    )
    if outlier.max_ejection_time < outlier.base_ejection_time:
        section.problems.add(
            f.join(path, "maxEjectionTime"), "must not be less than baseEjectionTime"
        )
    if not section.get("enabled", f.boolean, True):
        return None
    return outlier


def render_outlier(outlier: OutlierDetection | None) -> dict[str, object]:
    if outlier is None:
        return dict(OFF)
    return {
        "consecutiveFailures": outlier.consecutive_failures,
        "baseEjectionTime": outlier.base_ejection_time,
        "maxEjectionTime": outlier.max_ejection_time,
        "maxEjectionPercent": outlier.max_ejection_percent,
    }


def _http_path(value: object) -> str:
    text = f.string(value)
    if not text.startswith("/") or any(c in text for c in " \r\n"):
        raise FieldError(f"must start with / and hold no spaces or line breaks, got {text!r}")
    return text


def _header_value(value: object) -> str:
    text = f.string(value)
    if not text or any(c in text for c in "\r\n"):
        raise FieldError(f"must be one non-empty line, got {text!r}")
    return text


def _status_range(value: object) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        low = high = value
    else:
        text = f.string(value)
        low_text, _, high_text = text.partition("-")
        try:
            low, high = int(low_text), int(high_text or low_text)
        except ValueError:
            message = f"expected a status or a range such as 200-399, got {text!r}"
            raise FieldError(message) from None
    if not 100 <= low <= high <= 599:
        raise FieldError(f"expected 100 <= low <= high <= 599, got {value!r}")
    return (low, high)


def _text_bytes(value: object) -> bytes:
    text = f.string(value)
    if len(text) > 4096:
        raise FieldError("at most 4096 characters")
    return text.encode()
