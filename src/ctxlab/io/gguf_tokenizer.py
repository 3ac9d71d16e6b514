"""A HF ``tokenizers.Tokenizer`` built from a GGUF file's ``tokenizer.ggml.*`` metadata.

A GGUF carries no ``tokenizer.json``; llama.cpp's converter stores the vocabulary, its token types,
scores or merges and the special token ids as metadata. Two vocabulary kinds are read here, with the
semantics llama.cpp gives them (``src/llama-vocab.cpp``):

- ``tokenizer.ggml.model = "gpt2"``: byte-level BPE with the file's merges. The text is first split by
  the regexes the ``tokenizer.ggml.pre`` name stands for (llama.cpp's ``regex_exprs`` per pre-type,
  applied one after the other), then byte-level encoded (GPT-2's ``bytes_to_unicode`` alphabet).
- ``tokenizer.ggml.model = "llama"``: a SentencePiece *BPE* vocabulary (pieces + scores + token types,
  byte fallback). llama.cpp's ``llm_tokenizer_spm`` replaces spaces by U+2581, starts from single
  characters and repeatedly merges the adjacent pair whose concatenation is a piece with the highest
  score; characters outside the vocabulary become ``<0xXX>`` byte tokens. This is *not* a Unigram
  model (Viterbi over scores gives other pieces). A HF ``BPE`` model reproduces it when its merge list
  holds every split ``(a, b)`` of every normal piece ``a + b``, ranked by the score of ``a + b``.

Token types (``tokenizer.ggml.token_type``, llama.cpp's ``LLAMA_TOKEN_TYPE_*``): CONTROL tokens
(``<bos>``, ``<|im_end|>``) become special added tokens, USER_DEFINED ones (Gemma's ``\\n``, runs of
spaces, ``<table>``) plain added tokens: both are matched whole in the raw text before anything else,
as llama.cpp's ``tokenizer_st_partition`` does. BOS / EOS are added per ``add_bos_token`` /
``add_eos_token`` (a post-processor, so ``encode(text, add_special_tokens=False)`` leaves them out).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from ..errors import CheckpointError

# llama.cpp's LLAMA_TOKEN_TYPE_* values
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

SPACE = "\u2581"  # SentencePiece's visible space

# Pre-tokenizer regexes (llama.cpp's regex_exprs, the HF tokenizer.json spelling of the same patterns).
GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
DIGITS = r"\p{N}"
LLAMA3 = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# llama.cpp's LLAMA_VOCAB_PRE_TYPE_DEFAULT (also a file without tokenizer.ggml.pre): runs of punctuation, GPT-2's
# regex, digit runs, then groups of three digits
DEFAULT = (r"[\p{P}\$\+<=>\^~\|]+", GPT2, r"\p{N}+", r"[0-9][0-9][0-9]")

# tokenizer.ggml.pre -> the regexes that split the text, in order (llama-vocab.cpp, llama_vocab::impl::load).
PRE_TOKENIZER_SPLITS: dict[str, tuple[str, ...]] = {
    "default": DEFAULT,
    "gpt-2": (GPT2,),
    "gpt2": (GPT2,),
    "mpt": (GPT2,),
    "olmo": (GPT2,),
    "smollm": (DIGITS, GPT2),
    "starcoder": (DIGITS, GPT2),
    "refact": (DIGITS, GPT2),
    "llama-bpe": (LLAMA3,),
    "llama3": (LLAMA3,),
    "llama-v3": (LLAMA3,),
    "smaug-bpe": (LLAMA3,),
    "qwen2": (QWEN2,),
    "stablelm2": (QWEN2,),
    "deepseek-r1-qwen": (QWEN2,),
}
# Llama 3's pre-tokenizers: a word that is itself a token stays whole (llama.cpp's ignore_merges, HF's
# tokenizer.json "ignore_merges": true), and BOS is added unless the file says otherwise
LLAMA3_PRE = ("llama-bpe", "llama3", "llama-v3")


@dataclass(frozen=True)
class PieceDecoder:
    """Token ids -> text as llama.cpp's detokenizer writes it (``token_to_piece`` per token, the bytes joined, then
    UTF-8 with U+FFFD for each broken sequence): a NORMAL SentencePiece piece with U+2581 as a space, a BYTE token
    its byte, a NORMAL byte-level piece through GPT-2's byte alphabet, a USER_DEFINED token (and a CONTROL or
    UNKNOWN one when specials are shown) as its text; UNUSED tokens write nothing.

    HF's decoders differ in two places, which is why GGUF vocabularies decode here: ``ByteFallback`` turns a whole
    run of byte tokens into U+FFFD when any of it is broken (an answer cut mid-character lost the characters before
    it), and ``ByteLevel`` byte-decodes USER_DEFINED tokens too ('café' came out 'caf\ufffd')."""

    pieces: tuple[bytes, ...]  # per token id
    special: frozenset[int]  # CONTROL and UNKNOWN ids, left out unless specials are shown
    strip_leading_space: bool  # SentencePiece's add_space_prefix: the space it prepended is taken off again

    @staticmethod
    def from_fields(meta: dict) -> PieceDecoder:
        tokens = meta["tokenizer.ggml.tokens"]
        types = meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
        spm = meta.get("tokenizer.ggml.model") == "llama"
        byte_of = {c: b for b, c in _bytes_to_unicode().items()}

        def piece(text: str, kind: int) -> bytes:
            if kind in (USER_DEFINED, CONTROL, UNKNOWN):
                return text.encode()
            if kind == BYTE and spm:
                return bytes([int(text[3:5], 16)])  # <0xXX>
            if kind != NORMAL:
                return b""
            if spm:
                return text.replace(SPACE, " ").encode()
            return b"".join(bytes([byte_of[c]]) if c in byte_of else c.encode() for c in text)

        return PieceDecoder(
            tuple(piece(t, k) for t, k in zip(tokens, types)),
            frozenset(i for i, k in enumerate(types) if k in (CONTROL, UNKNOWN)),
            spm and meta.get("tokenizer.ggml.add_space_prefix", True),
        )

    def __call__(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        n = len(self.pieces)
        shown = (i for i in ids if 0 <= i < n and not (skip_special_tokens and i in self.special))
        text = b"".join(self.pieces[i] for i in shown).decode("utf-8", errors="replace")
        return text[1:] if self.strip_leading_space and text.startswith(" ") else text


@functools.cache
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (``bytes_to_unicode`` in its encoder.py)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def read_gguf_tokenizer_fields(path: str | Path) -> dict:
    """``tokenizer.*`` (and ``general.architecture``) metadata of a GGUF file as Python values, from ctxlab's
    own header reader (a damaged file is a CheckpointError naming it; ~70x faster than ``gguf.GGUFReader``,
    which maps every tensor too)."""
    from .gguf.reader import read_header

    metadata = read_header(path).metadata
    return {
        name: value
        for name, value in metadata.items()
        if name.startswith("tokenizer.") or name == "general.architecture"
    }


def tokenizer_from_gguf_fields(meta: dict, source: str = "GGUF file") -> Tokenizer:
    """The HF tokenizer the metadata describes (see the module docstring for the semantics)."""
    kind = meta.get("tokenizer.ggml.model")
    if "tokenizer.ggml.tokens" not in meta:
        raise CheckpointError(f"{source}: no tokenizer.ggml.tokens metadata; the file carries no tokenizer")
    if kind == "gpt2":
        tok = byte_level_bpe(meta, source)
    elif kind == "llama":
        tok = sentencepiece_bpe(meta)
    else:
        raise CheckpointError(
            f"{source}: tokenizer.ggml.model = {kind!r} is not supported; supported: 'gpt2' (byte-level BPE) "
            "and 'llama' (SentencePiece BPE with byte fallback)"
        )
    add_special_tokens(tok, meta)
    tok.post_processor = bos_eos_processor(meta)
    return tok


def byte_level_bpe(meta: dict, source: str) -> Tokenizer:
    """GPT-2-style byte-level BPE: the file's merges; the split regexes of ``tokenizer.ggml.pre``."""
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZER_SPLITS:
        raise CheckpointError(
            f"{source}: tokenizer.ggml.pre = {pre!r} is not a known pre-tokenizer; known: "
            f"{', '.join(sorted(PRE_TOKENIZER_SPLITS))}"
        )
    if "tokenizer.ggml.merges" not in meta:
        raise CheckpointError(f"{source}: a 'gpt2' tokenizer needs tokenizer.ggml.merges and the file has none")
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    vocab = vocabulary(meta["tokenizer.ggml.tokens"])
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=pre in LLAMA3_PRE))
    splits = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in PRE_TOKENIZER_SPLITS[pre]]
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tok.decoder = decoders.ByteLevel()
    return tok


