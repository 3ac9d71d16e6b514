"""Tokenizers built from GGUF metadata: small synthetic vocabularies (the semantics), then the two real files
against transformers' GGUF tokenizers and, for Gemma's SentencePiece vocabulary, against the file's own
definition (llama.cpp's ``llm_tokenizer_spm``, re-implemented here in plain Python)."""

from __future__ import annotations

import pytest

import ctxlab
from ctxlab.chat_template import ChatTemplateError
from ctxlab.errors import CheckpointError
from ctxlab.io.gguf_tokenizer import BYTE, CONTROL, NORMAL, USER_DEFINED, tokenizer_from_gguf_fields

STRINGS = [
    "Hello world",
    "The capital of France is Paris.",
    "def f(x):\n    return x ** 2  # square\n",
    "for (int i = 0; i < n; ++i) { sum += a[i]; }",
    "Café naïve résumé Ångström",
    "日本語のテキストと中文",
    "emoji 🎉🚀 ok 👍🏽",
    "a  b   c    d\t\te",
    "line1\nline2\n\n\nline3\r\n",
    "  leading and trailing  ",
    "numbers 12345 and 3.14159",
    "don't you're I'll",
    "\u00a0nbsp\u2003em",
    "x",
    "",
]


# ------------------------------------------------------------------------------- synthetic vocabularies


def spm_meta(tokens: list[tuple[str, float, int]], **extra) -> dict:
    """Metadata of a 'llama' (SentencePiece) vocabulary: <unk>, <s>, </s>, 256 byte tokens, then ``tokens``."""
    head = [("<unk>", 0.0, 2), ("<s>", 0.0, CONTROL), ("</s>", 0.0, CONTROL)]
    head += [(f"<0x{b:02X}>", 0.0, BYTE) for b in range(256)]
    rows = head + tokens
    return {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": [t for t, _, _ in rows],
        "tokenizer.ggml.scores": [s for _, s, _ in rows],
        "tokenizer.ggml.token_type": [k for _, _, k in rows],
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
        **extra,
    }


def pieces(tok, text: str, **kw) -> list[str]:
    return tok.encode(text, **kw).tokens


def test_sentencepiece_merges_follow_the_merged_piece_score():
    # "abc": the pair (b, c) makes a better-scoring piece than (a, b), so it merges first, then (a, bc)
    vocab = [
        ("\u2581", -1.0, NORMAL),
        ("a", -1.0, NORMAL),
        ("b", -1.0, NORMAL),
        ("c", -1.0, NORMAL),
        ("ab", -5.0, NORMAL),
        ("bc", -0.5, NORMAL),
        ("abc", -9.0, NORMAL),
    ]
    tok = tokenizer_from_gguf_fields(spm_meta(vocab, **{"tokenizer.ggml.add_space_prefix": False}))
    assert pieces(tok, "abc", add_special_tokens=False) == ["abc"]
    assert pieces(tok, "ab", add_special_tokens=False) == ["ab"]
    no_abc = tokenizer_from_gguf_fields(spm_meta(vocab[:-1], **{"tokenizer.ggml.add_space_prefix": False}))
    assert pieces(no_abc, "abc", add_special_tokens=False) == ["a", "bc"]  # not "ab" + "c"


def test_sentencepiece_is_not_unigram():
    # Unigram (Viterbi over log-probabilities) would take "ab" + "cd" (-2 + -2 = -4 > -1 + -3.5);
    # SentencePiece BPE first merges the best pair "bc" (-1), after which "ab" / "cd" cannot form.
    vocab = [
        ("a", -3.0, NORMAL),
        ("b", -3.0, NORMAL),
        ("c", -3.0, NORMAL),
        ("d", -3.0, NORMAL),
        ("ab", -2.0, NORMAL),
        ("cd", -2.0, NORMAL),
        ("bc", -1.0, NORMAL),
    ]
    tok = tokenizer_from_gguf_fields(spm_meta(vocab, **{"tokenizer.ggml.add_space_prefix": False}))
    assert pieces(tok, "abcd", add_special_tokens=False) == ["a", "bc", "d"]


def test_sentencepiece_spaces_prefix_bos_byte_fallback_and_user_defined():
    vocab = [
        ("\u2581", -1.0, NORMAL),
        ("h", -2.0, NORMAL),
        ("i", -2.0, NORMAL),
        ("\u2581h", -1.5, NORMAL),
        ("\u2581hi", -1.2, NORMAL),
        ("<b>", 0.0, USER_DEFINED),
    ]
    meta = spm_meta(vocab)  # add_space_prefix and add_bos_token absent: llama.cpp's defaults (both on)
    tok = tokenizer_from_gguf_fields(meta)
    assert pieces(tok, "hi hi") == ["<s>", "\u2581hi", "\u2581hi"]
    assert pieces(tok, "hé<b>", add_special_tokens=False) == ["\u2581h", "<0xC3>", "<0xA9>", "<b>"]
    ids = tok.encode("hi hé hi").ids
    assert tok.decode(ids) == "hi hé hi"  # byte tokens fused back into UTF-8, the prefix space stripped
    meta["tokenizer.ggml.add_space_prefix"] = False
    meta["tokenizer.ggml.add_bos_token"] = False
    assert pieces(tokenizer_from_gguf_fields(meta), "hi hi") == ["h", "i", "\u2581hi"]


