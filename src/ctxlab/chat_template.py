"""Chat templates: a model's jinja2 template rendered the way transformers renders it.

Reproduces ``transformers.utils.chat_template_utils._cached_compile_jinja_template`` /
``render_jinja_template`` (5.23): an ``ImmutableSandboxedEnvironment`` (templates come from model
files, i.e. untrusted code) with ``trim_blocks`` and ``lstrip_blocks``, the ``loopcontrols``
extension, a ``tojson`` filter that does not HTML-escape (``json.dumps``, ``ensure_ascii=False``),
the globals ``raise_exception`` and ``strftime_now``, and ``{% generation %}...{% endgeneration %}``
blocks (transformers' ``AssistantTracker``, used by templates written for training) rendered as their
body. The template sees ``messages``, ``add_generation_prompt``, ``tools`` and ``documents`` (None:
ctxlab passes neither), the special tokens the tokenizer has (``bos_token``, ``eos_token``, ...; one
it lacks stays undefined, as in transformers) and any extra keyword.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache

from .errors import CtxlabError


class ChatTemplateError(CtxlabError, ValueError):
    """A chat template that is missing, does not compile, or refuses the conversation."""


def _raise_exception(message: str):
    import jinja2

    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _generation_extension():
    """``{% generation %}...{% endgeneration %}``: transformers marks the assistant's tokens with it (for
    training masks); rendering a prompt, the block is its body."""
    import jinja2.ext
    from jinja2 import nodes

    class Generation(jinja2.ext.Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    return Generation


@lru_cache(maxsize=8)
def compile_template(template: str):
    """The compiled jinja2 template (sandboxed); ChatTemplateError when it does not parse."""
    try:
        import jinja2
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise ImportError("chat templates need jinja2 >= 3.1: pip install jinja2") from None
    if not isinstance(template, str):
        raise ChatTemplateError(f"the chat template must be a string of jinja2 text, got {type(template).__name__}")
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols, _generation_extension()]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ChatTemplateError(f"the chat template does not compile: {e} (line {e.lineno})") from None


def render_chat(
    template: str,
    messages: list[dict],
    add_generation_prompt: bool = True,
    special_tokens: dict[str, str | None] | None = None,
    **extra,
) -> str:
    """The conversation as the model's prompt text.

    ``messages``: ``[{"role": "system" | "user" | "assistant", "content": str}, ...]``;
    ``special_tokens``: ``{"bos_token": "<s>", "eos_token": "</s>", ...}``, passed to the template
    as variables (a template writes ``{{ bos_token }}`` itself; a None one is left undefined, so it
    renders as nothing, not "None"). An error raised by the template (``raise_exception("...")``, or
    any failure of its code) becomes a ChatTemplateError with its message.
    """
    import jinja2

    tokens = {name: value for name, value in (special_tokens or {}).items() if value is not None}
    variables = {"tools": None, "documents": None, **tokens, **extra}
    try:
        return compile_template(template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, **variables
        )
    except jinja2.exceptions.TemplateError as e:
        raise ChatTemplateError(f"the chat template refused the conversation: {e}") from None
    except (TypeError, ValueError, KeyError, AttributeError, IndexError, RecursionError) as e:
        raise ChatTemplateError(f"the chat template failed on the conversation: {type(e).__name__}: {e}") from None
