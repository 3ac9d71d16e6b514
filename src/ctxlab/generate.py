"""Text generation: chunked prefill into a pre-allocated cache, then a one-token decode loop.

``prefill`` / ``decode_step`` / ``sample`` are small functions in the gpt-fast manner;
``stream`` yields each step's tokens, ``generate`` collects them. Prompts of different
lengths are left-padded; padding gets negative positions, so no real token attends to it and
every row's positions start at 0, exactly as if each prompt ran alone.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch

from .cache import Cache
from .errors import InputError
from .model import CausalLM
from .nn.packing import uncompilable_packed

Prompts = torch.Tensor | Sequence[Sequence[int]]


def sample(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next tokens [B] from logits [B, V]: greedy at temperature 0, else top-k / nucleus sampling."""
    if not 0 <= temperature < math.inf:  # also refuses nan
        raise InputError(f"temperature = {temperature}: must be a finite number >= 0 (0 = greedy)")
    if top_k is not None and top_k <= 0:
        raise InputError(f"top_k = {top_k}: must be a positive integer or None")
    if top_p is not None and not 0 < top_p <= 1:
        raise InputError(f"top_p = {top_p}: must be in (0, 1] or None")
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # [B, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs  # mass of strictly more likely tokens
        sorted_logits = sorted_logits.masked_fill(before >= top_p, float("-inf"))  # the top token always stays
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def sampling_generator(seed: int | None, device) -> torch.Generator | None:
    """A generator seeded with ``seed`` on ``device`` (None: no seed, sampling is not reproducible)."""
    if seed is None:
        return None
    if not isinstance(seed, int) or not -(1 << 63) <= seed < 1 << 64:
        raise InputError(f"seed = {seed!r}: must be an integer in [-2^63, 2^64) or None")
    return torch.Generator(device=device).manual_seed(seed)


