"""The shape of the code: the import graphs of ``maskdecay`` and of the EVC codec have no circles, no module imports a
``_private`` name from a module of another (sub-)package, the codec's sub-packages import downwards only, and
``import maskdecay`` has no side effects such as importing matplotlib.

The graph is built from the source with :mod:`ast` (relative imports resolved, imports under ``if TYPE_CHECKING:``
left out because they never run), so it sees function-level imports too.
"""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from dataclasses import dataclass, field

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
#: (folder, the package name it is installed as)
TREES = {"maskdecay": (os.path.join(ROOT, "maskdecay"), "maskdecay"),
         "evc": (os.path.join(ROOT, "examples", "evc"), "maskdecay_examples.evc")}
#: the codec's layers: a module may import its own layer and the layers below, never one above or a sibling
EVC_LAYERS = {"fileio": 0, "models": 1, "engines": 2, "coding": 3, "training": 3, "cli": 4}


@dataclass
class Module:
    name: str
    is_package: bool
    #: (imported module, names imported from it: None for a plain ``import``)
    imports: list[tuple[str, list[str] | None]] = field(default_factory=list)
    #: ``alias._name`` attribute reads where ``alias`` is an imported module
    private_attributes: list[tuple[str, str]] = field(default_factory=list)


def _modules(folder: str, package: str) -> dict[str, Module]:
    found = {}
    for dirpath, dirnames, files in os.walk(folder):
        dirnames[:] = [d for d in dirnames if d != "__pycache__"]
        rel = os.path.relpath(dirpath, folder)
        parts = [package] + ([] if rel == "." else rel.split(os.sep))
        for f in files:
            if not f.endswith(".py"):
                continue
            is_pkg = f == "__init__.py"
            name = ".".join(parts if is_pkg else parts + [f[:-3]])
            found[name] = _parse(os.path.join(dirpath, f), name, is_pkg)
    return found


def _in_type_checking(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def _parse(path: str, name: str, is_pkg: bool) -> Module:
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    mod = Module(name, is_pkg)
    package = name if is_pkg else name.rpartition(".")[0]
    aliases: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)) and _in_type_checking(node, parents):
            continue
        if isinstance(node, ast.Import):
            for a in node.names:
                mod.imports.append((a.name, None))
                if a.asname:
                    aliases[a.asname] = a.name
                else:
                    aliases[a.name.split(".")[0]] = a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            names = [a.name for a in node.names]
            mod.imports.append((base, names))
            for a in node.names:
                aliases[a.asname or a.name] = f"{base}.{a.name}"
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                and node.attr.startswith("_") and not node.attr.startswith("__")):
            mod.private_attributes.append((aliases[node.value.id], node.attr))
    return mod


def _edges(mods: dict[str, Module]) -> dict[str, set[str]]:
    """Module -> the analysed modules it imports (``from pkg import sub`` counts as importing ``pkg.sub``)."""
    out: dict[str, set[str]] = {m: set() for m in mods}
    for m in mods.values():
        for target, names in m.imports:
            subs = [f"{target}.{n}" for n in names or [] if f"{target}.{n}" in mods]
            if subs:
                out[m.name].update(subs)
            if target in mods and (names is None or len(subs) < len(names)):
                out[m.name].add(target)
    for m in out:
        out[m].discard(m)
    return out


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


@pytest.fixture(scope="module", params=sorted(TREES))
def tree(request) -> tuple[str, dict[str, Module]]:
    folder, package = TREES[request.param]
    return package, _modules(folder, package)


def test_the_parser_sees_the_imports(tree):
    package, mods = tree
    edges = _edges(mods)
    assert len(mods) > 10 and sum(len(e) for e in edges.values()) > 20


def test_import_graph_has_no_cycles(tree):
    _, mods = tree
    assert _cycles(_edges(mods)) == []


def _package_of(name: str, mods: dict[str, Module]) -> str:
    return name if name in mods and mods[name].is_package else name.rpartition(".")[0]


def test_no_private_name_crosses_a_package_boundary(tree):
    package, mods = tree
    bad = []
    for m in mods.values():
        home = _package_of(m.name, mods)
        for target, names in m.imports:
            if not target.startswith(package) or _package_of(target, mods) == home:
                continue
            bad += [f"{m.name}: from {target} import {n}" for n in names or []
                    if n.startswith("_") and not n.startswith("__")]
        for target, attr in m.private_attributes:
            if target.startswith(package) and _package_of(target, mods) != home:
                bad.append(f"{m.name}: {target}.{attr}")
    assert bad == []


def test_evc_imports_flow_downwards():
    mods = _modules(*TREES["evc"])
    edges = _edges(mods)

    def layer(name: str) -> str:
        return name.split(".")[2] if name.count(".") >= 2 else ""

    bad = []
    for m, targets in edges.items():
        if layer(m) not in EVC_LAYERS:  # the package's own __init__ (the public facade) and __main__
            continue
        for t in targets:
            lm, lt = EVC_LAYERS[layer(m)], EVC_LAYERS.get(layer(t))
            if lt is None or lt > lm or (lt == lm and layer(t) != layer(m)):
                bad.append(f"{m} -> {t}")
    assert bad == []


def test_importing_maskdecay_has_no_side_effects():
    code = ("import maskdecay, sys; assert 'matplotlib' not in sys.modules, 'matplotlib imported'; "
            "assert 'maskdecay_examples' not in sys.modules")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
