"""The package layout is the architecture, and this keeps the picture true (docs/development.md#layering).

``post_fl`` is five layers and a shell; imports run one way, down this list:

    shell        post_fl/cli.py, pipeline.py, preflight.py, resume.py
    experiments  post_fl/experiments/   sweeps: grid, cells, report, plots
    federated    post_fl/federated/     server round loop, client, protocol, transports, batched engine
    method       post_fl/method/        POST: distillation, prompt tuning, transfer, evaluation
    privacy      post_fl/privacy/       accounting, delta, randomness, ledger, user-level DP, RAPT, audit
    core         post_fl/core/          config, data, tasks, models, prompts, caches, progress

The Flower glue (``server_app``, ``client_app``, ``simulation``) may import anything in ``post_fl``;
``post_fl`` never imports the glue. Every import counts, at module level or inside a function. The
checks parse the sources (``ast``); nothing is imported except to check the packages' public names.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAYERS = ("core", "privacy", "method", "federated", "experiments", "shell")
GLUE = ("server_app", "client_app", "simulation")
RANK = {**{layer: i for i, layer in enumerate(LAYERS)}, "glue": len(LAYERS)}  # the glue sits above the shell
MAX_LINES = 400
# modules longer than MAX_LINES that hold one idea each (and the most lines they may grow to)
ONE_IDEA = {
    "post_fl.core.config": ("the typed settings of a run and how they are read", 600),
    "post_fl.core.data": ("the task's data: examples, files and their label rules, partitions", 450),
    "post_fl.core.models": ("a language model as a class scorer", 450),
    "post_fl.privacy.rapt": ("RAPT's local mechanisms", 450),
    "post_fl.experiments.grid": ("the sweep file and its grid of cells", 450),
    "post_fl.federated.server": ("the server's state and round loop", 500),
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _sources() -> dict[str, Path]:
    files = sorted(REPO.glob("post_fl/**/*.py")) + [p for g in GLUE for p in sorted((REPO / g).glob("*.py"))]
    return {_module_name(p): p for p in files}


SOURCES = _sources()
TREES = {name: ast.parse(path.read_text(), str(path)) for name, path in SOURCES.items()}


def _is_package(name: str) -> bool:
    return SOURCES[name].name == "__init__.py"


def _lazy_table(package: str) -> dict[str, tuple[str, ...]]:
    """The ``lazy_exports(__name__, {module: names})`` table of a subpackage's ``__init__`` ({} if none)."""
    for node in ast.walk(TREES[package]):
        if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "lazy_exports":
            return ast.literal_eval(node.args[1])
    return {}


def _owner(package: str, name: str) -> str:
    """The module that defines ``name`` offered by ``package`` (through its lazy table), else the package."""
    for module, names in _lazy_table(package).items():
        if name in names:
            return f"{package}.{module}"
    return package


