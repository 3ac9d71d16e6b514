"""Random initialisation by module, and parameters declared float32 whatever the model's dtype.

Every module that owns parameters initialises them itself, in ``reset_parameters(generator, std)``
(normal(0, std) weights, unit norms and scales, zero biases); torch's own leaf modules (Linear,
Embedding, Conv1d, LayerNorm) get the same rule from :data:`BUILTIN_INIT`. A module that owns
buffers fills them in ``reset_buffers(generator)``. :func:`initialise` walks the modules in
``named_parameters`` order and draws every random buffer after every parameter, so a seed gives
the same parameters as drawing them one by one in that order (what ``build_model`` did before).

``keep_in_fp32`` (a class attribute: names of the module's own parameters / buffers) marks
tensors that stay float32 when the model is cast to bfloat16 or float16: routing biases, which
decide expert choices by small differences (transformers' ``_keep_in_fp32_modules_strict``).
:func:`fp32_tensors` lists them; ``CausalLM._apply`` honours them in every cast.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import nn

from . import progress

DRAW_CHUNK = 1 << 26  # elements drawn per call: a 256 MB float32 buffer at most


def normal_(t: torch.Tensor, generator: torch.Generator | None, std: float) -> None:
    """normal(0, std) into t, drawn in float32 whatever t's dtype, so one seed gives the same weights in every
    dtype (bfloat16 ones are the float32 ones rounded): PyTorch's sampler takes another path for bfloat16 on
    sizes that are not a multiple of 16, and the generator's stream then differs for every later tensor. Drawn
    ``DRAW_CHUNK`` elements at a time, so a low-precision model never holds a float32 copy of a large weight."""
    flat = t.view(-1)  # parameters and buffers are contiguous
    for start in range(0, flat.numel(), DRAW_CHUNK):
        part = flat[start : start + DRAW_CHUNK]
        if part.dtype == torch.float32:
            part.normal_(0.0, std, generator=generator)
        else:
            part.copy_(torch.empty(part.shape, dtype=torch.float32).normal_(0.0, std, generator=generator))


def _weight_and_bias(module: nn.Module, generator: torch.Generator | None, std: float) -> None:
    """Linear, Conv1d, Embedding: normal weight, zero bias."""
    normal_(module.weight, generator, std)
    if getattr(module, "bias", None) is not None:
        module.bias.zero_()


def _norm(module: nn.Module, generator: torch.Generator | None, std: float) -> None:
    """LayerNorm: unit weight, zero bias."""
    if module.weight is not None:
        module.weight.fill_(1.0)
    if module.bias is not None:
        module.bias.zero_()


BUILTIN_INIT: dict[type, Callable[[nn.Module, torch.Generator | None, float], None]] = {
    nn.Linear: _weight_and_bias,
    nn.Conv1d: _weight_and_bias,
    nn.Embedding: _weight_and_bias,
    nn.LayerNorm: _norm,
}


@torch.no_grad()
def initialise(model: nn.Module, generator: torch.Generator | None = None, std: float = 0.02) -> None:
    """Initialise every parameter (then every buffer) of ``model``, module by module.

    A module whose parameters are all shared with an earlier module (a tied LM head) is skipped.
    A module that owns parameters or buffers and cannot initialise them is a bug: TypeError.
    """
    seen: set[int] = set()
    owners = []
    for name, module in model.named_modules():
        own = [p for p in module.parameters(recurse=False)]
        if own and all(id(p) in seen for p in own):
            continue  # tied to an already initialised module
        seen.update(id(p) for p in own)
        if own:
            reset = BUILTIN_INIT.get(type(module)) or _method(module, "reset_parameters", name)
            reset(module, generator, std) if type(module) in BUILTIN_INIT else reset(generator, std)
            progress.advance(sum(p.numel() * p.element_size() for p in own))
        if any(True for _ in module.buffers(recurse=False)):
            owners.append((name, module))
    for name, module in owners:
        _method(module, "reset_buffers", name)(generator)


def _method(module: nn.Module, method: str, name: str):
    fn = getattr(module, method, None)
    if fn is None:
        raise TypeError(f"{name or 'model'} ({type(module).__name__}) owns tensors but has no {method}()")
    return fn


def fp32_tensors(model: nn.Module) -> Iterator[tuple[nn.Module, str]]:
    """(module, tensor name) of every tensor a module declares float32 in ``keep_in_fp32``."""
    for module in model.modules():
        for name in getattr(type(module), "keep_in_fp32", ()):
            if getattr(module, name, None) is not None:
                yield module, name
