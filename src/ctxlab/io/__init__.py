"""Reading and writing HF-format files: config.json, safetensors checkpoints, tokenizers."""
