"""The decoder: embeddings -> blocks -> final norm -> head (optional logit softcap).

Module and parameter names follow HF checkpoints (``model.layers.3.self_attn.q_proj.weight``),
so loading is a strict ``load_state_dict``. Every layer is built from its own
:class:`~ctxlab.config.LayerSpec`; nothing here branches on the model's name.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from . import cache as cache_lib
from .attention.context import ForwardContext
from .blocks import BLOCK_KINDS
from .config import ModelConfig
from .nn import ple
from .nn.norms import RMSNorm
from .nn.residual import HyperHead


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
        if cfg.residual == "mhc":  # collapses the residual streams before the final norm
            self.hc_head = HyperHead(cfg.hidden_size, cfg.hc_mult, cfg.hc_eps, cfg.norm_eps)
        if cfg.input_affine:  # HF names: ZayaModel.input_hidden_states_{scale,bias}
            self.input_hidden_states_scale = nn.Parameter(torch.ones(cfg.hidden_size))
            self.input_hidden_states_bias = nn.Parameter(torch.zeros(cfg.hidden_size))

    def embed(self, ids: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """ids [B, T] -> embeddings [B, T, H]; fills ``ctx.per_layer_inputs`` for PLE models."""
        x = self.embed_tokens(ids)
        if self.config.embedding_scale is not None:  # rounded to the weight dtype, as HF does
            x = x * torch.tensor(self.config.embedding_scale, dtype=self.embed_tokens.weight.dtype)
        if self.config.per_layer_input_size:
            ctx.per_layer_inputs = ple.per_layer_inputs(self, ids, x, self.config)
        if self.config.input_affine:
            x = (x + self.input_hidden_states_bias) * self.input_hidden_states_scale
        if self.config.residual == "mhc":  # n identical streams [B, T, n, H]
            x = x[:, :, None].expand(-1, -1, self.config.hc_mult, -1).contiguous()
        return x.float() if self.config.residual_fp32 else x

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        if self.config.residual == "mhc":
            x = self.hc_head(x)
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
        self._kv_sources = frozenset(s.kv_source for s in cfg.layers if s.kv_source is not None)

    @property
    def dtype(self) -> torch.dtype:  # the final norm's: the LM head may be quantized (ctxlab.quant)
        return self.model.norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.norm.weight.device

    def forward(
        self,
        input_ids: torch.Tensor,
        cache: cache_lib.Cache | None = None,
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
        for block in self.model.layers:
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
            raise ValueError(f"input_ids must be an integer tensor of shape [batch, tokens]; got {got}")
        if ids.shape[1] == 0:
            raise ValueError("input_ids has no tokens (shape [B, 0])")
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= self.config.vocab_size:
            raise ValueError(f"token ids must be in [0, {self.config.vocab_size}); got ids in [{lo}, {hi}]")
        return ids.long()

    def new_cache(self, batch_size: int = 1, max_tokens: int = 4096) -> cache_lib.Cache:
        """Allocate every layer's cache up front, in the model's dtype and device, with the RoPE
        tables of every position it can hold."""
        cache = cache_lib.allocate(self.config, batch_size, max_tokens, self.dtype, self.device)
        rotaries = [m.self_attn.rotary for m in self.model.layers if hasattr(m.self_attn, "rotary")]
        cache.precompute_rope(rotaries, self.dtype)
        return cache

    def save_pretrained(self, directory: str | Path, max_shard_bytes: int | None = None) -> None:
        """Write ``config.json`` + safetensors in the HF layout (transformers loads it back)."""
        from .io.checkpoint import save_pretrained

        save_pretrained(self, directory, max_shard_bytes=max_shard_bytes)


def build_model(
    cfg: ModelConfig, dtype: torch.dtype = torch.float32, seed: int | None = 0, device=None, init_std: float = 0.02
) -> CausalLM:
    """A randomly initialised model (normal(0, init_std) weights, unit norms) of ``cfg``."""
    check_dtype(cfg, dtype)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    model = CausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", ".scale", "per_expert_scale", "_scale")) or "layernorm" in name:
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                p.normal_(0.0, init_std, generator=generator)
        for name, b in model.named_buffers():
            if name.endswith("tid2eid"):  # hash routing: distinct random experts per token id
                experts = model.get_submodule(name.rsplit(".", 2)[0]).experts.gate_up_proj.shape[0]
                b.copy_(torch.rand(b.shape[0], experts, generator=generator).argsort(-1)[:, : b.shape[1]])
    return model.to(dtype=dtype, device=device).eval()


def check_dtype(cfg: ModelConfig, dtype: torch.dtype) -> None:
    """Refuse float16 for configs that overflow in it (Gemma: large norms and activations)."""
    if dtype == torch.float16 and not cfg.float16_ok:
        raise ValueError(
            f"{cfg.name or cfg.family}: float16 is refused for {cfg.family} models (activations overflow "
            "float16's range, HF transformers #36822); use torch.bfloat16 or torch.float32"
        )
