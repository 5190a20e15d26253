"""Chat messages → one prompt string, through a Jinja chat template per model.

Why: Triton's generate extension takes raw text (``text_input``); the chat framing a model was
trained on (ChatML, Llama 3 headers, Llama 2 ``[INST]``) is the gateway's job.  Templates run in
Jinja's *immutable sandbox* because custom templates come from settings files that operators copy
from model cards: the sandbox stops attribute access to Python internals and mutation of the
objects we pass in.  Messages are checked here too: a model whose template cannot express tools or
images gets a clear 400 naming the offending field, instead of a prompt that silently drops them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NoReturn

import jinja2
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from inference_server.providers import GatewayError, InvalidRequest

CHATML = (
    "{% for m in messages %}"
    "<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

LLAMA3 = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "<|start_header_id|>{{ m.role }}<|end_header_id|>\n\n{{ m.content | trim }}<|eot_id|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)

# Llama 2 folds the system prompt into the first user turn; other turns alternate.
LLAMA2 = (
    "{% if messages and messages[0].role == 'system' %}"
    "{% set system = messages[0].content %}{% set turns = messages[1:] %}"
    "{% else %}{% set system = '' %}{% set turns = messages %}{% endif %}"
    "{% for m in turns %}"
    "{% if m.role == 'user' %}"
    "{{ bos_token }}[INST] "
    "{% if loop.first and system %}<<SYS>>\n{{ system }}\n<</SYS>>\n\n{% endif %}"
    "{{ m.content | trim }} [/INST]"
    "{% elif m.role == 'assistant' %} {{ m.content | trim }} {{ eos_token }}"
    "{% endif %}"
    "{% endfor %}"
)

#: Built-in templates by name, with the special tokens each one expects by default.
PRESETS: dict[str, tuple[str, dict[str, str]]] = {
    "chatml": (CHATML, {}),
    "llama3": (LLAMA3, {"bos_token": "<|begin_of_text|>"}),
    "llama": (LLAMA3, {"bos_token": "<|begin_of_text|>"}),
    "llama2": (LLAMA2, {"bos_token": "<s>", "eos_token": "</s>"}),
}

_IMAGE_PARTS = frozenset({"image_url", "input_image", "image"})


def _raise_exception(message: str) -> NoReturn:
    """Hugging Face chat templates call ``raise_exception(...)`` for unsupported conversations."""
    raise jinja2.TemplateError(message)


# autoescape is off on purpose: the output is a model prompt, not HTML.
_ENV = ImmutableSandboxedEnvironment(
    trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True
)
_ENV.globals["raise_exception"] = _raise_exception


def looks_like_template(value: str) -> bool:
    """A custom template (Jinja syntax), as opposed to a preset name."""
    return "{{" in value or "{%" in value


class ChatTemplate:
    """A compiled chat template plus the variables it renders with."""

    __slots__ = ("_template", "_variables", "name")

    def __init__(self, spec: str, variables: Mapping[str, Any] | None = None) -> None:
        """Compile preset ``spec`` or the Jinja source ``spec``; ValueError if it is neither."""
        preset_vars: dict[str, str] = {}
        if looks_like_template(spec):
            source = spec
            self.name = "custom"
        elif spec.strip().lower() in PRESETS:
            self.name = spec.strip().lower()
            source, preset_vars = PRESETS[self.name]
        else:
            raise ValueError(
                f"unknown chat template preset {spec!r} (presets: {', '.join(PRESETS)}; "
                "or give a Jinja template string)"
            )
        try:
            self._template = _ENV.from_string(source)
        except jinja2.TemplateSyntaxError as exc:
            raise ValueError(
                f"chat template does not compile: {exc.message} (line {exc.lineno})"
            ) from exc
        self._variables: dict[str, Any] = {
            "bos_token": "",
            "eos_token": "",
            **preset_vars,
            **(variables or {}),
        }

    def render(self, messages: list[dict[str, Any]], tools: list[Any] | None) -> str:
        """The prompt for ``messages``; a template's own complaint becomes a 400 on ``messages``."""
        try:
            return self._template.render(
                messages=messages,
                tools=tools,
                add_generation_prompt=True,
                **self._variables,
            )
        except SecurityError as exc:
            raise GatewayError(
                f"The chat template tried an unsafe operation: {exc}", code="TEMPLATE_ERROR"
            ) from exc
        except jinja2.TemplateError as exc:
            raise InvalidRequest(
                f"The model's chat template rejected the conversation: {exc.message or exc}",
                code="INVALID_REQUEST",
                param="messages",
            ) from exc


def prepare_messages(
    request: Mapping[str, Any],
    *,
    model: str,
    supports_tools: bool,
    supports_images: bool,
) -> tuple[list[dict[str, Any]], list[Any] | None]:
    """Messages and tools as the template sees them, rejecting what the model cannot take.

    Text content parts are joined with newlines so every template sees a string; with
    ``supports_images`` a message that holds an image keeps its list of parts for the template
    to place.  ``developer`` (OpenAI's newer name for the system role) becomes ``system``.
    """
    tools = request.get("tools") or None
    if tools and request.get("tool_choice") == "none":
        tools = None  # the client forbids calls: a template without tools is exactly right
    if tools and not supports_tools:
        raise InvalidRequest(
            f"Model '{model}' does not support tools (its Triton chat template has no tool "
            "format; set supports_tools for a template that has one)",
            code="UNSUPPORTED_PARAMETER",
            param="tools",
        )
    if request.get("functions") and not supports_tools:
        raise InvalidRequest(
            f"Model '{model}' does not support function calling",
            code="UNSUPPORTED_PARAMETER",
            param="functions",
        )
    out: list[dict[str, Any]] = []
    for i, message in enumerate(request.get("messages") or ()):
        role = message.get("role")
        if not supports_tools:
            if role in ("tool", "function"):
                raise InvalidRequest(
                    f"Model '{model}' does not support tools, so it cannot take a '{role}' message",
                    code="UNSUPPORTED_PARAMETER",
                    param=f"messages.{i}.role",
                )
            for key in ("tool_calls", "function_call"):
                if message.get(key):
                    raise InvalidRequest(
                        f"Model '{model}' does not support tools, so it cannot take {key}",
                        code="UNSUPPORTED_PARAMETER",
                        param=f"messages.{i}.{key}",
                    )
        prepared = dict(message)
        prepared["role"] = "system" if role == "developer" else role
        prepared["content"] = _content(message.get("content"), i, model, supports_images)
        out.append(prepared)
    return out, tools


def _content(content: Any, index: int, model: str, supports_images: bool) -> Any:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts: list[str] = []
    has_image = False
    for j, part in enumerate(content):
        kind = part.get("type")
        if kind == "text":
            texts.append(str(part.get("text") or ""))
        elif kind in _IMAGE_PARTS and supports_images:
            has_image = True
        else:
            what = "images" if kind in _IMAGE_PARTS else f"'{kind}' content"
            raise InvalidRequest(
                f"Model '{model}' does not support {what}",
                code="UNSUPPORTED_PARAMETER",
                param=f"messages.{index}.content.{j}",
            )
    return list(content) if has_image else "\n".join(texts)
