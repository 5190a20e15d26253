"""Per-model options of the triton plugin: parsed and checked once, when the provider is built.

Why a module of its own: the core validates only the plugin's top-level keys (``models`` is "a
mapping" to it), but a Triton model needs a chat template, input and output tensor names and a
streaming mode, and a typo in any of them would otherwise surface as a confusing upstream error on
the first request.  :func:`parse_models` checks every key of every model and reports all problems
at once, naming each key's full path, before the gateway accepts traffic.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

#: OpenAI request fields the plugin can send to a model, each under a configurable input name.
GATEWAY_INPUTS: tuple[str, ...] = (
    "prompt",
    "max_tokens",
    "temperature",
    "top_p",
    "stop",
    "seed",
    "frequency_penalty",
    "presence_penalty",
    "stream",
)

#: Default input names: the TensorRT-LLM / vLLM backend conventions (see protocols.md 4.4).
DEFAULT_INPUTS: dict[str, str | None] = {
    "prompt": "text_input",
    "max_tokens": "max_tokens",
    "temperature": "temperature",
    "top_p": "top_p",
    "stop": "stop_words",
    "seed": "seed",
    "frequency_penalty": "frequency_penalty",
    "presence_penalty": "presence_penalty",
    "stream": "stream",
}

#: What the plugin reads from a generate response, and the default output names.
DEFAULT_OUTPUTS: dict[str, str | None] = {
    "text": "text_output",
    "prompt_tokens": "num_input_tokens",
    "completion_tokens": "num_output_tokens",
    "finish_reason": "finish_reason",
    # /v1/embeddings through KServe v2 ``infer``: the vector output (else the model's first
    # floating-point output).
    "embedding": "embedding",
}

StreamOutput = Literal["delta", "cumulative"]

_MODEL_KEYS = frozenset(
    {
        "name",
        "chat_template",
        "template_vars",
        "version",
        "inputs",
        "outputs",
        "extra_inputs",
        "stream_output",
        "default_max_tokens",
        "stop",
        "supports_tools",
        "supports_images",
        "send_parameters",
        "decoupled",
    }
)
#: Keys whose values are mappings: model_defaults and a model's own entry are merged key by key.
_MERGED_KEYS = ("inputs", "outputs", "extra_inputs", "template_vars")


class TritonConfigError(ValueError):
    """The triton provider's model options are invalid; the message lists every problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__(
            "invalid triton provider settings:\n" + "\n".join(f"  - {p}" for p in problems)
        )
        self.problems = problems


@dataclass(frozen=True, slots=True)
class ModelOptions:
    """How to talk to one Triton model (see the plugin's settings documentation)."""

    #: The model's name in Triton when it differs from its settings key: the gateway lower-cases
    #: settings keys, and Triton names are case-sensitive (used by health and /v1/models).
    name: str | None = None
    #: A preset name (chatml, llama, llama3, llama2) or a Jinja template string.
    chat_template: str = "chatml"
    #: Extra variables for the template (e.g. ``bos_token`` for a Hugging Face template).
    template_vars: Mapping[str, Any] | None = None
    #: Model version to call; None means Triton's choice (the latest ready one).
    version: str | None = None
    #: Gateway field → model input name; None never sends that field.
    inputs: Mapping[str, str | None] | None = None
    #: What to read → model output name; None never reads it.
    outputs: Mapping[str, str | None] | None = None
    #: Constant inputs sent with every request (e.g. ``exclude_input_in_output: true``).
    extra_inputs: Mapping[str, Any] | None = None
    #: Whether each ``/generate_stream`` event carries new text only or all text so far.
    stream_output: StreamOutput = "delta"
    #: ``max_tokens`` sent when the request sets neither max_tokens nor max_completion_tokens.
    default_max_tokens: int | None = None
    #: Stop strings applied to every request besides the request's own ``stop``.
    stop: tuple[str, ...] = ()
    supports_tools: bool = False
    supports_images: bool = False
    #: Send scalar sampling values the model has no input for as Triton request parameters.
    send_parameters: bool = True
    #: True/False forces the endpoint for non-streaming calls; None asks the model's config.
    decoupled: bool | None = None

    def input_name(self, field: str) -> str | None:
        """The model input that receives gateway ``field`` (None: not sent)."""
        names = self.inputs or {}
        return names[field] if field in names else DEFAULT_INPUTS.get(field)

    def output_name(self, what: str) -> str | None:
        """The model output that carries ``what`` (None: not read)."""
        names = self.outputs or {}
        return names[what] if what in names else DEFAULT_OUTPUTS.get(what)


def _is_str_map(value: Any, *, nullable: bool) -> bool:
    return isinstance(value, Mapping) and all(
        (isinstance(v, str) and v) or (nullable and v is None) for v in value.values()
    )


