"""The package's shape, read from its source: the import graph follows the stages, has no
circle, every function-local import says why it is local, no layer branches on a model's
name, and the entry points start without JAX or torch.

The checker is tested first on a small package built to break each rule, so a clean result
on latentsel means something.
"""
import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# stage -> the stages it may import (besides itself and the root utilities). models/ and
# inference/ see arrays only; plots draw values they are given; the CLI may import anything.
ALLOWED = {
    "world": set(),
    "models": set(),
    "inference": {"models"},
    "traces": {"world", "models"},
    "policy": {"world", "traces"},
    "analysis": {"world", "traces", "models", "inference"},
    "plots": {"world", "traces", "policy"},
    "experiments": {"world", "traces", "models", "inference", "analysis", "plots", "policy"},
    "cli": {"world", "traces", "models", "inference", "analysis", "plots", "experiments", "policy"},
}
# the root: the package itself (the public names of DESIGN §8) and private helpers
ROOT_MODULES = {"latentsel", "latentsel._io", "latentsel._jax", "latentsel._compiled", "latentsel.__main__"}


def package_modules(roots: dict[str, Path]) -> dict[str, Path]:
    """``{dotted name: file}`` of every module under the ``{package: folder}`` roots."""
    out = {}
    for package, folder in roots.items():
        for path in folder.rglob("*.py"):
            parts = [p for p in path.relative_to(folder).with_suffix("").parts if p != "__init__"]
            out[".".join([package, *parts])] = path
    return out


def imports(modules: dict[str, Path], top: str) -> list[tuple[str, str, bool, bool]]:
    """``(importer, imported, local, explained)`` for every import of a module under ``top``:
    ``local`` inside a function, ``explained`` with a comment on its line, on the line above
    it or above the run of import lines it belongs to."""
    out = []
    for name, path in modules.items():
        text = path.read_text()
        lines = text.splitlines()
        tree = ast.parse(text)
        parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                targets = [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            targets = [t for t in targets if t == top or t.startswith(top + ".")]
            if not targets:
                continue
            parent, local = parents.get(node), False
            while parent is not None:
                local = local or isinstance(parent, (ast.FunctionDef, ast.AsyncFunctionDef))
                parent = parents.get(parent)
            i = node.lineno - 1
            while i > 0 and re.match(r"\s*(from \S+ )?import ", lines[i - 1]):
                i -= 1
            explained = "#" in lines[node.lineno - 1] or (i > 0 and lines[i - 1].strip().startswith("#"))
            for target in targets:
                while target not in modules and "." in target:
                    target = target.rpartition(".")[0]
                if target in modules and target != name:
                    out.append((name, target, local, explained))
    return out


def stage(name: str, top: str) -> str | None:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in ALLOWED else None


def violations(modules: dict[str, Path], top: str) -> dict[str, list]:
    """The rules' violations: upward imports, circles and unexplained function-local imports."""
    edges = imports(modules, top)
    upward = [(a, b) for a, b, _, _ in edges
              if b not in ROOT_MODULES and stage(a, top) and stage(b, top) != stage(a, top)
              and stage(b, top) not in ALLOWED[stage(a, top)]]
    unexplained = [(a, b) for a, b, local, explained in edges
                   if local and not explained and stage(a, top) != "cli"]
    graph = {m: set() for m in modules}
    for a, b, _, _ in edges:
        graph[a].add(b)
    return {"upward": upward, "circles": circles(graph), "unexplained": unexplained}


def circles(graph: dict[str, set]) -> list[set]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(component)

    for v in graph:
        if v not in index:
            visit(v)
    return out


def latentsel_modules():
    return package_modules({"latentsel": ROOT / "latentsel", "latentsel.models": ROOT / "models",
                            "latentsel.inference": ROOT / "inference"})


def test_the_checker_finds_each_planted_violation(tmp_path):
    pkg = tmp_path / "pkg"
    for folder in ("world", "traces", "analysis"):
        (pkg / folder).mkdir(parents=True)
        (pkg / folder / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "world" / "types.py").write_text("from pkg.analysis.fit import f\n")  # upward
    (pkg / "analysis" / "fit.py").write_text("from pkg.traces.io import g\n\ndef f():\n    from pkg.world import types\n")
    (pkg / "traces" / "io.py").write_text("def g():\n    # a reason\n    from pkg.analysis import fit\n")
    (pkg / "traces" / "ok.py").write_text("from pkg.world import types\n")
    found = violations(package_modules({"pkg": pkg}), "pkg")
    assert set(found["upward"]) == {("pkg.world.types", "pkg.analysis.fit"), ("pkg.traces.io", "pkg.analysis.fit")}
    assert found["circles"] == [{"pkg.world.types", "pkg.analysis.fit", "pkg.traces.io"}]
    assert found["unexplained"] == [("pkg.analysis.fit", "pkg.world.types")]


def test_imports_follow_the_stages_without_circles():
    found = violations(latentsel_modules(), "latentsel")
    assert found["upward"] == []
    assert found["circles"] == []


def test_every_function_local_import_says_why():
    assert violations(latentsel_modules(), "latentsel")["unexplained"] == []


def test_no_layer_branches_on_a_model_name():
    """What differs between models is read from the registry (models/registry.py)."""
    pattern = re.compile(r"""\bmodel\s*(==|!=)\s*["']|["']\s*(==|!=)\s*model\b|\bmodel\s+(not\s+)?in\s*\(\s*["']""")
    found = [f"{path.relative_to(ROOT)}:{i}" for path in latentsel_modules().values()
             for i, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]
    assert found == []


@pytest.mark.parametrize("module", ["latentsel", "latentsel.cli", "latentsel.analysis.options",
                                    "latentsel.experiments.designs", "latentsel.models.registry",
                                    "latentsel.traces", "latentsel.world"])
def test_entry_points_start_without_jax_or_torch(module):
    code = (f"import sys, {module}; heavy = [m for m in ('jax', 'torch', 'numpyro', 'pyro', 'arviz') "
            "if m in sys.modules]; assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
