"""The decoder: embeddings -> blocks -> final norm -> head (optional logit softcap).

Module and parameter names follow HF checkpoints (``model.layers.3.self_attn.q_proj.weight``),
so loading is a strict ``load_state_dict``. Every layer is built from its own
:class:`~ctxlab.config.LayerSpec`; nothing here branches on the model's name.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from . import (
    blocks,  # noqa: F401  (registers the block kinds)
    init,
)
from .attention.context import ForwardContext
from .cache import Cache
from .config import ModelConfig
from .dtypes import dtype_name, resolve_dtype
from .errors import InputError
from .init import fp32_tensors, initialise
from .io.writer import save_pretrained as save_checkpoint
from .nn import ple
from .nn.norms import RMSNorm
from .planner import new_cache
from .registry import BLOCK_KINDS, RESIDUAL_KINDS


class DecoderStack(nn.Module):
    """``model.*`` of an HF checkpoint: token embedding (+ PLE tables), blocks, final norm."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(BLOCK_KINDS[spec.block](cfg, spec, i) for i, spec in enumerate(cfg.layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        if cfg.per_layer_input_size:
            for name, module in ple.stack_modules(cfg).items():
                self.add_module(name, module)
        self.residual = RESIDUAL_KINDS[cfg.residual]  # plain, or several streams (mHC)
        for name, module in self.residual.stack_modules(cfg).items():  # e.g. mHC's hc_head
            self.add_module(name, module)
        if cfg.input_affine:  # HF names: ZayaModel.input_hidden_states_{scale,bias}
            self.input_hidden_states_scale = nn.Parameter(torch.ones(cfg.hidden_size))
            self.input_hidden_states_bias = nn.Parameter(torch.zeros(cfg.hidden_size))

    def reset_parameters(self, generator: torch.Generator | None = None, std: float = 0.02) -> None:
        """The embedding affine: unit scale, bias drawn normal(0, std) as ctxlab always has."""
        self.input_hidden_states_scale.fill_(1.0)
        init.normal_(self.input_hidden_states_bias, generator, std)

    def embed(self, ids: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """ids [B, T] -> embeddings [B, T, H]; fills ``ctx.per_layer_inputs`` for PLE models."""
        x = self.embed_tokens(ids)
        if self.config.embedding_scale is not None:  # rounded to the weight dtype, as HF does
            x = x * torch.tensor(self.config.embedding_scale, dtype=self.embed_tokens.weight.dtype)
        if self.config.per_layer_input_size:
            ctx.per_layer_inputs = ple.per_layer_inputs(self, ids, x, self.config)
        if self.config.input_affine:
            x = (x + self.input_hidden_states_bias) * self.input_hidden_states_scale
        x = self.residual.expand(x, self.config)  # [B, T, H] or streams [B, T, n, H]
        return x.float() if self.config.residual_fp32 else x

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        x = self.residual.collapse(self, x)
        return self.norm(x.to(self.norm.weight.dtype))


class CausalLM(nn.Module):
    """A decoder-only language model built from a :class:`ModelConfig`.

    ``model(ids)`` is a full causal forward; ``model(ids, cache=c)`` treats ``ids`` as the
    next tokens after what ``c`` holds, appends them and returns their logits.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = DecoderStack(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        if cfg.norm_unit_offset or cfg.norm_weight_float32:  # Gemma 1-3: (1 + w); Gemma 4: w, in float32
            for module in self.modules():
                if isinstance(module, RMSNorm) and module.weight is not None:
                    module.unit_offset, module.weight_float32 = cfg.norm_unit_offset, cfg.norm_weight_float32
        self._kv_sources = frozenset(s.kv_source for s in cfg.layers if s.kv_source is not None)
        # Layers from here on only read K/V shared by earlier layers (Gemma 4's last KV-sharing layers):
        # they write nothing other positions read, so ``last_only`` runs them on the last token alone.
        producers = [i for i, s in enumerate(cfg.layers) if s.kv_source is None]
        self._readers_from = producers[-1] + 1 if producers else 0

    def _apply(self, fn, recurse: bool = True):
        """Every cast (``to``, ``to_empty``, ``bfloat16()``, ...) as torch does it, except that tensors a
        module declares in ``keep_in_fp32`` keep their dtype (they still move between devices)."""
        kept = [(module, name, getattr(module, name).detach()) for module, name in fp32_tensors(self)]
        super()._apply(fn, recurse)
        for module, name, before in kept:
            after = getattr(module, name)
            if after.dtype != before.dtype:
                restored = before.to(device=after.device)
                if isinstance(after, nn.Parameter):
                    after.data = restored
                else:
                    setattr(module, name, restored)
        return self

    @property
    def dtype(self) -> torch.dtype:  # the final norm's: the LM head may be quantized (ctxlab.quant)
        return self.model.norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.norm.weight.device

    def forward(
        self,
        input_ids: torch.Tensor,
        cache: Cache | None = None,
        last_only: bool = False,
        check_ids: bool = True,
    ) -> torch.Tensor:
        """input_ids [B, T] -> logits [B, T, vocab] (or [B, 1, vocab] with ``last_only``).

        ``check_ids=False`` skips the range check of the ids, which reads them back from the device
        (a host sync): generation checks the prompt once and then feeds it only sampled ids."""
        ids = self._check_ids(input_ids) if check_ids else input_ids
        B, T = ids.shape
        if cache is None:
            positions = torch.arange(T, device=ids.device).expand(B, T)
        else:
            positions = cache.reserve(T, B)
        ctx = ForwardContext(positions=positions, cache=cache, sources=self._kv_sources, input_ids=ids)
        x = self.model.embed(ids, ctx)  # [B, T, H]
        for i, block in enumerate(self.model.layers):
            if last_only and i == self._readers_from and T > 1:  # as HF Gemma 4 with logits_to_keep=1
                x, ctx = x[:, -1:], ctx.last_token()
            x = block(x, ctx)
        if cache is not None:
            cache.advance(T)
        if last_only:
            x = x[:, -1:]
        return self._head(self.model.final_norm(x))

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(x)
        cap = self.config.final_logit_softcap
        return logits if cap is None else cap * torch.tanh(logits / cap)

    def _check_ids(self, ids: torch.Tensor) -> torch.Tensor:
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype not in (torch.long, torch.int):
            got = f"{type(ids).__name__} {getattr(ids, 'dtype', '')} {tuple(getattr(ids, 'shape', ()))}"
            raise InputError(f"input_ids must be an integer tensor of shape [batch, tokens]; got {got}")
        if ids.shape[1] == 0:
            raise InputError("input_ids has no tokens (shape [B, 0])")
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= self.config.vocab_size:
            raise InputError(f"token ids must be in [0, {self.config.vocab_size}); got ids in [{lo}, {hi}]")
        return ids.long()

    def new_cache(self, batch_size: int = 1, max_tokens: int = 4096) -> Cache:
        """Allocate every layer's cache up front, in the model's dtype and device, with the RoPE
        tables of every position it can hold."""
        cache = new_cache(self.config, batch_size, max_tokens, self.dtype, self.device)
        rotaries = [m.self_attn.rotary for m in self.model.layers if hasattr(m.self_attn, "rotary")]
        cache.precompute_rope(rotaries, self.dtype)
        return cache

    def save_pretrained(self, directory: str | Path, max_shard_bytes: int | None = None) -> None:
        """Write ``config.json`` + safetensors in the HF layout (transformers loads it back)."""
        save_checkpoint(self, directory, max_shard_bytes=max_shard_bytes)


def build_model(
    cfg: ModelConfig,
    dtype: torch.dtype | str = torch.float32,
    seed: int | None = 0,
    device=None,
    init_std: float = 0.02,
) -> CausalLM:
    """A randomly initialised model (normal(0, init_std) weights, unit norms) of ``cfg``.

    Norm weights start at 1, or at 0 when ``cfg.norm_unit_offset`` (the norm adds the 1). Built on the meta device, allocated once in ``dtype`` (tensors declared ``keep_in_fp32`` stay
    float32) and initialised module by module (:func:`ctxlab.init.initialise`), so the peak memory
    is the weights in ``dtype``, never a float32 copy. ``dtype``: a torch dtype or its name
    (float32, bfloat16, float16). The same seed gives the same weights in every dtype (bfloat16
    values are the float32 ones rounded).
    """
    dtype = resolve_dtype(dtype)
    check_dtype(cfg, dtype)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    with torch.device("meta"):
        model = CausalLM(cfg)
    model.to(dtype=dtype).to_empty(device="cpu")
    if cfg.tie_word_embeddings:  # to_empty gives each module its own tensor; tie them again
        model.lm_head.weight = model.model.embed_tokens.weight
    initialise(model, generator, init_std)
    return model.to(device=device).eval() if device is not None else model.eval()


def check_dtype(cfg: ModelConfig, dtype: torch.dtype) -> None:
    """Refuse float16 for configs that overflow in it (Gemma: large norms and activations)."""
    if dtype == torch.float16 and not cfg.float16_ok:
        raise InputError(
            f"{cfg.name or cfg.family}: float16 is refused for {cfg.family} models (activations overflow "
            f"float16's range, HF transformers #36822); use bfloat16 or float32 (got {dtype_name(dtype)})"
        )