def _resolve(module: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if _is_package(module) else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str):
    """(imported module, imported name or None, line) for every post_fl / glue import of ``module``."""
    out = []
    for node in ast.walk(TREES[module]):
        if isinstance(node, ast.Import):
            out += [(a.name, None, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, node)
            for a in node.names:
                if f"{target}.{a.name}" in SOURCES:  # a submodule
                    out.append((f"{target}.{a.name}", None, node.lineno))
                elif target in SOURCES and _is_package(target):
                    out.append((_owner(target, a.name), a.name, node.lineno))
                else:
                    out.append((target, a.name, node.lineno))
    return [(t, n, line) for t, n, line in out if t.split(".")[0] in ("post_fl", *GLUE)]


def _layer(module: str) -> str:
    parts = module.split(".")
    if parts[0] in GLUE:
        return "glue"
    if len(parts) > 1 and parts[1] in LAYERS[:-1]:
        return parts[1]
    return "shell"


def _edges() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {m: set() for m in SOURCES}
    for module in SOURCES:
        for target, _, _ in _imports(module):
            while target not in SOURCES and "." in target:  # "post_fl.x.y" where y is a name, not a module
                target = target.rsplit(".", 1)[0]
            if target in SOURCES and target != module:
                graph[module].add(target)
    return graph


def test_post_fl_never_imports_the_flower_glue():
    bad = [f"{m}:{line} imports {t}" for m in SOURCES if _layer(m) != "glue"
           for t, _, line in _imports(m) if t.split(".")[0] in GLUE]
    assert not bad, "\n".join(bad)


def test_imports_run_down_the_layers():
    bad = []
    for module in SOURCES:
        layer = _layer(module)
        if layer == "glue":
            continue
        for target, _, line in _imports(module):
            if RANK[_layer(target)] > RANK[layer]:
                bad.append(f"{SOURCES[module].relative_to(REPO)}:{line}: {layer} imports {target} ({_layer(target)})")
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_no_import_cycles():
    graph = _edges()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not cycles, "modules that import each other in a loop: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_no_module_imports_another_modules_private_names():
    bad = []
    for module, tree in TREES.items():
        aliases = {}  # local name -> post_fl module it is bound to
        for target, name, line in _imports(module):
            if name is not None and name.startswith("_") and not name.startswith("__") and target != module:
                bad.append(f"{SOURCES[module].relative_to(REPO)}:{line}: imports {name} from {target}")
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                target = _resolve(module, node)
                for a in node.names:
                    if f"{target}.{a.name}" in SOURCES:
                        aliases[a.asname or a.name] = f"{target}.{a.name}"
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.asname and a.name in SOURCES:
                        aliases[a.asname] = a.name
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                bad.append(f"{SOURCES[module].relative_to(REPO)}:{node.lineno}: uses {aliases[node.value.id]}"
                           f".{node.attr}")
    assert not bad, "private names used across modules:\n" + "\n".join(bad)


def _defined(tree: ast.Module) -> set[str]:
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
    return names


def test_no_module_only_re_exports():
    """A module defines something; ``__all__`` lists only what it defines. Re-exporting is the job of a
    package's ``__init__`` alone, and there only through its table of public names."""
    bad = []
    for module, tree in TREES.items():
        if _is_package(module) or _layer(module) == "glue":
            continue
        defined = _defined(tree) - {"__all__", "log"}
        if not defined:
            bad.append(f"{module}: defines nothing (a facade)")
        for node in tree.body:
            if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "__all__" for t in node.targets):
                listed = set(ast.literal_eval(node.value))
                if listed - _defined(tree):
                    bad.append(f"{module}: __all__ re-exports {sorted(listed - _defined(tree))}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("package", [f"post_fl.{layer}" for layer in LAYERS[:-1]])
def test_each_package_lists_its_public_names(package):
    """Its ``__init__`` holds a docstring and the table of public names, each defined in a module of the
    package and importable from the package itself."""
    tree = TREES[package]
    assert ast.get_docstring(tree), f"{package}: say what the package holds"
    table = _lazy_table(package)
    assert table, f"{package}/__init__.py lists no public names"
    for node in tree.body[1:]:
        assert isinstance(node, (ast.ImportFrom, ast.Assign)), f"{package}/__init__.py: only the table of names"
    pkg = importlib.import_module(package)
    for module, names in table.items():
        assert f"{package}.{module}" in SOURCES, f"{package}: no module {module}"
        clash = [n for n in names if f"{package}.{n}" in SOURCES]
        assert not clash, f"{package}: {clash} would be hidden by the submodules of the same name"
        defined = _defined(TREES[f"{package}.{module}"])
        for name in names:
            assert name in defined, f"{package}: {name} is not defined in {module}"
            assert getattr(pkg, name) is getattr(importlib.import_module(f"{package}.{module}"), name)
    assert sorted(pkg.__all__) == sorted(n for names in table.values() for n in names)


def test_modules_stay_short_unless_they_hold_one_idea():
    bad = []
    for module, path in SOURCES.items():
        lines = len(path.read_text().splitlines())
        idea, limit = ONE_IDEA.get(module, ("", MAX_LINES))
        if lines > limit:
            bad.append(f"{path.relative_to(REPO)}: {lines} lines (limit {limit}{'; ' + idea if idea else ''})")
    assert not bad, "split by job, or add to ONE_IDEA saying which one idea it holds:\n" + "\n".join(bad)
