"""A tiny random Llama checkpoint directory with a tokenizer and a ChatML chat template, written with
transformers (so transformers and ctxlab load the same files)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

# SmolLM2-135M-Instruct's chat template (tokenizer_config.json), ChatML with a default system message
CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
WORDS = [
    "system",
    "user",
    "assistant",
    "you",
    "are",
    "a",
    "helpful",
    "ai",
    "named",
    "smollm",
    "trained",
    "by",
    "hugging",
    "face",
    "what",
    "is",
    "the",
    "capital",
    "of",
    "france",
    "paris",
    "hello",
    "hi",
    "tell",
    "me",
    "about",
    "cats",
    "dogs",
    "and",
    "more",
    "please",
    "thanks",
    "yes",
    "no",
    "maybe",
    "one",
    "two",
    "three",
    "four",
    "five",
    "red",
    "green",
    "blue",
    "sun",
    "moon",
    "sky",
    "sea",
    "river",
    "tree",
    "You",
    "AI",
    "SmolLM",
    "Hugging",
    "Face",
    ",",
    ".",
    "?",
]


def write_tokenizer(directory: Path, chat_template: str | None = CHATML) -> int:
    """A WordLevel tokenizer.json (whitespace split; decode joins with spaces, so text <-> ids round-trips)
    and tokenizer_config.json; returns the vocabulary size."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(SPECIALS + list(dict.fromkeys(WORDS)))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    tok.save(str(directory / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "unk_token": "<unk>",
        "pad_token": "<|endoftext|>",
        "model_max_length": 2048,
    }
    if chat_template is not None:
        config["chat_template"] = chat_template
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return len(vocab)


def write_checkpoint(directory: Path, chat_template: str | None = CHATML, seed: int = 0) -> Path:
    """transformers' LlamaForCausalLM (2 layers, hidden 32, random weights) + the tokenizer, saved in ``directory``."""
    import transformers

    directory.mkdir(parents=True, exist_ok=True)
    vocab = write_tokenizer(directory, chat_template)
    config = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=None,
        eos_token_id=SPECIALS.index("<|im_end|>"),
        pad_token_id=SPECIALS.index("<|endoftext|>"),
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():  # larger weights than the default init, so the logits differ a lot between tokens
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.3)
    model.save_pretrained(directory)
    return directory
