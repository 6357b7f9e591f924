"""The package's layering: no import cycle (counting imports inside functions too), no
module reaching into another's private names, and the core decoder free of torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "qpack"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[str, list[str], int]]:
    """(imported module, names, line) of every relative import in the file."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.split(".")
            base = base[: len(base) - node.level + 1]
            target = ".".join(base + ([node.module] if node.module else []))
            found.append((target, [a.name for a in node.names], node.lineno))
    return found


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for target, names, _ in _imports(path):
            for n in names:  # `from . import x` imports the module x
                if f"{target}.{n}" in modules:
                    graph[name].add(f"{target}.{n}")
            if target in modules and target != name:
                graph[name].add(target)
    return graph


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of the graph (depth-first), or None. Edges into the package's __init__ (its
    re-exports) are not followed."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt == "qpack":
                continue
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and node != "qpack":
            found = visit(node)
            if found:
                return found
    return None


def test_no_import_cycle():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    cycle = _find_cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_no_module_imports_another_modules_private_names():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        for target, names, line in _imports(path):
            for n in names:
                # a private *module* may be imported (the compiled kernels, helpers)
                if n.startswith("_") and not n.startswith("__") and not (
                    PACKAGE.parent / (target.replace(".", "/") + f"/{n}.py")
                ).exists() and n != "_ckernels":
                    offenders.append(f"{path.relative_to(PACKAGE.parent)}:{line} {target}.{n}")
    assert not offenders, offenders


def test_the_core_decoder_does_not_import_torch():
    code = (
        "import sys, qpack, qpack.numpy, qpack.reader, qpack.writer, qpack.cli;"
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=PACKAGE.parent)
