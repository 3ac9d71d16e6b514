"""One registry per kind of mechanism: the names a :class:`~ctxlab.config.LayerSpec` or
:class:`~ctxlab.config.ModelConfig` may use, each mapped to the class that implements it.

A kind registers itself where it is defined (``@ATTENTION_KINDS.register("gqa")`` above the
class), and the class answers for itself: how to build it, what it caches, how many parameters
and FLOPs it costs, and which of its spec fields are valid (``validate``). Nothing else keeps a
list of names, so adding a kind is one module and one decorator line.

This module sits at the bottom of the layer order (it imports nothing from ctxlab), so the
config's validation can read the registries while the kinds, higher up, fill them. Importing any
part of ctxlab imports the package, whose ``__init__`` imports every kind, so the registries are
complete before a config is validated.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any


class Registry:
    """Named kinds of one mechanism (``what`` says which, for error messages)."""

    def __init__(self, what: str):
        self.what = what
        self._kinds: dict[str, Any] = {}

    def register(self, name: str) -> Callable[[Any], Any]:
        """Class decorator: ``@REGISTRY.register("name")``."""

        def add(kind: Any) -> Any:
            if name in self._kinds:
                raise ValueError(f"{self.what} {name!r} is registered twice ({self._kinds[name]!r} and {kind!r})")
            self._kinds[name] = kind
            return kind

        return add

    def __getitem__(self, name: str) -> Any:
        try:
            return self._kinds[name]
        except (KeyError, TypeError):
            raise KeyError(f"unknown {self.what} {name!r}; allowed: {self.names()}") from None

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self._kinds

    def __iter__(self) -> Iterator[str]:
        return iter(self._kinds)

    def __len__(self) -> int:
        return len(self._kinds)

    def names(self) -> list[str]:
        return list(self._kinds)

    def items(self):
        return self._kinds.items()

    def values(self):
        return self._kinds.values()

    def __repr__(self) -> str:
        return f"Registry({self.what!r}: {self.names()})"


ATTENTION_KINDS = Registry("attention kind")  # attention/*.py: cache_spec, param_count, decode_flops, validate
MLP_KINDS = Registry("MLP kind")  # nn/mlp.py, nn/moe.py: from_spec, param_count, flops_per_token, validate
ROUTERS = Registry("router")  # nn/moe.py: from_spec, param_count, flops_per_token, validate
RESIDUAL_KINDS = Registry("residual kind")  # nn/residual.py: streams, expand, collapse, param and FLOP counts
BLOCK_KINDS = Registry("block kind")  # blocks.py: how a layer wires attention, MLP and residual
ROPE_TYPES = Registry("rope type")  # nn/rope.py: inverse frequencies and attention scaling of each type
ACTIVATIONS = Registry("activation")  # nn/mlp.py: elementwise functions by HF name
# Checks of mechanisms that are not kinds: name -> function, run on every layer / config.
LAYER_CHECKS = Registry("layer check")  # (at, layer_index, LayerSpec, ModelConfig) -> problems
MODEL_CHECKS = Registry("model check")  # (ModelConfig) -> problems
