"""The import graph of the two packages, read from their source (nothing is imported): the oracles
stay off the production path, and no module imports itself back through others.

Every ``import`` statement counts, at module level or inside a function (a deferred import still
runs the module it names). An import names the most specific module it reaches: ``from .attention
import ata_attention`` is an edge to ``mgh_kernels.attention``, ``from . import backend`` to
``mgh_kernels.backend``; the parent packages Python runs first are not edges (every submodule
would otherwise close a circle with its package's ``__init__``).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("mgh_kernels", "mgh_train")

ORACLES = "mgh_kernels.reference"
# The modules allowed to import the oracles: the package's front door exports them (as
# FlagAttention's flag_attn exports its testing module) and the testing helpers may use them.
MAY_IMPORT_ORACLES = {"mgh_kernels", "mgh_kernels.reference", "mgh_kernels.testing"}


def _modules() -> dict:
    """{dotted module name: source path} of every module of the two packages."""
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _imports(name: str, path: Path, modules: dict) -> set:
    """The modules of ``modules`` that the source of module ``name`` imports."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                base = ".".join(base + ([node.module] if node.module else []))
            else:
                base = node.module
            # "from a import b" reaches module a.b when it is one, else module a
            candidates = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for candidate in candidates:
            while candidate and candidate not in modules:  # "import a.b.c" of a name inside a.b
                candidate = candidate.rpartition(".")[0]
            if candidate and candidate != name:
                targets.add(candidate)
    return targets


def _graph() -> dict:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _cycles(graph: dict) -> list:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_graph_is_read():
    """The walk finds the edges it should (so the tests below cannot pass on an empty graph)."""
    graph = _graph()
    assert "mgh_kernels.pooling" in graph["mgh_kernels"]
    assert "mgh_kernels._validation" in graph["mgh_kernels.pooling"]
    assert "mgh_kernels.reference" in graph["mgh_kernels"]
    assert "mgh_kernels.attention.varlen_kernels" in graph["mgh_kernels.attention.varlen"]
    assert any(target.startswith("mgh_kernels") for target in graph["mgh_train.trainer"])


def test_no_production_module_imports_the_oracles():
    """``mgh_kernels.reference`` is for tests and benchmarks: no module of mgh_kernels or mgh_train
    other than the front door and the testing helpers may import it (not even lazily)."""
    offenders = sorted(
        name for name, targets in _graph().items() if ORACLES in targets and name not in MAY_IMPORT_ORACLES
    )
    assert offenders == [], f"these modules import the oracles {ORACLES}: {offenders}"


def test_the_oracles_import_no_production_code():
    """The oracles stand alone: they import argument checks and precision rules, never the fused ops
    or the poolings whose truth they are."""
    allowed = {"mgh_kernels._validation", "mgh_kernels._precision"}
    assert _graph()[ORACLES] <= allowed, f"{ORACLES} imports {sorted(_graph()[ORACLES] - allowed)}"


def test_no_import_circle():
    """No module imports itself back through others (lazy imports inside functions included)."""
    cycles = _cycles(_graph())
    assert cycles == [], "import circles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_the_circle_finder_finds_circles():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
