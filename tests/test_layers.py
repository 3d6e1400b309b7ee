"""The package's layers: imports run only downward, and no module imports itself back.

Every module of ``src/normkit`` is parsed with :mod:`ast` (nothing is imported) and every import
is read: top-level and lazy ones inside functions, ``if`` blocks and ``try`` blocks, absolute
(``normkit.x``), relative (``from .x import y``, ``from . import x``) and
``importlib.import_module("normkit.x")`` with a literal name. Each import becomes an edge from the
importing module to the module it loads (``from pkg import name`` goes to ``pkg.name`` where that
is a module, else to ``pkg/__init__.py``).

The layer of each module is written out in :data:`LAYERS` below (bottom = 0). The test fails on

- an edge from a lower layer to a higher one (an arrow back up), and
- any import cycle between modules, inside one layer too (a strongly connected component of the
  import graph with more than one module),

listing the offending edges. A new module must be given a layer here (the test says so).
The same map, with the reasons, is in ``docs/design-notes.md`` ("Layers").
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "normkit"

# Bottom to top; a module may import its own layer (without a cycle) and the layers below it.
# Keys are module names relative to ``normkit``; a key names a module or a whole subpackage
# (the longest matching key wins). ``""`` is ``normkit/__init__.py``.
LAYER_NAMES = (
    "base",  # 0: errors, registry, _estimator: import nothing of normkit but errors
    "functional",  # 1: pure tensor math, incl. moment merging and the collectives' math
    "blocks",  # 2: nap (with the synced partition), nop, nrr
    "composition",  # 3: normalization
    "methods",  # 4: named presets
    "applications",  # 5: weight, gradient, apply, distributed, population, input_norm, analysis
    "facade",  # 6: `import normkit` (the package's public face)
    "tools",  # 7: experiments, cli, benchmarks (`python -m normkit`)
)
LAYERS: dict[str, int] = {
    "errors": 0,
    "registry": 0,  # the @register decorator and the method table: presets register into it
    "_estimator": 0,  # scikit-learn estimator conventions, used by input_norm
    "_version": 0,
    "_device": 0,  # check_device: the --device of compare and bench (torch alone)  # (if packaging adds one) the version string
    "functional": 1,
    "nap": 2,  # incl. the Synced partition (merges over ranks with functional.collectives)
    "nop": 2,
    "nrr": 2,
    "normalization": 3,
    "_pipeline": 3,  # the forward pipeline: Normalization's steps and the functional form
    "_eval_kernel": 3,  # Normalization's evaluation fast paths (one BN kernel call, one block matmul)
    "_call_cache": 3,  # Normalization's per-call lookups without nn.Module.__getattr__
    "_forward_copy": 3,  # each preset's own copy of Normalization.forward (dynamo's cache)
    "methods": 4,
    "weight": 5,
    "gradient": 5,
    "apply": 5,  # incl. apply.sync: nk.sync(model)
    "distributed": 5,  # public face of synchronization: re-exports, no upward imports
    "population": 5,
    "input_norm": 5,
    "analysis": 5,
    "": 6,
    "_deprecated": 6,  # installs deprecated aliases on lower modules (no upward import)
    "experiments": 7,
    "cli": 7,
    "_cli_values": 7,  # the value parsers of the command's options
    "__main__": 7,  # `python -m normkit`
    "analysis.cli": 7,  # `normkit analyze`: a command, beside cli.py (loads datasets, prints)
    "_bench": 7,  # the benchmarks behind `normkit bench` (private subpackage)
    "benchmarking": 7,  # deprecated alias of _bench
    "bench_weight": 7,  # deprecated alias of _bench
}

# A deprecation alias keeps an old public name working for one release and may reach up to where
# the name went; each such edge is listed here with the names it serves, and nothing else may.
DEPRECATED_UPWARD: dict[tuple[str, str], str] = {
    ("normkit.analysis.inputs", "normkit.experiments.data"):
        "analysis.inputs.load_inputs and input_conditioning() without x (deprecated in 0.1)",
}


def module_name(path: Path, root: Path) -> str:
    """``src/normkit/nop/_whiten.py`` -> ``normkit.nop._whiten``; a package's ``__init__`` -> it."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(
    source: str, name: str, is_package: bool, modules: set[str], package: str = PACKAGE
) -> Iterable[tuple[str, int]]:
    """Yield ``(target module, line)`` for every import of ``package`` in one module's source."""
    here = name if is_package else name.rpartition(".")[0]

    def resolve(dotted: str) -> str | None:
        # The longest prefix that is a module of the package (``normkit.x.y`` -> ``normkit.x``
        # when ``y`` is a name defined in ``x``).
        while dotted:
            if dotted in modules:
                return dotted
            dotted = dotted.rpartition(".")[0]
        return None

    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == package:
                    target = resolve(alias.name)
                    if target:
                        yield target, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = here.split(".")
                if node.level > 1:
                    base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts)
                source_module = f"{base}.{node.module}" if node.module else base
            else:
                source_module = node.module or ""
            if source_module.split(".")[0] != package:
                continue
            for alias in node.names:
                # ``from pkg import sub`` loads the submodule; ``from mod import name``, the module.
                target = resolve(f"{source_module}.{alias.name}")
                if target:
                    yield target, node.lineno
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute | ast.Name)
            and (node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id)
            == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
            and node.args[0].value.split(".")[0] == package
        ):
            target = resolve(node.args[0].value)
            if target:
                yield target, node.lineno


