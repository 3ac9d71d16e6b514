"""Explicit tensor-name maps between our module names and a family's checkpoint names.

Most families store every tensor under our own (HF) name. Where a family's checkpoints use other
names (DeepSeek V4 keeps DeepSeek's: ``attn.wq_a`` for our ``self_attn.q_a_proj``), the family
declares a :class:`KeyMap`: one entry per module or tensor, ``"{}"`` standing for the layer index,
matched on whole dotted components (the longest entry wins) so ``.weight`` / ``.bias`` and
per-expert tensors under a mapped module follow it. The same table serves both directions, as
torchtitan's state-dict adapters do (``to_hf`` / ``from_hf``), and a name no entry covers keeps its
name.
"""

from __future__ import annotations

import re

from ..errors import InputError


class KeyMap:
    def __init__(self, ours_to_theirs: dict[str, str]):
        theirs = list(ours_to_theirs.values())
        duplicated = sorted({t for t in theirs if theirs.count(t) > 1})
        if duplicated:
            raise InputError(f"key map sends several of our names to {duplicated}: it must be one-to-one")
        self._forward = [(_pattern(o), t) for o, t in _longest_first(ours_to_theirs)]
        self._backward = [(_pattern(t), o) for t, o in _longest_first({t: o for o, t in ours_to_theirs.items()})]

    def to_checkpoint(self, name: str) -> str:
        """Our tensor name -> the checkpoint's."""
        return _apply(self._forward, name)

    def from_checkpoint(self, name: str) -> str:
        """The checkpoint's tensor name -> ours."""
        return _apply(self._backward, name)


def _longest_first(table: dict[str, str]) -> list[tuple[str, str]]:
    return sorted(table.items(), key=lambda kv: -len(kv[0]))


def _pattern(template: str) -> re.Pattern:
    """``a.{}.b`` -> a regex matching ``a.<int>.b`` followed by ``.`` or the end of the name."""
    return re.compile("^" + re.escape(template).replace(r"\{\}", r"(\d+)") + r"(?=\.|$)")


def _apply(rules: list[tuple[re.Pattern, str]], name: str) -> str:
    for pattern, target in rules:
        m = pattern.match(name)
        if m:
            return target.format(*m.groups()) + name[m.end() :]
    return name
