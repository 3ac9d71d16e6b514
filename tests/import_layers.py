"""A checker of ctxlab's import structure: every import between ctxlab modules, including those
inside functions, read from the source with ``ast`` (nothing is imported).

Two rules, both checked by ``tests/test_imports.py``:

* no cycle between modules;
* no import goes up the layer order, the numbered list under ``<!-- layer-order -->`` in
  ``docs/architecture.md`` (a module belongs to the longest entry that names it or its package;
  the entry ``ctxlab`` names only the package's ``__init__``). Imports within one layer are fine.

Imports under ``if TYPE_CHECKING:`` are annotations that never run, and are not edges.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the ctxlab modules it imports, for every ``.py`` file under ``root`` (the package dir)."""
    files = {module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    graph = {}
    for name, path in files.items():
        is_package = path.name == "__init__.py"
        graph[name] = {m for m in _imports(path, name, is_package, set(files)) if m != name}
    return graph


def _imports(path: Path, name: str, is_package: bool, modules: set[str]):
    tree = ast.parse(path.read_text(), filename=str(path))
    skip = {id(n) for node in ast.walk(tree) if _is_type_checking(node) for n in ast.walk(node)}
    package = name if is_package else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield from _known(alias.name, modules)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                yield from _known(sub if sub in modules else base, modules)


def _known(name: str, modules: set[str]):
    while name and name not in modules:  # `import ctxlab.nn.rope` names a module; a symbol's module otherwise
        name = name.rpartition(".")[0]
    if name:
        yield name


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and (
        (isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING")
        or (isinstance(node.test, ast.Attribute) and node.test.attr == "TYPE_CHECKING")
    )


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan), each as a sorted list."""
    index, low, on_stack, stack, out, counter = {}, {}, set(), [], [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def read_layers(markdown: str) -> list[list[str]]:
    """The numbered list after ``<!-- layer-order -->``: layer 1 first, each a list of module names."""
    text = markdown.split("<!-- layer-order -->", 1)[1]
    layers = []
    for line in text.splitlines():
        m = re.match(r"\s*\d+\.\s+(.*)", line)
        if m:
            layers.append(re.findall(r"`(ctxlab(?:\.[a-z_0-9]+)*)`", m.group(1)))
        elif layers and line.startswith(" ") and line.strip():  # an item continued on the next line
            layers[-1].extend(re.findall(r"`(ctxlab(?:\.[a-z_0-9]+)*)`", line))
        elif layers and line.strip() == "":
            break
    return layers


def layer_of(module: str, layers: list[list[str]]) -> int | None:
    best, best_len = None, -1
    for i, entries in enumerate(layers):
        for e in entries:
            matches = module == e if e == "ctxlab" else (module == e or module.startswith(e + "."))
            if matches and len(e) > best_len:
                best, best_len = i, len(e)
    return best


def upward_imports(graph: dict[str, set[str]], layers: list[list[str]]) -> list[str]:
    """Each import from a lower layer to a higher one, and each module no layer names."""
    problems = [f"{m}: in no layer of the layer order" for m in sorted(graph) if layer_of(m, layers) is None]
    for m in sorted(graph):
        lm = layer_of(m, layers)
        for dep in sorted(graph[m]):
            ld = layer_of(dep, layers)
            if lm is not None and ld is not None and ld > lm:
                problems.append(f"{m} (layer {lm + 1}) imports {dep} (layer {ld + 1})")
    return problems