def import_graph(root: Path, package: str = PACKAGE) -> dict[str, dict[str, int]]:
    """``{module: {imported module: first line}}`` for every module under ``root/package``."""
    files = sorted((root / package).rglob("*.py"))
    names = {module_name(f, root): f for f in files}
    graph: dict[str, dict[str, int]] = {}
    for name, path in names.items():
        edges: dict[str, int] = {}
        is_package = path.name == "__init__.py"
        for target, line in imported_modules(
            path.read_text(encoding="utf-8"), name, is_package, set(names), package
        ):
            if target != name:
                edges.setdefault(target, line)
        graph[name] = edges
    return graph


def layer_of(module: str, package: str = PACKAGE) -> int | None:
    """The layer of ``normkit.a.b`` from the longest key of :data:`LAYERS` that prefixes ``a.b``."""
    if module == package:
        return LAYERS[""]
    parts = module[len(package) + 1 :].split(".")
    for n in range(len(parts), 0, -1):
        key = ".".join(parts[:n])
        if key in LAYERS:
            return LAYERS[key]
    return None


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            advanced = False
            for child in children:
                if child not in graph:
                    continue
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                    advanced = True
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
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
    return found


def _edge(graph: dict[str, dict[str, int]], a: str, b: str) -> str:
    return f"{a} -> {b} (line {graph[a][b]})"


@pytest.fixture(scope="module")
def graph() -> dict[str, dict[str, int]]:
    return import_graph(SRC)


def test_every_module_has_a_layer(graph: dict[str, dict[str, int]]) -> None:
    missing = [m for m in graph if layer_of(m) is None]
    assert not missing, f"give these modules a layer in tests/test_layers.py LAYERS: {missing}"


def test_no_import_runs_back_up(graph: dict[str, dict[str, int]]) -> None:
    upward = []
    for a, targets in sorted(graph.items()):
        for b in sorted(targets):
            la, lb = layer_of(a), layer_of(b)
            if la is not None and lb is not None and lb > la and (a, b) not in DEPRECATED_UPWARD:
                upward.append(
                    f"{_edge(graph, a, b)}: {LAYER_NAMES[la]} imports {LAYER_NAMES[lb]}"
                )
    assert not upward, "imports from a lower layer to a higher one:\n" + "\n".join(upward)


def test_deprecated_upward_imports_still_exist(graph: dict[str, dict[str, int]]) -> None:
    stale = [edge for edge in DEPRECATED_UPWARD if edge[1] not in graph.get(edge[0], {})]
    assert not stale, f"remove these from DEPRECATED_UPWARD, their alias is gone: {stale}"


def test_no_import_cycle(graph: dict[str, dict[str, int]]) -> None:
    report = []
    for component in cycles(graph):
        members = set(component)
        edges = [
            _edge(graph, a, b) for a in component for b in sorted(graph[a]) if b in members
        ]
        report.append(f"cycle of {len(component)} modules:\n  " + "\n  ".join(edges))
    assert not report, "\n".join(report)


def test_walker_reads_lazy_relative_and_dynamic_imports(tmp_path: Path) -> None:
    """The walker itself: a tiny package with each kind of import, a cycle and an upward edge."""
    pkg = tmp_path / PACKAGE
    (pkg / "functional").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from . import methods\n")
    (pkg / "functional" / "__init__.py").write_text("")
    (pkg / "functional" / "math.py").write_text(
        "def f():\n    from ..methods import g  # lazy, relative, upward\n"
    )
    (pkg / "methods.py").write_text(
        "import importlib\nfrom normkit.functional import math\n"
        "def g():\n    importlib.import_module('normkit.nop')\n"
    )
    (pkg / "nop.py").write_text("try:\n    import normkit.methods\nexcept ImportError:\n    pass\n")
    found = import_graph(tmp_path)
    assert found["normkit"] == {"normkit.methods": 1}
    assert found["normkit.functional.math"] == {"normkit.methods": 2}
    assert found["normkit.methods"] == {"normkit.functional.math": 2, "normkit.nop": 4}
    assert found["normkit.nop"] == {"normkit.methods": 2}
    assert cycles(found) == [
        ["normkit.functional.math", "normkit.methods", "normkit.nop"]
    ]
    assert layer_of("normkit.functional.math") == 1 < layer_of("normkit.methods")
    assert layer_of("normkit") == LAYERS[""] and layer_of("normkit.unmapped_module") is None
