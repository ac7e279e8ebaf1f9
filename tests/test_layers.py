"""The package's layering, read from its source: no import circle, imports only downward, no
function-local imports of the package (but in the command line, whose parser must not load
torch), no private name imported from another module.

Run alone with ``pytest tests/test_layers.py``; it reads the files, it imports nothing.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "stages_of_inference"

# the layers, bottom up: a module may import its own layer and the ones below it, never above
LAYERS = (
    ("_checks", "_tl", "batch", "precision", "backends", "self_check", "_utils", "_tables", "metrics", "models", "data", "results",
     "probes"),
    ("interventions", "lens", "tuned_lens", "jacobian_lens", "robustness"),
    ("stages",),
    ("plots",),
    ("study",),
    ("cli",),
)
# study/, bottom up (its package docstring lists them in this order)
STUDY_ORDER = ("options", "registry", "readings", "analyses", "config", "identity", "folder", "tasks", "html", "finish",
               "engine", "distributed", "sharded", "run")
# modules that may import the package inside a function: the command line builds its parser
# without torch and loads what a command needs when it runs
LAZY_ALLOWED = {"stages_of_inference.cli"}
# annotation-only back-references (under `if TYPE_CHECKING:`): the registry describes analyses in
# terms of the settings, which are validated against the registry
TYPING_ONLY = {("stages_of_inference.study.registry", "stages_of_inference.study.config"),
               ("stages_of_inference.study.analyses", "stages_of_inference.study.config"),
               # the lens names the tuned lens in its annotations; the tuned lens reads readouts through the lens
               ("stages_of_inference.lens", "stages_of_inference.tuned_lens")}


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = ("stages_of_inference", *path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _resolve(name: str) -> str:
    while name not in MODULES:
        name = name.rpartition(".")[0]
    return name


def _imports(path: Path) -> list[tuple[str, list[str], bool, bool]]:
    """Every import of the package in ``path``: (module, names, inside a function, under TYPE_CHECKING)."""
    found: list[tuple[str, list[str], bool, bool]] = []

    def visit(node: ast.AST, in_function: bool, typing_only: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                visit(child, True, typing_only)
            elif isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                visit(child, in_function, True)
            elif isinstance(child, ast.ImportFrom) and child.module and child.module.startswith("stages_of_inference"):
                found.append((child.module, [a.name for a in child.names], in_function, typing_only))
            elif isinstance(child, ast.Import):
                for alias in child.names:
                    if alias.name.startswith("stages_of_inference"):
                        found.append((alias.name, [], in_function, typing_only))
            else:
                visit(child, in_function, typing_only)

    visit(ast.parse(path.read_text()), False, False)
    return found


def _targets(module: str, names: list[str]) -> list[str]:
    """The package modules an import statement reaches (``from pkg import submodule`` included)."""
    out = []
    for name in names or [""]:
        full = f"{module}.{name}" if name else module
        out.append(full if full in MODULES else _resolve(module))
    return out


def _graph(typing_too: bool = False) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for module, path in MODULES.items():
        for target_module, names, _, typing_only in _imports(path):
            if typing_only and not typing_too:
                continue
            graph[module] |= {t for t in _targets(target_module, names) if t != module}
    return graph


def _layer(module: str) -> int:
    first = module.split(".")[1] if "." in module else ""
    for depth, layer in enumerate(LAYERS):
        if first in layer:
            return depth
    return -1  # the package root: its facade imports nothing at import time


def test_no_import_circle_anywhere() -> None:
    graph = _graph()
    seen: dict[str, int] = {}  # 1 on the current path, 2 done

    def walk(node: str, path: list[str]) -> None:
        seen[node] = 1
        for nxt in sorted(graph[node]):
            if seen.get(nxt) == 1:
                circle = path[path.index(nxt):] + [nxt]
                pytest.fail("import circle: " + " -> ".join(circle))
            if nxt not in seen:
                walk(nxt, [*path, nxt])
        seen[node] = 2

    for module in sorted(graph):
        if module not in seen:
            walk(module, [module])


def test_imports_point_down_the_layers() -> None:
    wrong = []
    for module, targets in _graph().items():
        for target in targets:
            if target == "stages_of_inference":  # the root (its __version__); its facade imports lazily
                continue
            if _layer(target) > _layer(module):
                wrong.append(f"{module} imports {target}")
    assert not wrong, "upward imports:\n" + "\n".join(sorted(wrong))


def test_backends_and_interventions_do_not_depend_on_each_other_both_ways() -> None:
    graph = _graph(typing_too=True)
    back = [f"{m} -> {t}" for m, ts in graph.items() if m.startswith("stages_of_inference.backends")
            for t in ts if t.startswith("stages_of_inference.interventions")]
    assert not back, "the backends import interventions: " + ", ".join(back)


def test_study_modules_import_in_their_documented_order() -> None:
    rank = {f"stages_of_inference.study.{name}": i for i, name in enumerate(STUDY_ORDER)}
    assert set(rank) | {"stages_of_inference.study"} == {m for m in MODULES if m.startswith("stages_of_inference.study")}
    wrong = []
    for module, path in MODULES.items():
        if module not in rank:
            continue
        for target_module, names, _, typing_only in _imports(path):
            for target in _targets(target_module, names):
                if target in rank and rank[target] >= rank[module] and target != module:
                    if not (typing_only and (module, target) in TYPING_ONLY):
                        wrong.append(f"{module} imports {target}")
    assert not wrong, "\n".join(wrong)


def test_no_function_local_imports_of_the_package() -> None:
    found = [f"{module}:{names}" for module, path in MODULES.items() if module not in LAZY_ALLOWED
             for target, names, in_function, _ in _imports(path) if in_function]
    assert not found, "function-local imports: " + ", ".join(found)


def test_no_private_name_is_imported_from_another_module() -> None:
    found = []
    for module, path in MODULES.items():
        for target, names, _, _ in _imports(path):
            found += [f"{module} imports {target}.{n}" for n in names if n.startswith("_") and n != "__version__"]
    assert not found, "\n".join(found)


def test_typing_only_imports_are_the_documented_ones() -> None:
    found = {(module, t) for module, path in MODULES.items() for target, names, _, typing_only in _imports(path)
             if typing_only for t in _targets(target, names)}
    assert found == TYPING_ONLY
