"""The layout's rules (docs/architecture.md), checked on the source: imports flow down the layers,
no module imports another in a circle (type-only and function-level imports included), few
modules at the package root, and no module too long to read in one sitting."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "lbd"
# Bottom to top: a module may import its own layer and the layers before it, never after.
LAYERS = (
    "config",
    "observability",
    "balancing",
    "shm",
    "endpoints",
    "net",
    "health",
    "sources",
    "runtime",
    "admin",
    "process",
    "demo",
    "cli",
)
ROOT_ONLY = {"__init__", "__main__"}  # importable from anywhere (the version string)
MAX_ROOT_MODULES = 6
MAX_LINES = 400


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def imported(path: Path, name: str, known: set[str]) -> Iterator[str]:
    """Every lbd module ``path`` imports, wherever the import statement stands."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            # ``from lbd.net import splice`` imports the module lbd.net.splice.
            targets = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base
                for alias in node.names
            ]
        else:
            continue
        for target in targets:
            if target == "lbd" or target.startswith("lbd."):
                while target not in known and "." in target:
                    target = target.rpartition(".")[0]
                yield target


def layer(module: str) -> int | None:
    parts = module.split(".")
    if len(parts) == 1 or parts[1] in ROOT_ONLY:
        return None
    return LAYERS.index(parts[1])


def graph() -> dict[str, set[str]]:
    found = modules()
    known = set(found)
    return {name: set(imported(path, name, known)) - {name} for name, path in found.items()}


def test_every_module_belongs_to_a_layer() -> None:
    strays = [m for m in modules() if m != "lbd" and m.split(".")[1] not in (*LAYERS, *ROOT_ONLY)]
    assert strays == []


def test_imports_flow_down_the_layers() -> None:
    upward = [
        f"{module} -> {target}"
        for module, targets in graph().items()
        for target in targets
        if (low := layer(module)) is not None and (high := layer(target)) is not None and high > low
    ]
    assert upward == []


def test_no_import_circles() -> None:
    edges = graph()
    circles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(edges.get(module, ())):
            if state.get(target) == 1:
                circles.append([*path[path.index(target) :], target])
            elif target not in state:
                visit(target, [*path, target])
        state[module] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    assert circles == []


def test_few_modules_at_the_package_root() -> None:
    root = sorted(p.stem for p in PACKAGE.glob("*.py"))
    assert len(root) <= MAX_ROOT_MODULES, root


def test_every_module_reads_in_one_sitting() -> None:
    long = {
        str(path.relative_to(PACKAGE.parent)): n
        for path in PACKAGE.rglob("*.py")
        if (n := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert long == {}
