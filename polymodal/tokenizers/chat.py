"""Chat templates: render a list of messages into a prompt string with Jinja2.

Rendering follows the conventions of `transformers.apply_chat_template`, so a template taken
from a Hugging Face `tokenizer_config.json`, `chat_template.jinja` or a GGUF file renders to the
same string here:
- a sandboxed, immutable Jinja2 environment (templates from model hubs are untrusted code) with
  `trim_blocks` and `lstrip_blocks` on and the `loopcontrols` extension;
- a `tojson` filter that does not HTML-escape, plus `raise_exception` and `strftime_now` globals;
- a no-op `{% generation %}` block (transformers uses it to mark assistant tokens);
- the template sees `messages`, `add_generation_prompt`, `tools` and `documents` (None unless
  given), the special token strings that are set (`bos_token`, `eos_token`, ...) and any extra
  keyword variables;
- message keys whose value is None are dropped, since many templates test for a key's presence.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

# ChatML, the format SmolLM2 and Qwen2 use. Content may be a string or a list of parts
# (`{"type": "text", "text": ...}` / `{"type": "image"}`), the shape multimodal chat data takes;
# an image part renders as the `<image>` placeholder the multimodal packer expands.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}"
    "{% elif part['type'] == 'image' %}{{ '<image>' }}"
    "{% else %}{{ raise_exception('ChatML template: unsupported content part type ' + part['type']) }}"
    "{% endif %}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class _GenerationBlock(jinja2.ext.Extension):
    """Accepts `{% generation %}...{% endgeneration %}` and renders its body unchanged."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

    def _render_body(self, caller) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any, ensure_ascii: bool = False, indent=None, separators=None, sort_keys: bool = False
) -> str:
    # Jinja's own `tojson` HTML-escapes `<`, `>` and `&`, which would change tool schemas in prompts.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=16)
def compile_chat_template(template: str) -> jinja2.Template:
    """Compile `template` in the sandboxed environment described in the module docstring (cached)."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(template)


def render_chat_template(
    template: str,
    messages: list[dict],
    add_generation_prompt: bool = True,
    special_tokens: dict[str, str | None] | None = None,
    **template_vars: Any,
) -> str:
    """Render `messages` (dicts with at least `role` and `content`) into one prompt string.

    `special_tokens` maps names such as `bos_token` to their strings; names whose value is None
    stay undefined in the template. `template_vars` (e.g. `enable_thinking=False`) override them.
    """
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise TypeError(f"messages must be a list of dicts, got {type(messages).__name__}")
    cleaned = [{key: value for key, value in message.items() if value is not None} for message in messages]
    # `tools` and `documents` are always defined (None when unused), as transformers passes them.
    variables = {"tools": None, "documents": None}
    variables.update({name: value for name, value in (special_tokens or {}).items() if value is not None})
    variables.update(template_vars)
    return compile_chat_template(template).render(
        messages=cleaned, add_generation_prompt=add_generation_prompt, **variables
    )
