"""Dependencies point one way: no import cycle between ctxlab's modules, and no import up the
layer order written in docs/architecture.md (tests/import_layers.py reads both from the source)."""

from pathlib import Path

import pytest

import import_layers as il

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "ctxlab"
ARCHITECTURE = ROOT / "docs" / "architecture.md"


@pytest.fixture(scope="module")
def graph():
    return il.import_graph(PACKAGE)


def test_no_import_cycles(graph):
    assert il.cycles(graph) == []


def test_no_import_goes_up_the_layer_order(graph):
    layers = il.read_layers(ARCHITECTURE.read_text())
    assert len(layers) >= 5, "docs/architecture.md lost its <!-- layer-order --> list"
    assert il.upward_imports(graph, layers) == []


def test_the_graph_sees_imports_inside_functions(graph):
    # cli imports the plots only when --plot is given: a function-level import is still an edge
    assert "ctxlab.reporting.plots" in graph["ctxlab.cli"]


def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "pkg"
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_checker_finds_a_cycle_hidden_in_a_function(tmp_path):
    root = _package(
        tmp_path,
        {
            "__init__.py": "",
            "low.py": "def f():\n    from .high import g\n",
            "high.py": "from .low import f\n",
            "other.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .high import g\n",
        },
    )
    graph = il.import_graph(root)
    assert il.cycles(graph) == [["pkg.high", "pkg.low"]]
    assert graph["pkg.other"] == set()  # annotation-only imports are not edges


def test_checker_finds_an_upward_import_and_an_unplaced_module(tmp_path):
    root = _package(
        tmp_path,
        {
            "__init__.py": "from . import low, high\n",
            "low.py": "from .high import thing\n",
            "high.py": "thing = 1\n",
            "stray.py": "",
        },
    )
    doc = "<!-- layer-order -->\n1. `pkg.low`\n2. `pkg.high`\n3. `pkg` (the package)\n"
    layers = il.read_layers(doc.replace("pkg", "ctxlab"))
    graph = {
        k.replace("pkg", "ctxlab"): {v.replace("pkg", "ctxlab") for v in vs} for k, vs in il.import_graph(root).items()
    }
    assert il.upward_imports(graph, layers) == [
        "ctxlab.stray: in no layer of the layer order",
        "ctxlab.low (layer 1) imports ctxlab.high (layer 2)",
    ]