def sentencepiece_bpe(meta: dict) -> Tokenizer:
    """SentencePiece BPE (llama.cpp ``llm_tokenizer_spm``): merges ranked by the merged piece's score."""
    tokens = meta["tokenizer.ggml.tokens"]
    types = meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    scores = meta.get("tokenizer.ggml.scores") or [-float(i) for i in range(len(tokens))]
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[unk_id] if unk_id is not None else None
    tok = Tokenizer(
        models.BPE(
            vocab=vocabulary(tokens),
            merges=score_ranked_merges(tokens, types, scores),
            unk_token=unk,
            byte_fallback=True,
            fuse_unk=True,
        )
    )
    escape = [normalizers.Replace(" ", SPACE)]
    unprefix = []
    if meta.get("tokenizer.ggml.add_space_prefix", True):  # llama.cpp's default for SentencePiece vocabularies
        escape.insert(0, normalizers.Prepend(SPACE))
        unprefix = [decoders.Strip(" ", 1, 0)]
    tok.normalizer = normalizers.Sequence(escape)
    tok.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse(), *unprefix])
    return tok


def score_ranked_merges(tokens: list[str], types: list[int], scores: list[float]) -> list[tuple[str, str]]:
    """Every ``(a, b)`` with ``a``, ``b`` and ``a + b`` normal pieces, best merged score first.

    SentencePiece merges the adjacent pair whose concatenation scores highest; with the pairs ranked
    by that score a HF BPE model takes the same steps. Ties keep the order of the pieces in the file.
    """
    normal = {t: i for i, (t, kind) in enumerate(zip(tokens, types)) if kind == NORMAL}
    ranked = sorted(normal.items(), key=lambda item: (-scores[item[1]], item[1]))
    merges = []
    for piece, _ in ranked:
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal:
                merges.append((left, right))
    return merges


