"""Reading YAML safely, whatever the bytes: a size cap, the safe loader, duplicate keys reported
(not dropped), numbers bounded before they are converted, and aliases bounded before anything
is built from them (a few hundred bytes of nested aliases can stand for billions of nodes).
Every failure is a ``ConfigError`` with a bounded message, never another exception.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import yaml

from lbd.config.errors import ConfigError, Problem
from lbd.config.fields import MAX_MESSAGE, show
from lbd.config.release import release

MAX_CONFIG_BYTES = 16 * 1024 * 1024
# What aliases may add to a document beyond the nodes written out (an ordinary anchor reused a
# few times adds a few nodes; an alias bomb adds billions).
MAX_ALIAS_EXPANSION = 100_000
MAX_NUMBER_CHARS = 40  # a number literal; Python's own limit (4,300 digits) raises ValueError

# libyaml's parser when PyYAML was built with it: about ten times faster on a large config,
# which is most of a reload's time. The construction (and our checks) stay in Python.
_BaseLoader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_MARKED = yaml.MarkedYAMLError


class _StrictSafeLoader(_BaseLoader):  # type: ignore[valid-type,misc]
    """SafeLoader that rejects a key written twice in one mapping (PyYAML keeps the last) and
    a number too long to convert."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[object, object]:
        seen: set[object] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, str | int | float | bool):
                continue  # unhashable or odd keys are reported by the section reader
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {show(key)}", key_node.start_mark
                )
            seen.add(key)
        mapping: dict[object, object] = super().construct_mapping(node, deep=deep)
        return mapping

    def construct_document(self, node: yaml.Node) -> object:
        """PyYAML's, but its table of every node constructed (a million entries for a large
        config) is emptied an entry at a time, not freed in one C call that holds the GIL
        for tens of milliseconds."""
        # PyYAML's own attributes, untyped in its stubs.
        data = self.construct_object(node)
        pending: list[Iterator[object]] = getattr(self, "state_generators")  # noqa: B009
        while pending:
            setattr(self, "state_generators", [])  # noqa: B010
            for generator in pending:
                for _ in generator:
                    pass
            pending = getattr(self, "state_generators")  # noqa: B009
        table: dict[yaml.Node, object] = getattr(self, "constructed_objects")  # noqa: B009
        setattr(self, "constructed_objects", {})  # noqa: B010
        while table:
            table.popitem()
        setattr(self, "recursive_objects", {})  # noqa: B010
        self.deep_construct = False
        return data

    def construct_bounded_number(self, node: yaml.ScalarNode) -> object:
        if len(node.value) > MAX_NUMBER_CHARS:
            raise yaml.constructor.ConstructorError(
                None, None, f"a number of {len(node.value)} characters", node.start_mark
            )
        if node.tag.endswith(":int"):
            return self.construct_yaml_int(node)
        return self.construct_yaml_float(node)


_StrictSafeLoader.add_constructor(
    "tag:yaml.org,2002:int", _StrictSafeLoader.construct_bounded_number
)
_StrictSafeLoader.add_constructor(
    "tag:yaml.org,2002:float", _StrictSafeLoader.construct_bounded_number
)


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
        documents = _load_all(text)
    except _MARKED as error:
        mark = error.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown position"
        raise _invalid(source, f"invalid YAML at {where}: {error.problem}") from None
    except yaml.YAMLError as error:
        raise _invalid(source, f"invalid YAML: {error}") from None
    except RecursionError:
        raise _invalid(source, "YAML nested too deeply") from None
    except (ValueError, TypeError, OverflowError, UnicodeError) as error:
        raise _invalid(source, f"invalid YAML: {error}") from None
    documents = [document for document in documents if document is not None]
    if not documents:
        raise ConfigError([Problem("", f"{source}: the file is empty")], source)
    return documents


def _load_all(text: str | bytes) -> list[object]:
    # No anchor can exist without an "&" and no alias without a "*": most configs (and every
    # kubectl output) have neither, and skip the walk of the node graph.
    aliases = ("&" in text and "*" in text) if isinstance(text, str) else b"&" in text
    loader = _StrictSafeLoader(text)
    try:
        documents = []
        while loader.check_node():
            node = loader.get_node()
            if aliases:
                _check_aliases(node)
            documents.append(loader.construct_document(node))
            loader.dispose()  # drops the parser's references to the nodes
            pieces, node = [node], None
            release(pieces)  # the node graph, in pieces: see lbd.config.release
        return documents
    finally:
        loader.dispose()


def _invalid(source: str, message: str) -> ConfigError:
    text = f"{source}: {message}"
    if len(text) > MAX_MESSAGE:
        text = text[: MAX_MESSAGE - 3] + "..."
    return ConfigError([Problem("", text)], source)


def _check_aliases(root: yaml.Node) -> None:
    """Reject a node graph whose aliases expand to more than MAX_ALIAS_EXPANSION extra nodes,
    or that refers to itself; linear in the nodes written out (each is sized once)."""
    limit = MAX_ALIAS_EXPANSION
    cap = _distinct(root) + limit + 1  # sizes stop growing here: no bigints from a bomb
    sizes: dict[int, int] = {}  # expanded size of each node, capped
    open_nodes: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        if children_done:
            open_nodes.discard(key)
            sizes[key] = min(cap, 1 + sum(sizes[id(c)] for c in _children(node)))
            continue
        if key in sizes:
            continue
        if key in open_nodes:
            raise yaml.YAMLError("a YAML alias refers to a node that contains it")
        open_nodes.add(key)
        stack.append((node, True))
        for child in _children(node):
            if id(child) in open_nodes:
                raise yaml.YAMLError("a YAML alias refers to a node that contains it")
            if id(child) not in sizes:
                stack.append((child, False))
    if sizes[id(root)] - len(sizes) > limit:
        raise yaml.YAMLError(f"YAML aliases expand to more than {limit} extra nodes")


def _distinct(root: yaml.Node) -> int:
    seen = {id(root)}
    stack = [root]
    while stack:
        for child in _children(stack.pop()):
            if id(child) not in seen:
                seen.add(id(child))
                stack.append(child)
    return len(seen)


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [item for pair in node.value for item in pair]
    return []


_NOT_JSON = object()


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    mapping = dict(pairs)
    if len(mapping) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise ConfigError([Problem("", f"duplicate key {show(key)}")])
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