def left_pad(prompts: Prompts, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [B, T_max] left-padded, pad [B]) from a tensor or a list of token-id lists."""
    if isinstance(prompts, torch.Tensor):
        if prompts.dim() != 2 or prompts.shape[1] == 0:
            raise InputError(f"input_ids must have shape [batch, tokens] with tokens >= 1; got {tuple(prompts.shape)}")
        return prompts, torch.zeros(prompts.shape[0], dtype=torch.long)
    if not isinstance(prompts, (list, tuple)) or any(
        isinstance(p, (int, str)) or not hasattr(p, "__len__") for p in prompts
    ):
        example = f"[{list(prompts)[:3]}]" if isinstance(prompts, (list, tuple)) else "[[1, 2, 3]]"
        raise InputError(
            "prompts are a [B, T] tensor or a list of token-id lists (one per sequence), e.g. "
            f"{example}; got {type(prompts).__name__} {_preview(prompts)}"
        )
    rows = [list(p) for p in prompts]
    if not rows or any(len(r) == 0 for r in rows):
        raise InputError("every prompt needs at least one token")
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows], dtype=torch.long)
    return ids, torch.tensor([width - len(r) for r in rows], dtype=torch.long)


def _preview(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


@torch.no_grad()
def prefill(model: CausalLM, ids: torch.Tensor, cache: Cache, chunk_size: int | None = None) -> torch.Tensor:
    """Feed the prompt in chunks of ``chunk_size`` tokens; return the last position's logits [B, V].
    The ids are checked once here, not per chunk."""
    ids = model._check_ids(ids)
    step = ids.shape[1] if chunk_size is None else chunk_size
    for start in range(0, ids.shape[1], step):
        logits = model(ids[:, start : start + step], cache=cache, last_only=True, check_ids=False)
    return logits[:, -1]


@torch.no_grad()
def decode_step(model: CausalLM, tokens: torch.Tensor, cache: Cache) -> torch.Tensor:
    """One token per row [B] -> next-token logits [B, V]. The tokens are not range-checked (no host
    sync): they are sampled ids, or ids the caller checked."""
    return model(tokens[:, None], cache=cache, check_ids=False)[:, -1]


def _decode_logits(model: CausalLM, tokens: torch.Tensor, cache: Cache) -> torch.Tensor:
    return model(tokens[:, None], cache=cache, check_ids=False)[:, -1]


def compiled_decode_step(model: CausalLM):
    """``decode_step(model, tokens, cache)`` compiled with ``torch.compile(fullgraph=True, dynamic=True)``, one per model.

    The cache length is a Python int on the cache, compiled as a symbol from the first step
    (``dynamic=True``), so later steps reuse the graph. A step recompiles only where the kind of
    step changes: a sliding ring becomes full, a DeepSeek V4 compression block completes (one graph
    per kind, not per position: ``Compressor._step``), and Dynamo's specialization of sizes 0 and 1
    (a layer's first and second compressed entries). On CPU, Inductor needs a C++ compiler and the
    warm-up takes tens of seconds on 2 cores, minutes per graph for the ~150M-parameter models.

    The graph's wrapper, the code that calls its kernels and extern ops in turn, is generated as C++
    (Inductor's ``cpp_wrapper``) rather than Python: a step runs ~300 such calls, each ~2-7 µs of Python
    otherwise. Measured alternating in one process (docs/benchmarks.md, "The compiled step's wrapper in
    C++"): SmolLM2-135M int4 9.27 → 8.77 ms a token, the ~150M llama 11.87 → 11.66 ms at 512 tokens of
    context, for ~10% more warm-up (24.4 → 26.8 s). It calls ctxlab's native ops through the dispatcher
    with the traced arguments, so their schemas have no defaults (``tests/test_row_kernels.py``).
    """
    opaque = uncompilable_packed(model)
    if opaque:
        raise InputError(
            f"this model has {opaque} packed modules (ctxlab.pack_linears: oneDNN-packed linears, packed MoE "
            "experts) which torch.compile cannot trace; compile a model that is not packed, or packed with "
            "for_compile=True (as the CLI does with --compile)"
        )
    fn = model.__dict__.get("_compiled_decode")
    if fn is None:
        # every model shares the one code object of _decode_logits, and Dynamo's recompile limit
        # (8) counts graphs per code object: each compiled model uses about two, some more
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        fn = torch.compile(_decode_logits, fullgraph=True, dynamic=True, options={"cpp_wrapper": True})
        model.__dict__["_compiled_decode"] = fn  # a plain attribute, not a submodule or parameter
    return torch.no_grad()(fn)


@torch.no_grad()
def stream(
    model: CausalLM,
    prompts: Prompts,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    prefill_chunk: int | None = None,
    allow_past_max_positions: bool = False,
    compile: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(tokens [B], finished [B])`` once per generated position.

    ``compile=True`` runs the decode steps through :func:`compiled_decode_step` (prefill stays eager).

    Rows that have produced an EOS token keep yielding the pad token (``finished`` True);
    the stream ends when every row has finished or after ``max_new_tokens`` steps.
    A prompt plus ``max_new_tokens`` longer than the model's ``max_position_embeddings`` (the
    context it was trained for) is refused unless ``allow_past_max_positions``.
    """
    if max_new_tokens < 0:
        raise InputError(f"max_new_tokens = {max_new_tokens}: must be >= 0")
    if prefill_chunk is not None and not (isinstance(prefill_chunk, int) and prefill_chunk > 0):
        raise InputError(
            f"prefill_chunk = {prefill_chunk!r}: must be a positive number of tokens, or None (whole prompt)"
        )
    cfg = model.config
    eos = cfg.eos_token_id if eos_token_id is None else eos_token_id
    eos = torch.tensor([eos] if isinstance(eos, int) else list(eos), dtype=torch.long)
    pad_id = cfg.pad_token_id if cfg.pad_token_id is not None else (int(eos[0]) if len(eos) else 0)
    ids, pad = left_pad(prompts, pad_id)
    check_positions(cfg, ids.shape[1], max_new_tokens, allow_past_max_positions)
    ids, device = ids.to(model.device), model.device
    if max_new_tokens == 0:
        return
    cache = model.new_cache(ids.shape[0], ids.shape[1] + max_new_tokens)
    cache.set_left_padding(pad)
    generator = sampling_generator(seed, device)
    finished = torch.zeros(ids.shape[0], dtype=torch.bool, device=device)
    logits = prefill(model, ids, cache, prefill_chunk)
    step = compiled_decode_step(model) if compile else decode_step
    for i in range(max_new_tokens):
        tokens = sample(logits, temperature, top_k, top_p, generator)
        tokens = torch.where(finished, torch.full_like(tokens, pad_id), tokens)
        finished = finished | torch.isin(tokens, eos.to(device))
        yield tokens, finished.clone()
        if bool(finished.all()) or i == max_new_tokens - 1:
            return
        logits = step(model, tokens, cache)


def past_trained_context(cfg, positions: int, what: str) -> str | None:
    """Why ``positions`` (``what`` names them) run past the trained context (``max_position_embeddings``), or None."""
    limit = cfg.max_position_embeddings
    if positions <= limit:
        return None
    return (
        f"{what} = {positions} positions, more than {cfg.name or cfg.family}'s max_position_embeddings = {limit} "
        "(the context it was trained for)"
    )


def check_positions(cfg, prompt_tokens: int, new_tokens: int, allow: bool) -> None:
    """Refuse to run past the trained context (``max_position_embeddings``) unless allowed."""
    past = past_trained_context(
        cfg, prompt_tokens + new_tokens, f"{prompt_tokens} prompt tokens + {new_tokens} new tokens"
    )
    if past and not allow:
        raise InputError(
            f"{past}; shorten the prompt or max_new_tokens, or pass allow_past_max_positions=True "
            "(CLI: --allow-past-max-positions) to run on anyway"
        )


def generate(model: CausalLM, prompts: Prompts, max_new_tokens: int = 32, **kwargs) -> torch.Tensor | list[list[int]]:
    """Prompts followed by up to ``max_new_tokens`` generated tokens.

    A ``[B, T]`` tensor gives a ``[B, T + n]`` tensor (rows that stopped early padded with the
    pad token). A list of token-id lists (any lengths) gives a list of lists, each its prompt
    plus its own tokens up to and including the first EOS. Keyword arguments as :func:`stream`.
    """
    steps = list(stream(model, prompts, max_new_tokens, **kwargs))
    new = torch.stack([t for t, _ in steps], dim=1) if steps else torch.empty(0, 0, dtype=torch.long)
    if isinstance(prompts, torch.Tensor):
        return torch.cat((prompts, new.to(prompts.device).reshape(prompts.shape[0], -1)), dim=1)
    out = []
    for b, prompt in enumerate(prompts):
        row = list(prompt)
        for t, finished in steps:
            row.append(int(t[b]))
            if finished[b]:
                break
        out.append(row)
    return out
