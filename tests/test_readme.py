"""The README's Python snippet runs as written, and the values its comments state are what it computes."""

from __future__ import annotations

import re
from pathlib import Path

import ctxlab

README = Path(__file__).resolve().parents[1] / "README.md"


def python_snippets() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


def test_the_library_snippet_runs_and_its_stated_values_hold(tmp_path, monkeypatch):
    (snippet,) = python_snippets()
    monkeypatch.chdir(tmp_path)  # it writes "out"
    scope: dict = {}
    checked = 0
    for line in snippet.splitlines():
        code, _, comment = line.partition("  # ")
        exec(code, scope)  # noqa: S102 (the README's own code)
        stated = re.match(r"\s*(\d+|'[^']*'|torch\.Size\(\[[\d, ]+\]\))", comment)
        if stated and code.strip() and "=" not in code.split("(")[0]:
            assert repr(eval(code, scope)) == stated.group(1), line
            checked += 1
    assert checked >= 4
    assert isinstance(scope["out"], type(scope["prompt_ids"])) and (tmp_path / "out" / "config.json").is_file()
    assert ctxlab.from_pretrained(tmp_path / "out").config.name  # the checkpoint it wrote loads back
