"""How our tensors are laid out in a family's published checkpoints.

Most tensors are stored under our own name. Some families publish MoE experts one tensor per
expert and projection (``mlp.experts.{e}.gate_proj.weight``, Qwen2-MoE style, which transformers
also writes back on save) while we keep them stacked ([E, 2·I, H] gate-then-up, [E, H, I]), and
some rename submodules (DeepSeek V4 uses DeepSeek's own names). A family declares ``KEY_MAP``
(a :class:`~ctxlab.families.keymap.KeyMap`, our names <-> checkpoint names), ``EXPERTS_PER_TENSOR``
and, when its per-expert names differ, ``EXPERT_NAMES`` (gate, up, down); :func:`sources` turns
that into, for each of our tensors, the checkpoint tensors it is made of and how to combine /
split them; :func:`for_checkpoint` reads a file written under our own names (transformers' internal layout)
as it is.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CheckpointError


@dataclass
class Source:
    """The checkpoint tensors (names, shapes) one of our tensors is made of."""

    names: list[str]
    shapes: list[tuple[int, ...]]
    combine: Callable[[list[torch.Tensor]], torch.Tensor] = lambda ts: ts[0]
    split: Callable[[torch.Tensor], list[torch.Tensor]] = lambda t: [t]


def checkpoint_name(family, name: str) -> str:
    """One of our tensor names as the family's checkpoints name it (its ``KEY_MAP``; DeepSeek V4's ``head.weight``)."""
    key_map = getattr(family, "KEY_MAP", None)
    return key_map.to_checkpoint(name) if key_map else name


def sources(ours: dict[str, tuple[int, ...]], family) -> dict[str, Source]:
    """Our tensor name -> its :class:`Source` in the family's checkpoint layout."""
    per_expert = getattr(family, "EXPERTS_PER_TENSOR", False)
    names = getattr(family, "EXPERT_NAMES", ("gate_proj", "up_proj", "down_proj"))

    def theirs(name: str) -> str:
        return checkpoint_name(family, name)

    out = {}
    for name, shape in ours.items():
        if per_expert and name.endswith(".experts.gate_up_proj"):
            out[name] = _gate_up(theirs(name.removesuffix(".gate_up_proj")) + ".", shape, names)
        elif per_expert and name.endswith(".experts.down_proj"):
            out[name] = _down(theirs(name.removesuffix(".down_proj")) + ".", shape, names)
        else:
            out[name] = Source([theirs(name)], [shape])
    return out


def for_checkpoint(ours: dict[str, tuple[int, ...]], family, stored: set[str]) -> dict[str, Source]:
    """:func:`sources` in the family's layout, or in ours where the checkpoint holds every tensor under our own
    name and not the family's: transformers' ``save_pretrained(save_original_format=False)`` writes its modules'
    names with experts stacked, which are ours."""
    plan = sources(ours, family)
    in_family_layout = {n for src in plan.values() for n in src.names} <= stored
    return plan if in_family_layout or not set(ours) <= stored else sources(ours, None)


def _gate_up(prefix: str, shape: tuple[int, ...], expert_names: tuple[str, str, str]) -> Source:
    experts, two_i, hidden = shape
    i = two_i // 2
    names = [f"{prefix}{e}.{p}.weight" for p in expert_names[:2] for e in range(experts)]
    return Source(
        names,
        [(i, hidden)] * len(names),
        combine=lambda ts: torch.cat((torch.stack(ts[:experts]), torch.stack(ts[experts:])), dim=1),
        split=lambda t: [t[e, :i] for e in range(experts)] + [t[e, i:] for e in range(experts)],
    )


def _down(prefix: str, shape: tuple[int, ...], expert_names: tuple[str, str, str]) -> Source:
    experts, hidden, i = shape
    return Source(
        [f"{prefix}{e}.{expert_names[2]}.weight" for e in range(experts)],
        [(hidden, i)] * experts,
        combine=torch.stack,
        split=lambda t: list(t.unbind(0)),
    )


def abbreviate(items: list[str], keep: int = 4) -> str:
    return ", ".join(items[:keep]) + (f", ... ({len(items) - keep} more)" if len(items) > keep else "")


def check_tensor_names(
    expected: dict[str, tuple], found: dict[str, tuple], where: Path | str, not_floating: list[str] = ()
) -> None:
    """One error naming every missing, unexpected and mis-shaped tensor, and those of ``not_floating`` (stored as
    integers where the model has floating-point weights)."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    misshaped = sorted(
        f"{n}: checkpoint {list(found[n])}, model {list(expected[n])}"
        for n in set(expected) & set(found)
        if tuple(found[n]) != tuple(expected[n])
    )
    if not (missing or unexpected or misshaped or not_floating):
        return
    parts = [f"checkpoint {where} does not match the model its config.json describes:"]
    problems = (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshaped))
    for title, items in (*problems, ("stored as integers, not floating point", list(not_floating))):
        if items:
            parts.append(f"  {title} ({len(items)}):")
            parts.extend(f"    {item}" for item in items)
    raise CheckpointError("\n".join(parts))
