"""Reading YAML safely: a size cap, the safe loader, and duplicate keys reported, not dropped."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from lbd.config.errors import ConfigError, Problem

MAX_CONFIG_BYTES = 16 * 1024 * 1024


# libyaml's parser when PyYAML was built with it: about ten times faster on a large config,
# which is most of a reload's time. The construction (and our checks) stay in Python.
_BaseLoader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _StrictSafeLoader(_BaseLoader):  # type: ignore[valid-type,misc]
    """SafeLoader that rejects a key written twice in one mapping (PyYAML keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[object, object]:
        seen: set[object] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, str | int | float | bool):
                continue  # unhashable or odd keys are reported by the section reader
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        mapping: dict[object, object] = super().construct_mapping(node, deep=deep)
        return mapping


def parse_yaml(text: str | bytes, source: str = "<config>") -> object:
    """The one document as plain Python data; a ConfigError for anything unreadable."""
    documents = parse_yaml_documents(text, source)
    if len(documents) > 1:
        raise ConfigError(
            [Problem("", f"{source}: expected one YAML document, found {len(documents)}")], source
        )
    return documents[0]


def parse_yaml_documents(text: str | bytes, source: str = "<config>") -> list[object]:
    """Every non-empty document (Kubernetes manifests are often several); at least one."""
    if len(text) > MAX_CONFIG_BYTES:
        raise ConfigError(
            [Problem("", f"{source}: larger than {MAX_CONFIG_BYTES // (1024 * 1024)} MiB")], source
        )
    if text.lstrip()[:1] in ("{", b"{"):
        document = _parse_json(text, source)
        if document is not _NOT_JSON:
            return [document]
    try:
        documents = list(yaml.load_all(text, Loader=_StrictSafeLoader))
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown position"
        raise ConfigError(
            [Problem("", f"{source}: invalid YAML at {where}: {error.problem}")], source
        ) from None
    except yaml.YAMLError as error:
        raise ConfigError([Problem("", f"{source}: invalid YAML: {error}")], source) from None
    except RecursionError:
        raise ConfigError([Problem("", f"{source}: YAML nested too deeply")], source) from None
    documents = [document for document in documents if document is not None]
    if not documents:
        raise ConfigError([Problem("", f"{source}: the file is empty")], source)
    return documents


_NOT_JSON = object()


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    mapping = dict(pairs)
    if len(mapping) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise ConfigError([Problem("", f"duplicate key {key!r}")])
            seen.add(key)
    return mapping


def _parse_json(text: str | bytes, source: str) -> object:
    """A document that is JSON (what the Kubernetes source generates): ``json`` parses it
    about fifty times faster than the YAML parser. Not JSON after all (a YAML flow mapping):
    ``_NOT_JSON``, and the YAML parser reads it."""
    try:
        return json.loads(text, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError:
        return _NOT_JSON
    except ConfigError as error:
        raise ConfigError([Problem("", f"{source}: {error.problems[0].message}")], source) from None
    except ValueError as error:  # e.g. an integer of more than 4300 digits
        raise ConfigError([Problem("", f"{source}: invalid JSON: {error}")], source) from None
    except RecursionError:
        raise ConfigError([Problem("", f"{source}: JSON nested too deeply")], source) from None


def read_config_file(path: str | Path) -> bytes:
    """The file's bytes, capped; a ConfigError (not an OSError) when it cannot be read."""
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_CONFIG_BYTES + 1)
    except OSError as error:
        raise ConfigError(
            [Problem("", f"{path}: cannot read: {error.strerror}")], str(path)
        ) from None
    return data
