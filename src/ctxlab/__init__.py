"""ctxlab: long-context-efficient LLM architectures, their caches and their costs."""
from .config import LayerSpec, ModelConfig, RopeSpec
from .model import CausalLM, build_model
