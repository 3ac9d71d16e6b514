"""Chat templates render exactly as transformers' ``apply_chat_template(..., tokenize=False)``: whitespace
control, tojson, loop controls, special tokens, raise_exception, the sandbox."""

from __future__ import annotations

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


@pytest.mark.parametrize("template", [FEATURES, CHATML])
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
