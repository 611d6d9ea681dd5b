"""The package's layers only look down: no import points to a layer above its own, no cycle.

The order (docs/architecture.md): ``errors``, ``files``, ``validation`` and ``device`` (helpers
everything may use), ``config`` (compose, validate, build: it reaches models and data only through
Hydra's ``_target_``), then ``nn`` < ``models`` < ``metrics`` < ``data`` < ``step`` < ``memory``
< ``training`` < ``inference`` < ``cli`` < ``bench``. Every import counts, module-level or inside
a function.
"""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

ORDER = [
    "errors",
    "files",
    "validation",
    "device",
    "config",
    "nn",
    "models",
    "metrics",
    "data",
    "step",
    "memory",
    "training",
    "inference",
    "cli",
    "bench",
]
SRC = REPO / "src"


def _module(path: Path) -> str:
    return ".".join(path.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__")


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
        elif isinstance(node, ast.ImportFrom):  # relative: resolve against the package
            base = _module(path).split(".")[: -node.level or None]
            found.add(".".join([*base, node.module] if node.module else base))
    return {name for name in found if name.split(".")[0] == "revseg"}


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def _graph() -> dict[str, set[str]]:
    return {_module(p): _imports(p) for p in sorted((SRC / "revseg").rglob("*.py"))}


def test_every_module_belongs_to_a_layer():
    strays = {m for m in _graph() if m != "revseg" and _layer(m) not in ORDER}
    assert not strays, f"modules outside the layers of docs/architecture.md: {sorted(strays)}"


def test_no_import_points_up():
    upward = [
        f"{module} -> {target}"
        for module, targets in _graph().items()
        for target in sorted(targets)
        if _layer(module) in ORDER
        and _layer(target) in ORDER
        and ORDER.index(_layer(target)) > ORDER.index(_layer(module))
    ]
    assert not upward, "imports pointing to a layer above:\n" + "\n".join(upward)


def test_no_import_cycle_between_modules():
    imports = _graph()
    graph = {m: {t for t in targets if t in imports} for m, targets in imports.items()}
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path, node, nxt]
            if nxt not in state and (cycle := visit(nxt, [*path, node])):
                return cycle
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [])):
            raise AssertionError("import cycle: " + " -> ".join(cycle))