def _check_model(raw: Mapping[str, Any], where: str, problems: list[str]) -> None:
    """Append one problem per invalid key of one model's options."""
    for key, value in raw.items():
        path = f"{where}.{key}"
        if key not in _MODEL_KEYS:
            problems.append(f"{path}: unknown key (known: {', '.join(sorted(_MODEL_KEYS))})")
        elif key == "name":
            if not isinstance(value, str) or not value:
                problems.append(f"{path}: must be the model's name in Triton")
        elif key == "chat_template":
            if not isinstance(value, str) or not value.strip():
                problems.append(f"{path}: must be a preset name or a Jinja template string")
        elif key in ("template_vars", "extra_inputs"):
            if not isinstance(value, Mapping):
                problems.append(f"{path}: must be a mapping")
        elif key == "version":
            if value is not None and (isinstance(value, bool) or not isinstance(value, (str, int))):
                problems.append(f"{path}: must be a version number or string (or null)")
        elif key == "inputs":
            if not _is_str_map(value, nullable=True):
                problems.append(f"{path}: must map gateway fields to input names (or null)")
                continue
            for field, name in value.items():
                if field not in GATEWAY_INPUTS:
                    problems.append(
                        f"{path}.{field}: unknown field (known: {', '.join(GATEWAY_INPUTS)})"
                    )
                elif field == "prompt" and name is None:
                    problems.append(f"{path}.prompt: the prompt input cannot be null")
        elif key == "outputs":
            if not _is_str_map(value, nullable=True):
                problems.append(f"{path}: must map {', '.join(DEFAULT_OUTPUTS)} to output names")
                continue
            for what, name in value.items():
                if what not in DEFAULT_OUTPUTS:
                    problems.append(
                        f"{path}.{what}: unknown output (known: {', '.join(DEFAULT_OUTPUTS)})"
                    )
                elif what == "text" and name is None:
                    problems.append(f"{path}.text: the text output cannot be null")
        elif key == "stream_output":
            if value not in ("delta", "cumulative"):
                problems.append(f"{path}: must be delta or cumulative, got {value!r}")
        elif key == "default_max_tokens":
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1
            ):
                problems.append(f"{path}: must be an integer >= 1 (or null)")
        elif key == "stop":
            if not isinstance(value, list) or not all(isinstance(s, str) and s for s in value):
                problems.append(f"{path}: must be a list of non-empty strings")
        elif key in ("supports_tools", "supports_images", "send_parameters"):
            if not isinstance(value, bool):
                problems.append(f"{path}: must be true or false")
        elif key == "decoupled" and value is not None and not isinstance(value, bool):
            problems.append(f"{path}: must be true, false or null (ask the model's config)")


def _merge(defaults: Mapping[str, Any], own: Mapping[str, Any]) -> dict[str, Any]:
    merged = {**defaults, **own}
    for key in _MERGED_KEYS:
        if isinstance(defaults.get(key), Mapping) and isinstance(own.get(key), Mapping):
            merged[key] = {**defaults[key], **own[key]}
    return merged


def _build(raw: Mapping[str, Any]) -> ModelOptions:
    version = raw.get("version")
    return ModelOptions(
        name=raw.get("name"),
        chat_template=str(raw.get("chat_template", "chatml")),
        template_vars=dict(raw.get("template_vars") or {}),
        version=str(version) if version is not None else None,
        inputs=dict(raw.get("inputs") or {}),
        outputs=dict(raw.get("outputs") or {}),
        extra_inputs=dict(raw.get("extra_inputs") or {}),
        stream_output=raw.get("stream_output", "delta"),
        default_max_tokens=raw.get("default_max_tokens"),
        stop=tuple(raw.get("stop") or ()),
        supports_tools=bool(raw.get("supports_tools", False)),
        supports_images=bool(raw.get("supports_images", False)),
        send_parameters=bool(raw.get("send_parameters", True)),
        decoupled=raw.get("decoupled"),
    )


def parse_models(
    models: Any, defaults: Any, where: str
) -> tuple[dict[str, ModelOptions], ModelOptions]:
    """Validate the ``models`` and ``model_defaults`` options.

    Returns (upstream model name → options, options for a model that is not listed); raises
    :class:`TritonConfigError` naming every invalid key under ``where`` (``providers.<name>``).
    """
    problems: list[str] = []
    if defaults is None:
        defaults = {}
    if not isinstance(defaults, Mapping):
        raise TritonConfigError([f"{where}.model_defaults: must be a mapping"])
    _check_model(defaults, f"{where}.model_defaults", problems)
    if models is None:
        models = {}
    if not isinstance(models, Mapping):
        raise TritonConfigError([f"{where}.models: must map upstream model names to options"])
    parsed: dict[str, ModelOptions] = {}
    for name, own in models.items():
        if own is None:
            own = {}
        if not isinstance(own, Mapping):
            problems.append(f"{where}.models.{name}: must be a mapping of options (or empty)")
            continue
        _check_model(own, f"{where}.models.{name}", problems)
        parsed[str(name)] = _build(_merge(defaults, own))
    if problems:
        raise TritonConfigError(problems)
    return parsed, _build(defaults)
