"""The types of the HF ``config.json`` fields the families read, checked before any family parses them.

One table (:data:`FIELDS`) for every family: a field name means the same thing wherever it
appears. ``check_fields`` returns one :class:`~ctxlab.errors.ConfigError` naming every field
whose value has the wrong type or is out of range (bool is not an int; a string is not a
number), so a family never sees ``"hidden_size": "32"`` or ``"num_hidden_layers": true``.

``null`` means "absent" (the family's default), as in transformers' config classes, except for
the fields in :data:`NULL_MEANS_NONE`, where it means "none" (no BOS token, no window, ...).
Fields the table does not know are left alone (HF configs carry many fields no forward uses).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError

MAX_SIZE = 1 << 40  # no size, count or token id in a real config comes near it
MAX_LAYERS = 4096  # the deepest published decoders have ~100-200 layers


@dataclass(frozen=True)
class Rule:
    """What a field allows: ``ok(value)`` and the words that say so."""

    allowed: str
    ok: Callable[[Any], bool]


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def integer(minimum: int = 1, maximum: int = MAX_SIZE) -> Rule:
    return Rule(f"an integer in [{minimum}, {maximum}]", lambda v: _is_int(v) and minimum <= v <= maximum)


def number(positive: bool = False, nonnegative: bool = False, at_most: float | None = None) -> Rule:
    words = "a positive number" if positive else "a number >= 0" if nonnegative else "a finite number"
    words += f" <= {at_most}" if at_most is not None else ""

    def ok(v: Any) -> bool:
        if not _is_number(v) or (positive and v <= 0) or (nonnegative and v < 0):
            return False
        return at_most is None or v <= at_most

    return Rule(words, ok)


BOOL = Rule("true or false", lambda v: isinstance(v, bool))
STR = Rule("a string", lambda v: isinstance(v, str))
DICT = Rule("a JSON object", lambda v: isinstance(v, dict))


def list_of(item: Rule) -> Rule:
    return Rule(f"a list, each entry {item.allowed}", lambda v: isinstance(v, list) and all(item.ok(x) for x in v))


def either(*rules: Rule) -> Rule:
    return Rule(" or ".join(r.allowed for r in rules), lambda v: any(r.ok(v) for r in rules))


def dict_of(item: Rule) -> Rule:
    return Rule(
        f"a JSON object, each value {item.allowed}",
        lambda v: isinstance(v, dict) and all(item.ok(x) for x in v.values()),
    )


SIZE, COUNT0 = integer(1), integer(0)
TOKEN = integer(0)

FIELDS: dict[str, Rule] = {
    # every family
    "vocab_size": SIZE,
    "hidden_size": SIZE,
    "intermediate_size": SIZE,
    "num_hidden_layers": integer(1, MAX_LAYERS),
    "num_attention_heads": SIZE,
    "num_key_value_heads": SIZE,
    "head_dim": SIZE,
    "rms_norm_eps": number(positive=True),
    "tie_word_embeddings": BOOL,
    "max_position_embeddings": SIZE,
    "bos_token_id": TOKEN,
    "pad_token_id": TOKEN,
    "eos_token_id": either(TOKEN, list_of(TOKEN)),
    "hidden_act": STR,
    "hidden_activation": STR,
    "attention_bias": BOOL,
    "mlp_bias": BOOL,
    "rope_theta": number(positive=True),
    "partial_rotary_factor": number(positive=True, at_most=1.0),
    "rope_parameters": DICT,
    "rope_scaling": DICT,
    "layer_types": list_of(STR),
    "mlp_layer_types": list_of(STR),
    "sliding_window": SIZE,
    "use_sliding_window": BOOL,
    "max_window_layers": COUNT0,
    # MoE (Laguna, ZAYA, DeepSeek, Gemma 4)
    "num_experts": SIZE,
    "num_experts_per_tok": SIZE,
    "moe_intermediate_size": SIZE,
    "top_k_experts": SIZE,
    "n_routed_experts": SIZE,
    "n_shared_experts": COUNT0,
    "shared_expert_intermediate_size": COUNT0,
    "routed_scaling_factor": number(positive=True),
    "moe_routed_scaling_factor": number(positive=True),
    "moe_router_logit_softcapping": number(nonnegative=True),
    "moe_apply_router_weight_on_input": BOOL,
    "n_group": SIZE,
    "topk_group": SIZE,
    "norm_topk_prob": BOOL,
    "first_k_dense_replace": COUNT0,
    "scoring_func": STR,
    "router_hidden_size": SIZE,
    "num_hash_layers": COUNT0,
    "enable_moe_block": BOOL,
    # Laguna
    "num_attention_heads_per_layer": list_of(SIZE),
    "gating": either(BOOL, STR),
    # ZAYA
    "cca_time0": SIZE,
    "cca_time1": SIZE,
    "lm_head_bias": BOOL,
    # DeepSeek V3.2 / V4
    "kv_lora_rank": SIZE,
    "q_lora_rank": SIZE,
    "qk_nope_head_dim": SIZE,
    "qk_rope_head_dim": SIZE,
    "v_head_dim": SIZE,
    "index_n_heads": SIZE,
    "index_head_dim": SIZE,
    "index_topk": SIZE,
    "compress_ratios": list_of(COUNT0),
    "compress_rates": dict_of(SIZE),
    "compress_rope_theta": number(positive=True),
    "o_groups": SIZE,
    "o_lora_rank": SIZE,
    "swiglu_limit": number(positive=True),
    "hc_mult": SIZE,
    "hc_sinkhorn_iters": SIZE,
    "hc_eps": number(positive=True),
    # Gemma 4
    "text_config": DICT,
    "num_kv_shared_layers": COUNT0,
    "use_double_wide_mlp": BOOL,
    "attention_k_eq_v": BOOL,
    "hidden_size_per_layer_input": COUNT0,
    "final_logit_softcapping": number(positive=True),
    "vocab_size_per_layer_input": SIZE,
    "per_layer_config": dict_of(DICT),
    "global_head_dim": SIZE,
    "num_global_key_value_heads": SIZE,
    "_multimodal_tower_params": COUNT0,
}

# null keeps its meaning "none" here (every other null field reads as absent)
NULL_MEANS_NONE = frozenset(
    {
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "sliding_window",
        "final_logit_softcapping",
        "num_global_key_value_heads",
        "moe_router_logit_softcapping",
    }
)

ROPE_FIELDS: dict[str, Rule] = {
    "rope_type": STR,
    "type": STR,
    "rope_theta": number(positive=True),
    "factor": number(positive=True),
    "low_freq_factor": number(positive=True),
    "high_freq_factor": number(positive=True),
    "original_max_position_embeddings": SIZE,
    "beta_fast": number(positive=True),
    "beta_slow": number(positive=True),
    "attention_factor": number(positive=True),
    "mscale": number(),
    "mscale_all_dim": number(),
    "truncate": BOOL,
    "partial_rotary_factor": number(positive=True, at_most=1.0),
}


def check_fields(d: dict[str, Any], where: str, rules: dict[str, Rule] = FIELDS) -> dict[str, Any]:
    """``d`` without the nulls that mean "absent", after checking every known field's type.

    Raises one ConfigError listing every field with a wrong value: its name, the value and what is allowed.
    A nested ``text_config`` (multimodal Gemma 4) is checked the same way.
    """
    problems = []
    out = {}
    for key, value in d.items():
        rule = rules.get(key)
        if value is None and rule is not None and key not in NULL_MEANS_NONE:
            continue  # null = absent: the family's default
        if rule is not None and value is not None and not rule.ok(value):
            problems.append(f"{where}.{key} = {_show(value)}: must be {rule.allowed}")
        out[key] = value
    if problems:
        raise ConfigError(problems)
    if isinstance(out.get("text_config"), dict):
        out["text_config"] = check_fields(out["text_config"], f"{where}.text_config", rules)
    return out


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
