"""The house's import graph, read from the source with ``ast``: no cycle, nothing against the flow.

Every ``import`` and ``from ... import`` of a ``molting`` module counts, at module level and
inside functions alike (a deferred import still ties two modules together); only the imports
under ``if TYPE_CHECKING:`` are left out, since they never run. ``from package import name``
counts as an import of ``package.name`` when that is a module, else of ``package``.

Measured on 2026-12-05 with these functions. Before issue 20: 45 modules, 169 imports between
them, a cycle of five (data, persona, preferences, eval.rubric, eval.probes) and one of four
(export.architectures and its three architectures), three imports against the flow (data ->
eval.rubric, data -> eval.probes, train -> registry), a longest chain of 13 modules, and 129
molting names imported inside functions in 20 files, 92 of modules that load nothing heavy.
After (with main merged at 10:10 UTC): 54 modules, 203 imports, no cycle, none against the flow,
a longest chain of 11, and 29 imports inside functions in 9 files, each deferring a heavy library.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import molting

ROOT = Path(molting.__file__).parent
# Libraries slow enough to import that a function may defer them (directly or through a molting module).
HEAVY = {
    "torch", "transformers", "llama_cpp", "peft", "trl", "bitsandbytes", "matplotlib", "datasets",
    "gguf", "numpy", "safetensors", "accelerate", "huggingface_hub", "tokenizers", "sentencepiece",
}
# The flow, upstream first: a module may import its own layer or the layers before it, never a later one.
# Backends sit low: they know models and text, nothing of personas, training or export, and every
# layer that generates text (export's check, Persona.chat, the rubric) calls one.
LAYERS = [
    ("base", ["errors", "io", "names", "text", "versions", "templates", "modelfiles", "models", "eval.checks"]),
    ("planners", ["fit", "fit_train"]),
    ("backends", ["backends"]),
    ("persona and data formats", ["data", "preferences", "persona"]),
    ("train", ["train"]),
    ("export", ["export"]),
    ("eval", ["eval"]),
    ("persona directory and lint", ["persona_dir", "lint"]),
    ("report and registry", ["plots", "run_report", "registry"]),
    ("commands", ["pipeline", "bench", "serve", "cli", ""]),
]


def modules() -> dict[str, Path]:
    """Dotted name -> file, for every module of the package (a package is its ``__init__``)."""
    found = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _targets(node: ast.Import | ast.ImportFrom, package: str, known: dict) -> list[str]:
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:
            parent = package.split(".")[: len(package.split(".")) - node.level + 1]
            base = ".".join([*parent, *([base] if base else [])])
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
    return names


def _is_type_checking(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")
    )


@cache
def imports() -> list[tuple[str, str, int, bool]]:
    """``(importer, imported, line, inside a function)`` for every import of a molting module or another library.

    ``imported`` is a molting module's dotted name, or ``ext:<top-level package>`` for anything else.
    """
    known = modules()
    found = []
    for name, path in known.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]

        def walk(node: ast.AST, in_function: bool, name=name, package=package) -> None:
            for child in ast.iter_child_nodes(node):
                if _is_type_checking(child):
                    continue
                inside = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
                if isinstance(child, ast.Import | ast.ImportFrom):
                    for target in _targets(child, package, known):
                        if target.split(".")[0] != "molting":
                            found.append((name, f"ext:{target.split('.')[0]}", child.lineno, inside))
                            continue
                        while target and target not in known:
                            target = target.rpartition(".")[0]
                        if target and target != name:
                            found.append((name, target, child.lineno, inside))
                walk(child, inside)

        walk(ast.parse(path.read_text(encoding="utf-8")), False)
    return found


def graph() -> dict[str, set[str]]:
    """Module -> the molting modules it imports anywhere in its file."""
    edges: dict[str, set[str]] = {name: set() for name in modules()}
    for importer, imported, _, _ in imports():
        if not imported.startswith("ext:"):
            edges[importer].add(imported)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def longest_chain(edges: dict[str, set[str]]) -> list[str]:
    """The longest path of imports (the graph must be acyclic), as module names."""

    @cache
    def from_(v: str) -> tuple[str, ...]:
        tails = [from_(w) for w in edges[v]]
        return (v, *max(tails, key=len, default=()))

    return list(max((from_(v) for v in sorted(edges)), key=len))


def layer(module: str) -> int:
    """The index in LAYERS of ``module`` (by its longest matching prefix below ``molting.``)."""
    name = module.removeprefix("molting").removeprefix(".")
    best = (-1, -1)
    for i, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if name == prefix or name.startswith(prefix + ".") or (prefix == "" and name == ""):
                best = max(best, (len(prefix), i))
    assert best[1] >= 0, f"{module} is in no layer of LAYERS: place it"
    return best[1]


@cache
def heavy_modules() -> frozenset[str]:
    """The modules whose import loads a HEAVY library at import time, through any module-level
    import or their package's ``__init__`` (a fixed point over the graph)."""
    found: set[str] = set()
    changed = True
    while changed:
        changed = False
        for module in modules():
            if module in found:
                continue
            top = [imported for importer, imported, _, inside in imports() if importer == module and not inside]
            parent = module.rpartition(".")[0]
            if parent in found or any(i in found or (i.startswith("ext:") and i[4:] in HEAVY) for i in top):
                found.add(module)
                changed = True
    return frozenset(found)


def heavy(module: str) -> bool:
    """Whether importing ``module`` loads a HEAVY library (see ``heavy_modules``)."""
    return module in heavy_modules()


def test_the_import_graph_has_no_cycle():
    found = cycles(graph())
    assert found == [], f"import cycles: {found}"


def test_no_import_runs_against_the_flow():
    against = [
        f"{importer}:{line} imports {imported} ({LAYERS[layer(importer)][0]} -> {LAYERS[layer(imported)][0]})"
        for importer, imported, line, _ in imports()
        if not imported.startswith("ext:") and layer(imported) > layer(importer)
    ]
    assert against == []


def test_imports_inside_functions_only_defer_heavy_libraries():
    """An import inside a function is there to keep ``import molting`` and ``molting --help`` fast."""
    light = [
        f"{importer}:{line} imports {imported} inside a function, and it loads nothing heavy"
        for importer, imported, line, inside in imports()
        if inside and not imported.startswith("ext:") and not heavy(imported)
    ]
    assert light == []


def test_the_longest_chain_is_shorter_than_before_issue_20():
    chain = longest_chain(graph())
    assert len(chain) < 13, " -> ".join(chain)


def test_the_checks_catch_a_cycle_and_an_import_against_the_flow():
    """Negative control: a planted back edge is a cycle, and eval -> lint runs against the flow."""
    edges = {k: set(v) for k, v in graph().items()}
    edges["molting.eval.rubric"].add("molting.lint")
    assert any("molting.lint" in c and "molting.eval.rubric" in c for c in cycles(edges))
    assert layer("molting.lint") > layer("molting.eval.rubric")
    assert heavy("molting.train") and not heavy("molting.persona")