def byte_level_meta(pre: str) -> dict:
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = sorted(ByteLevel.alphabet())
    tokens = ["<|endoftext|>", *alphabet, "\u0120a", "12"]
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [CONTROL] + [NORMAL] * (len(tokens) - 1),
        "tokenizer.ggml.merges": ["\u0120 a", "1 2"],
        "tokenizer.ggml.eos_token_id": 0,
    }


def test_byte_level_pre_tokenizers():
    default = tokenizer_from_gguf_fields(byte_level_meta("default"))
    assert pieces(default, "a a12<|endoftext|>") == ["a", "\u0120a", "12", "<|endoftext|>"]
    smollm = tokenizer_from_gguf_fields(byte_level_meta("smollm"))  # digits split one by one first
    assert pieces(smollm, "a a12") == ["a", "\u0120a", "1", "2"]
    assert smollm.decode(smollm.encode("a a12 é").ids) == "a a12 é"


def test_default_and_llama3_pre_tokenizers_as_llama_cpp_splits():
    """llama.cpp's default: punctuation runs, GPT-2's regex, digit runs, groups of three digits; Llama 3's: a word
    that is itself a token stays whole (ignore_merges) and BOS comes first unless the file says otherwise."""
    space = "\u0120"
    tokens = ["<|begin_of_text|>", "1", "2", "3", "4", "5", "12", "123", "1234", "12345", "45", ",", space, space + ","]
    tokens += ["a", "b", "c", "ab", "abc"]
    meta = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "default",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [CONTROL] + [NORMAL] * (len(tokens) - 1),
        "tokenizer.ggml.merges": ["1 2", "12 3", "123 4", "1234 5", "4 5", f"{space} ,", "a b"],
        "tokenizer.ggml.bos_token_id": 0,
    }
    default = tokenizer_from_gguf_fields(meta)
    assert pieces(default, "12345") == ["123", "45"] and pieces(default, " ,") == [space, ","]
    llama3 = tokenizer_from_gguf_fields({**meta, "tokenizer.ggml.pre": "llama-bpe"})
    assert llama3.encode("abc").tokens == ["<|begin_of_text|>", "abc"]  # not ab + c: the merges are not needed
    no_bos = tokenizer_from_gguf_fields(
        {**meta, "tokenizer.ggml.pre": "llama-bpe", "tokenizer.ggml.add_bos_token": False}
    )
    assert no_bos.encode("abc").tokens == ["abc"] and default.encode("abc").tokens == ["ab", "c"]


def test_damaged_tokenizer_metadata_is_a_checkpoint_error_naming_the_file(tmp_path):
    from ctxlab.io.text_tokenizer import gguf_text_tokenizer

    meta = {**byte_level_meta("gpt2"), "tokenizer.ggml.merges": ["\u0120 zz"]}  # a merge naming no token
    pytest.importorskip("gguf", reason="writing a GGUF file needs the gguf package")
    from gguf_writer import write_gguf

    path = tmp_path / "damaged.gguf"
    write_gguf(path, "llama", {k: v for k, v in meta.items() if k != "tokenizer.ggml.eos_token_id"}, {})
    with pytest.raises(CheckpointError, match=r"damaged.gguf: its tokenizer.ggml.\* metadata does not describe"):
        gguf_text_tokenizer(path)


def test_unknown_pre_tokenizer_and_model():
    with pytest.raises(
        CheckpointError, match="tokenizer.ggml.pre = 'nope' is not a known pre-tokenizer; known: .*smollm"
    ):
        tokenizer_from_gguf_fields(byte_level_meta("nope"))
    with pytest.raises(CheckpointError, match="tokenizer.ggml.model = 'rwkv' is not supported"):
        tokenizer_from_gguf_fields({**byte_level_meta("default"), "tokenizer.ggml.model": "rwkv"})


# ---------------------------------------------------------------------------------------- real files


