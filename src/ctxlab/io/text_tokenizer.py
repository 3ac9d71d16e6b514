"""``ctxlab.load_tokenizer(path)``: a model's tokenizer, special tokens and chat template, from a
checkpoint directory (``tokenizer.json`` + ``tokenizer_config.json``) or a ``.gguf`` file.

Both sources become the same :class:`TextTokenizer`: a HF ``tokenizers.Tokenizer`` (the fast Rust
implementation; for GGUF built by :mod:`ctxlab.io.gguf_tokenizer`) plus what a chat needs around it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from tokenizers import Tokenizer

from ..chat_template import ChatTemplateError, render_chat
from ..errors import CheckpointError
from .gguf import is_gguf
from .gguf_tokenizer import PieceDecoder, read_gguf_tokenizer_fields, tokenizer_from_gguf_fields
from .tokenizer import TOKENIZER_FILE
from .tokenizer import load_tokenizer as load_tokenizer_file

CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
TEMPLATE_FILE = "chat_template.jinja"  # newer HF checkpoints keep the template in its own file
GENERATION_CONFIG_FILE = "generation_config.json"
SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")


@dataclass
class TextTokenizer:
    """Encode / decode text, the special tokens and the chat template of one model."""

    backend: Tokenizer
    special_tokens: dict[str, str | None]  # bos_token, eos_token, unk_token, pad_token (None when absent)
    chat_template: str | None = None
    source: str = ""
    extra_stop_ids: tuple[int, ...] = field(default=())  # e.g. generation_config.json's eos_token_id list
    decoder: Callable[[list[int], bool], str] | None = None  # GGUF: llama.cpp's detokenizer (PieceDecoder)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; ``add_special_tokens`` adds BOS / EOS as the model's tokenizer says."""
        return list(self.backend.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        ids = [int(i) for i in ids]
        if self.decoder is not None:
            return self.decoder(ids, skip_special_tokens)
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_id(self, name: str) -> int | None:
        """Id of the special token ``name`` ('bos_token', 'eos_token', ...), None when the model has none."""
        text = self.special_tokens.get(name)
        return None if text is None else self.backend.token_to_id(text)

    @property
    def bos_token_id(self) -> int | None:
        return self.token_id("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        return self.token_id("eos_token")

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **extra) -> str:
        """The conversation as prompt text (``transformers``' ``apply_chat_template(..., tokenize=False)``)."""
        if self.chat_template is None:
            raise ChatTemplateError(
                f"{self.source or 'this model'} has no chat template (a base model?): it cannot format a "
                "conversation; continue plain text with `ctxlab generate MODEL --prompt ...` instead"
            )
        return render_chat(self.chat_template, messages, add_generation_prompt, self.special_tokens, **extra)

    def end_of_turn_ids(self) -> list[int]:
        """Tokens that end an answer: EOS, the token the template writes right after an assistant message
        (``<|im_end|>``, ``<end_of_turn>``, ``<|eot_id|>``) and any extra stop ids of the checkpoint."""
        ids = [i for i in (self.eos_token_id, *self.extra_stop_ids) if i is not None]
        if self.chat_template is not None:
            probe = "\x00ctxlab-probe\x00"
            try:
                text = self.apply_chat_template(
                    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": probe}],
                    add_generation_prompt=False,
                )
            except ChatTemplateError:
                text = ""
            if probe in text:
                after = self.backend.encode(text.split(probe, 1)[1], add_special_tokens=False)
                specials = {t.content for t in self.backend.get_added_tokens_decoder().values() if t.special}
                if after.ids and after.tokens[0] in specials:
                    ids.append(after.ids[0])
        return list(dict.fromkeys(ids))


def load_tokenizer(path: str | Path) -> TextTokenizer:
    """The tokenizer of a checkpoint directory (``tokenizer.json``) or of a ``.gguf`` file."""
    path = Path(path)
    if path.is_file() and is_gguf(path):
        return gguf_text_tokenizer(path)
    if path.is_dir():
        return directory_text_tokenizer(path)
    raise CheckpointError(f"{path}: neither a checkpoint directory (with {TOKENIZER_FILE}) nor a .gguf file")


def gguf_text_tokenizer(path: Path) -> TextTokenizer:
    meta = read_gguf_tokenizer_fields(path)
    tokens = meta.get("tokenizer.ggml.tokens") or []
    keys = {
        "bos_token": "bos_token_id",
        "eos_token": "eos_token_id",
        "unk_token": "unknown_token_id",
        "pad_token": "padding_token_id",
    }
    special = {name: _token(tokens, meta.get(f"tokenizer.ggml.{key}")) for name, key in keys.items()}
    stops = tuple(
        i for i in (meta.get("tokenizer.ggml.eot_token_id"), meta.get("tokenizer.ggml.eom_token_id")) if i is not None
    )
    try:
        backend = tokenizer_from_gguf_fields(meta, str(path))
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 (damaged metadata: an index out of range, merges naming no token, ...)
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(
            f"{path}: its tokenizer.ggml.* metadata does not describe a usable tokenizer ({type(e).__name__}: {reason})"
        ) from None
    return TextTokenizer(
        backend=backend,
        special_tokens=special,
        chat_template=meta.get("tokenizer.chat_template"),
        source=str(path),
        extra_stop_ids=stops,
        decoder=PieceDecoder.from_fields(meta),
    )


def _token(tokens: list[str], i: int | None) -> str | None:
    return tokens[i] if i is not None and 0 <= i < len(tokens) else None


def directory_text_tokenizer(directory: Path) -> TextTokenizer:
    backend = load_tokenizer_file(directory)  # a malformed file is a CheckpointError naming it
    if backend is None:
        raise CheckpointError(f"{directory}: no {TOKENIZER_FILE} (ctxlab reads only the fast tokenizer format)")
    config = _json(directory / CONFIG_FILE)
    older = _json(directory / SPECIAL_TOKENS_MAP_FILE)  # older checkpoints keep the special tokens there only
    special = {name: _content(config.get(name)) or _content(older.get(name)) for name in SPECIAL_NAMES}
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if (directory / TEMPLATE_FILE).is_file():
        template = _text(directory / TEMPLATE_FILE)
    stops = _json(directory / GENERATION_CONFIG_FILE).get("eos_token_id")
    stops = tuple(stops) if isinstance(stops, list) else (stops,) if isinstance(stops, int) else ()
    return TextTokenizer(backend, special, template, str(directory), stops)


def _text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(_text(path))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    return data if isinstance(data, dict) else {}


def _content(value) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None
