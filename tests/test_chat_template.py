"""Chat templates render exactly as transformers' ``apply_chat_template(..., tokenize=False)``: whitespace
control, tojson, loop controls, special tokens, raise_exception, the sandbox."""

from __future__ import annotations

import json
from datetime import datetime

import pytest

import ctxlab
from ctxlab.chat_template import ChatTemplateError, render_chat

transformers = pytest.importorskip("transformers", reason="transformers (test extra) is not installed")
from tiny_chat_checkpoint import CHATML, write_tokenizer

FEATURES = """
{%- for m in messages %}
  {%- if m.role not in ['system', 'user', 'assistant'] %}{{ raise_exception('unknown role: ' + m.role) }}{% endif %}
  {%- if loop.index > 4 %}{% break %}{% endif %}
  {%- if m.role == 'system' %}{% continue %}{% endif %}
<{{ m.role }}> {{ m.content | tojson }} {{ m.get('meta', {}) | tojson(indent=1) }}
  {% if m.role == 'user' %}
    [user]
  {% endif %}
{% endfor %}
{%- if add_generation_prompt %}{{ eos_token ~ (bos_token or '') }}<assistant>{% endif %}
{{ strftime_now('%Y') }}
"""

# tools / documents (None: transformers passes both), a special token the tokenizer lacks (bos_token: None,
# left undefined, so it renders as nothing), and transformers' {% generation %} block for training masks
VARIABLES = (
    "{{ bos_token }}{% if tools is not none %}[TOOLS]{{ tools | tojson }}{% endif %}{% for m in messages %}"
    "{% generation %}<{{ m.role }}>{{ m.content }}{% endgeneration %}{% endfor %}{{ documents | tojson }}"
)

MESSAGES = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": 'say "hi" <b>&</b> café 日本', "meta": {"k": [1, 2]}},
    {"role": "assistant", "content": "hi"},
    {"role": "user", "content": "again"},
    {"role": "assistant", "content": "cut by the break"},
]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    path = tmp_path_factory.mktemp("template")
    write_tokenizer(path)
    return ctxlab.load_tokenizer(path), transformers.AutoTokenizer.from_pretrained(path)


@pytest.mark.parametrize("template", [FEATURES, CHATML, VARIABLES])
@pytest.mark.parametrize("messages", [MESSAGES, MESSAGES[1:2]])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_renders_like_transformers(tokenizers, template, messages, add_generation_prompt):
    ours, ref = tokenizers
    ours.chat_template = template
    expected = ref.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    assert ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == expected
    if template is FEATURES:
        assert str(datetime.now().year) in expected and '"say \\"hi\\" <b>&</b> café 日本"' in expected


def test_raise_exception_and_sandbox(tokenizers):
    _, ref = tokenizers
    bad = [{"role": "robot", "content": "x"}]
    with pytest.raises(ChatTemplateError, match="refused the conversation: unknown role: robot"):
        render_chat(FEATURES, bad)
    with pytest.raises(Exception, match="unknown role: robot"):
        ref.apply_chat_template(bad, chat_template=FEATURES, tokenize=False)
    escape = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(ChatTemplateError, match="refused"):
        render_chat(escape, MESSAGES)
    with pytest.raises(ChatTemplateError, match="does not compile"):
        render_chat("{% for m in messages %}", MESSAGES)


@pytest.mark.parametrize(
    "template, failure",
    [
        ("{{ messages | length + 'x' }}", "TypeError"),  # Python's own error, not a jinja one
        ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "RecursionError"),
    ],
)
def test_a_template_that_fails_at_run_time_is_a_chat_template_error(template, failure):
    with pytest.raises(ChatTemplateError, match=f"failed on the conversation: {failure}"):
        render_chat(template, MESSAGES)
    with pytest.raises(ChatTemplateError, match="must be a string of jinja2 text, got int"):
        render_chat(3, MESSAGES)


def test_tokenizer_directories_as_transformers_reads_them(tmp_path):
    """Special tokens kept only in special_tokens_map.json (older checkpoints); truncation / padding settings a
    tokenizer.json carries from training (transformers ignores them unless asked); a template file not in UTF-8."""
    from tokenizers import Tokenizer

    write_tokenizer(tmp_path)
    config_path = tmp_path / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    eos = config.pop("eos_token")
    config_path.write_text(json.dumps(config))
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"eos_token": {"content": eos}}))
    backend = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    backend.enable_truncation(max_length=3)
    backend.enable_padding(length=12, pad_id=1, pad_token="<|endoftext|>")
    backend.save(str(tmp_path / "tokenizer.json"))
    ours, ref = ctxlab.load_tokenizer(tmp_path), transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert ours.special_tokens["eos_token"] == ref.eos_token == eos
    text = "you are a helpful ai named smollm"
    assert ours.encode(text, add_special_tokens=False) == ref.encode(text, add_special_tokens=False)
    assert len(ours.encode(text, add_special_tokens=False)) == 7
    (tmp_path / "chat_template.jinja").write_bytes(b"\xff{{ messages }}")
    with pytest.raises(ctxlab.CheckpointError, match=r"chat_template.jinja: not UTF-8 text"):
        ctxlab.load_tokenizer(tmp_path)
