"""Chat templates: a model's Jinja template (or a built-in one) -> the prompt text.

Rendering follows Hugging Face's `apply_chat_template` so the same template gives the same
text: a sandboxed, immutable Jinja environment with `trim_blocks` and `lstrip_blocks`, the
`loopcontrols` extension, a `tojson` filter and a `raise_exception` callable.

Example::

    >>> render_chat_template(
    ...     fallback_template("chatml"), [{"role": "user", "content": "Hi"}],
    ...     add_generation_prompt=True, bos_token="", eos_token="<|im_end|>")
    '<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\n'
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any, NoReturn

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

# ChatML, as SmolLM2 and Qwen write it, without any default system prompt.
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Gemma 3's own template, text only: no system role (a system message is prepended to the
# first user turn), the assistant is called "model", and the text starts with BOS.
GEMMA_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = '' -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '')"
    " + message['content'] | trim + '<end_of_turn>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
)

FALLBACK_TEMPLATES = {"chatml": CHATML_TEMPLATE, "gemma": GEMMA_TEMPLATE}


def fallback_template(family: str) -> str:
    """The built-in template for a model `family` ("gemma" or "chatml"); ChatML otherwise."""
    return FALLBACK_TEMPLATES.get(family, CHATML_TEMPLATE)


def validate_messages(messages: Any) -> list[dict[str, str]]:
    """Check that `messages` is a non-empty list of {"role": str, "content": str} and return
    plain dict copies; raise ValueError naming the first offending message otherwise."""
    if isinstance(messages, str | bytes) or not isinstance(messages, Sequence):
        raise ValueError(f"messages must be a list of {{role, content}} objects, got {messages!r}")
    if not messages:
        raise ValueError("messages must not be empty")
    checked = []
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ValueError(f"messages[{index}] must be an object, got {type(message).__name__}")
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or not role:
            raise ValueError(f"messages[{index}].role must be a non-empty string, got {role!r}")
        if not isinstance(content, str):
            raise ValueError(
                f"messages[{index}].content must be a string, got {type(content).__name__}"
            )
        checked.append({**{str(k): v for k, v in message.items()}, "role": role})
    return checked


def render_chat_template(
    template: str,
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool = True,
    bos_token: str = "",
    eos_token: str = "",
    **extra: Any,
) -> str:
    """Render `template` over validated `messages`.

    `extra` reaches the template as further variables (e.g. `tools`). Template errors, and
    calls to `raise_exception` from inside the template, raise ValueError.
    """
    checked = validate_messages(messages)
    compiled = _compile(template)
    try:
        return compiled.render(
            messages=checked,
            add_generation_prompt=add_generation_prompt,
            bos_token=bos_token,
            eos_token=eos_token,
            **extra,
        )
    except jinja2.TemplateError as exc:
        raise ValueError(f"chat template failed: {exc}") from exc


class _TemplateRaised(jinja2.TemplateError):
    """What `raise_exception(msg)` inside a template raises."""


def _raise_exception(message: str) -> NoReturn:
    raise _TemplateRaised(message)


def _tojson(value: Any, indent: int | None = None) -> str:
    # Like transformers: keep non-ASCII as is, and do not HTML-escape (the output is a prompt).
    return json.dumps(value, ensure_ascii=False, indent=indent)


def _strftime_now(format_string: str) -> str:
    return datetime.now().strftime(format_string)


@lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    """Compile once per distinct template (a server renders the same few over and over)."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as exc:
        raise ValueError(f"chat template has a syntax error at line {exc.lineno}: {exc}") from exc
