"""A thin wrapper over HF ``tokenizers``: load a checkpoint's ``tokenizer.json``, encode, decode.

Only the fast (Rust) ``tokenizer.json`` format is read; chat templates are not applied here.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer

from ..errors import CheckpointError

TOKENIZER_FILE = "tokenizer.json"


def load_tokenizer(directory: str | Path) -> Tokenizer | None:
    """The tokenizer in ``directory/tokenizer.json``, or None when the directory has none."""
    path = Path(directory) / TOKENIZER_FILE
    if not path.is_file():
        return None
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # noqa: BLE001 (the Rust side raises plain Exception for any malformed file)
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{path}: not a readable tokenizer.json ({reason})") from None
    tok.no_truncation()  # a file may carry truncation / padding settings from training: transformers
    tok.no_padding()  # ignores them unless asked, and a prompt or a perplexity text must not be cut or padded
    return tok


def encode(tok: Tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` (with whatever special tokens the tokenizer's post-processor adds)."""
    return list(tok.encode(text).ids)


def decode(tok: Tokenizer, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
    """Text of ``ids``; special tokens (BOS, EOS, ...) are dropped unless ``skip_special_tokens`` is False."""
    return tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
