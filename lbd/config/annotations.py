"""lbd's own per-service settings on a Kubernetes Service: annotations ``lbd.io/<key>``.

``<key>`` is any key a ``services[i]`` entry of an ``lbd/v1`` file may set besides Kubernetes'
own fields (``strategy``, ``connectTimeout``, ``healthCheck``, ``maxConnections``,
``proxyProtocol``, ...; ``TUNABLE_KEYS``). An annotation's value is always a string; it is read
as one YAML value, so ``"100"`` is a number, ``"true"`` a boolean and ``"{type: http, path:
/healthz}"`` a mapping, and then validated by the loader exactly as the same key in a file.
"""

from __future__ import annotations

from typing import Any

from lbd.config import fields as f
from lbd.config.errors import ConfigError
from lbd.config.tunables import TUNABLE_KEYS
from lbd.config.yamlfile import parse_yaml

ANNOTATION_PREFIX = "lbd.io/"
MAX_ANNOTATION_CHARS = 4096


def read_annotations(
    path: str, meta: dict[str, Any], service: dict[str, Any], problems: f.Problems
) -> dict[str, str]:
    """Copy each ``lbd.io/KEY`` annotation of ``meta`` into ``service[KEY]``; returns the keys
    copied, each with the annotation it came from (to name it in a rejection)."""
    raw = meta.get("annotations")
    if not isinstance(raw, dict):
        return {}
    copied: dict[str, str] = {}
    for name, value in raw.items():
        if not isinstance(name, str) or not name.startswith(ANNOTATION_PREFIX):
            continue
        key = name[len(ANNOTATION_PREFIX) :]
        where = f"{path}[{name}]"
        if key not in TUNABLE_KEYS:
            known = ", ".join(ANNOTATION_PREFIX + k for k in TUNABLE_KEYS)
            problems.add(where, f"unknown lbd annotation; known: {known}")
            continue
        if not isinstance(value, str) or not value.strip():
            problems.add(where, "expected a non-empty string")
            continue
        if len(value) > MAX_ANNOTATION_CHARS:
            problems.add(where, f"longer than {MAX_ANNOTATION_CHARS} characters")
            continue
        try:
            service[key] = parse_yaml(value, where)
        except ConfigError as error:
            problems.add(where, f"not one YAML value ({error.problems[0].message})")
            continue
        copied[key] = name
    return copied
