"""ctxlab: long-context-efficient LLM architectures, their caches and what they cost.

Public API (see docs/architecture.md)::

    cfg = ctxlab.load_config("llama-3-8b")          # preset, config.json path or checkpoint dir
    model = ctxlab.build_model(cfg, dtype=torch.float32, seed=0)
    model = ctxlab.from_pretrained("dir", dtype=torch.float32)
    logits = model(ids); cache = model.new_cache(1, 4096); logits = model(ids, cache=cache)
    ctxlab.kv_cache_bytes(cfg, 131072, "bfloat16"); ctxlab.count_params(cfg); ctxlab.decode_flops(cfg, n)
    ctxlab.generate(model, ids, max_new_tokens=32)
    tok = ctxlab.load_tokenizer("dir_or.gguf"); ctxlab.perplexity(model, tok.encode(text), context=512)
    ctxlab.list_presets()                            # name, family, params, layers, trained context
    ctxlab.train.train(cfg, ctxlab.train.make_task("mqar"), ctxlab.train.TrainConfig(steps=200), "runs/x")
"""

from . import train
from .accounting import count_params, decode_flops, decode_flops_terms, kv_cache_bytes, kv_cache_bytes_per_layer
from .bench import bench
from .config import LayerSpec, ModelConfig, RopeSpec
from .errors import CacheOverflowError, CheckpointError, ConfigError, CtxlabError, InputError
from .generate import generate, sample, stream
from .io.checkpoint import from_pretrained
from .io.config_file import load_config
from .io.text_tokenizer import load_tokenizer
from .io.writer import save_pretrained
from .model import CausalLM, build_model
from .nn.fusion import fuse_projections_ as fuse_projections
from .nn.packing import pack_linears_ as pack_linears
from .perplexity import perplexity
from .presets import preset_names
from .quant import quantize_ as quantize
from .reporting.catalog import list_presets

__version__ = "0.1.0"

__all__ = [
    "CacheOverflowError",
    "CausalLM",
    "CheckpointError",
    "ConfigError",
    "CtxlabError",
    "InputError",
    "LayerSpec",
    "ModelConfig",
    "RopeSpec",
    "bench",
    "build_model",
    "count_params",
    "decode_flops",
    "decode_flops_terms",
    "from_pretrained",
    "fuse_projections",
    "pack_linears",
    "generate",
    "kv_cache_bytes",
    "kv_cache_bytes_per_layer",
    "list_presets",
    "load_config",
    "load_tokenizer",
    "perplexity",
    "preset_names",
    "quantize",
    "sample",
    "save_pretrained",
    "stream",
    "train",
]