def vocabulary(tokens: list[str]) -> dict[str, int]:
    """token text -> id; a text that appears twice keeps its first id (the later one cannot be produced)."""
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    return vocab


def add_special_tokens(tok: Tokenizer, meta: dict) -> None:
    """CONTROL and UNKNOWN tokens as special added tokens, USER_DEFINED ones as plain added tokens (matched whole)."""
    tokens = meta["tokenizer.ggml.tokens"]
    types = meta.get("tokenizer.ggml.token_type") or []
    # UNKNOWN (<unk> of SentencePiece vocabularies) is matched whole and hidden like CONTROL in llama.cpp
    control = [
        AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k in (CONTROL, UNKNOWN) and t
    ]
    user = [AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == USER_DEFINED and t]
    tok.add_special_tokens(control)
    tok.add_tokens(user)


def bos_eos_processor(meta: dict):
    """A post-processor adding BOS / EOS as ``add_bos_token`` / ``add_eos_token`` say (None when neither)."""
    tokens = meta["tokenizer.ggml.tokens"]
    # llama.cpp adds BOS to a SentencePiece vocabulary and to Llama 3's unless the file says otherwise, and not to
    # another BPE one
    by_default = meta.get("tokenizer.ggml.model") == "llama" or meta.get("tokenizer.ggml.pre") in LLAMA3_PRE
    add_bos = meta.get("tokenizer.ggml.add_bos_token", by_default)
    add_eos = meta.get("tokenizer.ggml.add_eos_token", False)
    bos_id, eos_id = meta.get("tokenizer.ggml.bos_token_id"), meta.get("tokenizer.ggml.eos_token_id")
    head = [tokens[bos_id]] if add_bos and bos_id is not None else []
    tail = [tokens[eos_id]] if add_eos and eos_id is not None else []
    if not head and not tail:
        return None
    specials = dict([(head[0], bos_id)] if head else []) | dict([(tail[0], eos_id)] if tail else [])
    return processors.TemplateProcessing(
        single=[*head, "$A", *tail],
        pair=[*head, "$A", *tail, *head, "$B", *tail],
        special_tokens=list(specials.items()),
    )