def spm_reference(text: str, meta: dict) -> list[int]:
    """llama.cpp's SentencePiece tokenization (llm_tokenizer_spm + tokenizer_st_partition), the file's own
    definition: control / user-defined tokens matched whole (longest first), spaces -> U+2581, then merge the
    adjacent pair whose concatenation is the best-scoring piece (leftmost on ties), bytes for unknown pieces."""
    tokens, scores, types = (
        meta["tokenizer.ggml.tokens"],
        meta["tokenizer.ggml.scores"],
        meta["tokenizer.ggml.token_type"],
    )
    ids = {}
    for i, t in enumerate(tokens):
        ids.setdefault(t, i)
    whole = sorted((t for t, k in zip(tokens, types) if k in (CONTROL, USER_DEFINED) and t), key=len, reverse=True)
    out = [meta["tokenizer.ggml.bos_token_id"]] if meta.get("tokenizer.ggml.add_bos_token") else []
    fragment = ""

    def flush(raw: str) -> None:
        if not raw:
            return
        symbols = list((" " + raw if meta.get("tokenizer.ggml.add_space_prefix") else raw).replace(" ", "\u2581"))
        while True:
            best = None
            for j in range(len(symbols) - 1):
                i = ids.get(symbols[j] + symbols[j + 1])
                if i is not None and (best is None or scores[i] > best[0]):
                    best = (scores[i], j)
            if best is None:
                break
            j = best[1]
            symbols[j : j + 2] = [symbols[j] + symbols[j + 1]]
        for s in symbols:
            out.extend([ids[s]] if s in ids else [ids[f"<0x{b:02X}>"] for b in s.encode()])

    i = 0
    while i < len(text):
        match = next((t for t in whole if text.startswith(t, i)), None)
        if match is None:
            fragment += text[i]
            i += 1
            continue
        flush(fragment)
        fragment = ""
        out.append(ids[match])
        i += len(match)
    flush(fragment)
    return out


def transformers_tokenizer(path):
    transformers = pytest.importorskip("transformers", reason="transformers (test extra) is not installed")
    return transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


@pytest.fixture(scope="module")
def smollm2():
    from gguf_files import smollm2_path

    path = smollm2_path()
    return ctxlab.load_tokenizer(path), transformers_tokenizer(path)


@pytest.fixture(scope="module")
def gemma3():
    from ctxlab.io.gguf_tokenizer import read_gguf_tokenizer_fields
    from gguf_files import gemma3_path

    path = gemma3_path()
    return ctxlab.load_tokenizer(path), transformers_tokenizer(path), read_gguf_tokenizer_fields(path)


@pytest.mark.slow
@pytest.mark.parametrize("text", STRINGS + ["<|im_start|>user\nhi<|im_end|>\n"])
def test_smollm2_ids_equal_transformers(smollm2, text):
    ours, ref = smollm2
    assert ours.encode(text) == ref.encode(text)
    assert ours.encode(text, add_special_tokens=False) == ref.encode(text, add_special_tokens=False)
    assert ours.decode(ours.encode(text), skip_special_tokens=False) == text


@pytest.mark.slow
def test_smollm2_special_tokens(smollm2):
    ours, ref = smollm2
    assert (ours.bos_token_id, ours.eos_token_id) == (ref.bos_token_id, ref.eos_token_id) == (1, 2)
    assert ours.special_tokens["eos_token"] == "<|im_end|>"
    assert ours.end_of_turn_ids() == [ref.convert_tokens_to_ids("<|im_end|>")]
    assert ours.encode("hi") == ours.encode("hi", add_special_tokens=False)  # add_bos_token = False


CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You answer in one word."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy? Ünïcode 日本 🎉"},
    ],
]


@pytest.mark.slow
@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_smollm2_chat_template_equals_transformers(smollm2, messages, add_generation_prompt):
    ours, ref = smollm2
    expected = ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == expected
    assert "<|im_start|>" in expected


@pytest.mark.slow
@pytest.mark.parametrize("text", STRINGS + ["<start_of_turn>user\nhi<end_of_turn>\n", "<table><tr>x</tr>\t\t\n\n"])
def test_gemma3_ids(gemma3, text):
    ours, ref, meta = gemma3
    ids = ours.encode(text)
    assert ids == spm_reference(text, meta)  # the file's own definition
    # transformers 5.23 builds Gemma's GGUF tokenizer as BPE with merges from the vocabulary order; on every
    # string here it agrees with the SentencePiece definition (no string needed an exception)
    assert ids == ref.encode(text)
    assert ids[0] == ours.bos_token_id == 2  # tokenizer.ggml.add_bos_token = True
    assert ours.decode(ids, skip_special_tokens=False) == "<bos>" + text
    assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True)


@pytest.mark.slow
def test_gemma3_has_no_chat_template(gemma3):
    ours, _, _ = gemma3
    assert ours.chat_template is None
    with pytest.raises(ChatTemplateError, match="no chat template .*ctxlab generate"):
        ours.apply_chat_template([{"role": "user", "content": "hi"}])
    assert ours.end_of_turn_ids() == [1]  # <eos>
