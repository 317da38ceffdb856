"""The package's layout is its architecture: layers as subpackages, imports that only go down, no
import circle, no Lightning below the glue, test fixtures out of the core (README "Layout")."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "lightning_repa"
TESTS = Path(__file__).resolve().parent

# Layer of each top-level part; a module may import its own part and the parts of lower layers.
LAYERS = {
    "choices": 0,
    "maths": 1,
    "objectives": 2, "models": 2,
    "config": 3,
    "teachers": 4,
    "alignment": 5,
    "callbacks": 6, "diagnostics": 6,
    "simpletuner": 7, "demo": 7,
    "apps": 8,
}
PUBLIC_PATHS = {"losses", "align", "schedule", "encoders"}  # SPEC section 2: re-exports, imported by no module of ours
OUTSIDE = {"testing", "conf"}  # fixtures and configs: nothing below the apps imports them
PURE = {part for part, layer in LAYERS.items() if layer <= LAYERS["alignment"]} | {"diagnostics"} | PUBLIC_PATHS


def _modules() -> dict[str, Path]:
    """Every module of the package by dotted name (packages by their own name)."""
    found = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """The package's modules that `name` imports anywhere in its file (also inside functions)."""
    out = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
        else:
            continue
        out |= {t for t in targets if t in MODULES and t != name}
    return out


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _part(name: str) -> str:
    part = name.split(".")[1] if "." in name else ""
    return "simpletuner" if part == "simpletuner_keys" else part  # the importer's key tables


def test_no_import_circle():
    """Tarjan's strongly connected components of the static import graph (function-level imports too)."""
    index, low, stack, on_stack, circles = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH[v]:
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
                circles.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    assert circles == []


def test_imports_only_go_down_the_layers():
    wrong = []
    for name, targets in GRAPH.items():
        part = _part(name)
        if part not in LAYERS:
            continue
        for target in targets:
            other = _part(target)
            if target == "lightning_repa" or other == part:
                continue  # the package root (its version, lazy names) and the own part
            if other in PUBLIC_PATHS or other in OUTSIDE - ({"testing"} if part == "demo" else set()):
                wrong.append(f"{name} -> {target}")
            elif other in LAYERS and LAYERS[other] >= LAYERS[part] and part != "apps":
                wrong.append(f"{name} -> {target}")
    assert wrong == []


def test_every_part_of_the_package_is_placed_in_a_layer():
    parts = {_part(name) for name in MODULES} - {""}
    assert parts <= set(LAYERS) | PUBLIC_PATHS | OUTSIDE, parts - set(LAYERS) - PUBLIC_PATHS - OUTSIDE


def test_few_top_level_modules_and_layer_subpackages():
    top = sorted(p.stem for p in ROOT.glob("*.py") if p.name != "__init__.py")
    packages = sorted(p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file())
    assert len(top) <= 10, top
    assert len(set(packages) - {"demo", "conf"}) >= 4, packages
    assert not [t for t in top if t.startswith("tiny")], "test fixtures live in lightning_repa.testing"


def test_the_layers_below_the_glue_import_no_lightning():
    """Derived from the folders: every module of the pure layers, imported in a fresh interpreter."""
    pure = sorted(name for name in MODULES if _part(name) in PURE)
    assert {"lightning_repa.maths.losses", "lightning_repa.teachers.decoders", "lightning_repa.teachers.protocol",
            "lightning_repa.alignment.step", "lightning_repa.diagnostics.probe"} <= set(pure)
    code = ("import sys\n" + "".join(f"import {name}\n" for name in pure)
            + "print(sorted({m.split('.')[0] for m in sys.modules} & {'lightning', 'pytorch_lightning', "
            "'lightning_fabric'}))\n"
            + "from lightning_repa import RepaCallback, RepaConfig, FAMILIES\n"  # then the glue, in the same one
            + "print(RepaCallback.__name__, 'lightning' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == ["[]", "RepaCallback True"]


def test_the_callback_holds_lightning_hooks_only():
    path = ROOT / "callbacks" / "repa.py"
    source = path.read_text()
    assert len(source.splitlines()) <= 300
    assert not re.search(r"\bMethod\b", source), "the callback asks no method what it is"
    assert not re.search(r"\b[cui]-?repa\b|manifold|neighbour|frames_per_latent", source, re.IGNORECASE)


@pytest.mark.parametrize("path", sorted(TESTS.glob("*.py")), ids=lambda p: p.name)
def test_tests_read_no_private_attribute_of_the_callback(path):
    names = r"(?:repa|cb|callback|callbacks\[\d\]|repa_\w+|\w*_repa)"
    hits = re.findall(rf"\b{names}\._[a-z]\w*", path.read_text())
    assert hits == []
