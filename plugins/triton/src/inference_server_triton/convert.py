"""Pure conversions between OpenAI chat requests/responses and Triton's generate extension.

Nothing here does I/O, so every rule is unit-testable on its own:

- :func:`build_body` maps OpenAI sampling fields to the model's input names and types each value
  from the model's metadata.  Triton turns a top-level key that names an input into a tensor of
  the *declared* datatype and rejects JSON that does not fit it (``3.0`` for an INT32 input fails
  with "attempt to access JSON non-signed-integer as signed-integer"); every other key becomes a
  request parameter, which may only be a string, number or bool (a list fails the whole request).
- :class:`StopScanner` cuts generated text at the first stop string even when it arrives split
  across stream events, holding back only a tail that could still start a stop string.
- :class:`Generation` accumulates events (delta or cumulative text, token counts, the model's own
  finish reason) and decides ``finish_reason`` and usage.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from inference_server.providers import InvalidRequest, ProviderBadResponse
from inference_server_triton.options import ModelOptions, StreamOutput

_INT_TYPES = frozenset({"INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64"})
_FLOAT_TYPES = frozenset({"FP16", "FP32", "FP64", "BF16"})
#: Finish reasons models report that mean "the token limit was hit".
_LENGTH_REASONS = frozenset({"length", "max_tokens", "max_length"})


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """One input or output of a model, from ``GET /v2/models/{m}``."""

    name: str
    datatype: str
    shape: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class ModelMetadata:
    """What the plugin needs to know about a served model."""

    name: str
    inputs: Mapping[str, TensorSpec] = field(default_factory=dict)
    outputs: Mapping[str, TensorSpec] = field(default_factory=dict)
    #: From ``GET /v2/models/{m}/config`` (``model_transaction_policy.decoupled``); None: unknown.
    decoupled: bool | None = None
    #: From the config too: the most inputs one request may batch (Triton rejects more);
    #: 0 when unknown or the model does not batch.
    max_batch_size: int = 0

    def find_input(self, name: str) -> TensorSpec | None:
        """The input called ``name`` (exactly, else ignoring case: settings keys are lower-cased)."""
        spec = self.inputs.get(name)
        if spec is not None:
            return spec
        lowered = name.lower()
        return next((s for n, s in self.inputs.items() if n.lower() == lowered), None)


def parse_metadata(payload: Any) -> ModelMetadata:
    """Read a KServe v2 model metadata object; ValueError when it is not one."""
    if not isinstance(payload, dict) or not isinstance(payload.get("name"), str):
        raise ValueError("model metadata has no 'name'")

    def tensors(key: str) -> dict[str, TensorSpec]:
        out: dict[str, TensorSpec] = {}
        for entry in payload.get(key) or ():
            if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
                raise ValueError(f"model metadata has a malformed '{key}' entry")
            shape = entry.get("shape") or ()
            out[entry["name"]] = TensorSpec(
                name=entry["name"],
                datatype=str(entry.get("datatype") or "BYTES").upper(),
                shape=tuple(int(d) for d in shape if isinstance(d, int)),
            )
        return out

    return ModelMetadata(name=payload["name"], inputs=tensors("inputs"), outputs=tensors("outputs"))


def coerce(value: Any, datatype: str, param: str) -> Any:
    """``value`` as JSON that fits a Triton input of ``datatype`` (lists element by element).

    A value that cannot fit (a fractional ``max_tokens`` for INT32, a negative seed for UINT64)
    is the client's 400, reported on the OpenAI field ``param``.
    """
    if isinstance(value, (list, tuple)):
        return [coerce(v, datatype, param) for v in value]
    if datatype == "BOOL":
        if isinstance(value, bool) or value in (0, 1):
            return bool(value)
    elif datatype in _INT_TYPES:
        number = value
        if isinstance(value, float) and value.is_integer():
            number = int(value)
        if isinstance(number, int):
            if datatype.startswith("UINT") and number < 0:
                raise InvalidRequest(
                    f"Invalid value for '{param}': must be >= 0 for this model",
                    code="INVALID_PARAMETER",
                    param=param,
                )
            return int(number)
    elif datatype in _FLOAT_TYPES:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif datatype == "BYTES":
        if isinstance(value, str):
            return value
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, (int, float)):
            return str(value)
        # e.g. vLLM's ``sampling_parameters``: a JSON document in a string tensor.
        return orjson.dumps(value).decode()
    else:  # an unknown datatype: let Triton judge the JSON as it is
        return value
    raise InvalidRequest(
        f"Invalid value for '{param}': {value!r} does not fit the model's {datatype} input",
        code="INVALID_PARAMETER",
        param=param,
    )


def stop_strings(request: Mapping[str, Any], options: ModelOptions) -> list[str]:
    """The request's ``stop`` plus the model's configured stops, without empty strings."""
    stop = request.get("stop")
    given = [stop] if isinstance(stop, str) else list(stop or ())
    return [s for s in dict.fromkeys([*given, *options.stop]) if s]


def requested_max_tokens(request: Mapping[str, Any], options: ModelOptions) -> int | None:
    """``max_completion_tokens`` (the newer name) wins over ``max_tokens``, then the default."""
    for key in ("max_completion_tokens", "max_tokens"):
        value = request.get(key)
        if isinstance(value, float) and value.is_integer():
            value = int(value)  # typed per the model's input later; 8.0 means 8
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return options.default_max_tokens


def build_body(
    *,
    prompt: str,
    request: Mapping[str, Any],
    options: ModelOptions,
    metadata: ModelMetadata,
    stream: bool,
    request_id: str,
) -> dict[str, Any]:
    """The ``/generate`` or ``/generate_stream`` JSON body for one chat request."""
    body: dict[str, Any] = {"id": request_id}
    values: dict[str, Any] = {
        "prompt": prompt,
        "max_tokens": requested_max_tokens(request, options),
        "temperature": request.get("temperature"),
        "top_p": request.get("top_p"),
        "stop": stop_strings(request, options) or None,
        "seed": request.get("seed"),
        "frequency_penalty": request.get("frequency_penalty"),
        "presence_penalty": request.get("presence_penalty"),
        "stream": stream,
    }
    sent: dict[str, tuple[str, Any]] = {}
    for field_name, value in values.items():
        name = options.input_name(field_name)
        if name is not None and value is not None:
            sent[name] = (field_name, value)
    for name, value in (options.extra_inputs or {}).items():
        if value is not None:
            sent[str(name)] = (str(name), value)
    for name, (param, value) in sent.items():
        spec = metadata.find_input(name)
        if spec is not None:
            body[spec.name] = coerce(value, spec.datatype, _openai_param(param))
        elif param == "prompt":
            raise InvalidRequest(
                f"Model '{metadata.name}' has no input '{name}' for the prompt "
                f"(inputs: {', '.join(metadata.inputs) or 'none'}); set inputs.prompt",
                code="MODEL_MISCONFIGURED",
            )
        elif options.send_parameters and isinstance(value, (str, int, float, bool)):
            # Not an input: Triton passes it to the model as a request parameter.
            body[name] = value
    return body


def _openai_param(field_name: str) -> str:
    return "messages" if field_name == "prompt" else field_name


def estimate_tokens(text: str) -> int:
    """~4 characters per token: the usual rule of thumb for BPE vocabularies."""
    return math.ceil(len(text) / 4)


def text_of(value: Any) -> str:
    """A generate response's text output: a string, or a list of strings (multi-element)."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "".join(text_of(v) for v in value)
    return str(value)


def int_of(value: Any) -> int | None:
    """A token count output (a scalar, or a one-element list)."""
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


class StopScanner:
    """Cuts streamed text at the first stop string, across event boundaries.

    ``feed`` returns the text that is safe to emit: everything except a tail that is a prefix of
    some stop string (it may yet complete one).  Once a stop string is complete, ``stopped`` is
    True and the text before it is the last text ever returned.
    """

    __slots__ = ("_held", "_stops", "stopped")

    def __init__(self, stops: list[str]) -> None:
        self._stops = stops
        self._held = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        if self.stopped:
            return ""
        if not self._stops:
            return text
        buf = self._held + text
        cut = min((i for i in (buf.find(s) for s in self._stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            self._held = ""
            return buf[:cut]
        keep = self._partial_tail(buf)
        self._held = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep]

    def flush(self) -> str:
        """At the end of the generation: the held-back tail (it never became a stop string)."""
        held, self._held = self._held, ""
        return "" if self.stopped else held

    def _partial_tail(self, buf: str) -> int:
        """Length of the longest suffix of ``buf`` that is a proper prefix of a stop string."""
        best = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(buf)), best, -1):
                if buf.endswith(stop[:n]):
                    best = n
                    break
        return best


@dataclass(slots=True)
class Generation:
    """One generation as it arrives: text, token counts and the model's own finish reason."""

    options: ModelOptions
    scanner: StopScanner
    max_tokens: int | None
    mode: StreamOutput = "delta"
    #: Text emitted to the client so far (after stop handling).
    text: str = ""
    #: The last cumulative text received (``stream_output: cumulative`` only).
    received: str = field(default="", repr=False)
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    model_finish: str | None = None

    def add(self, event: Mapping[str, Any]) -> str:
        """Take one response object; return the new text that may be sent to the client."""
        o = self.options
        text_name = o.output_name("text") or "text_output"
        piece = text_of(event.get(text_name))
        if self.mode == "cumulative":
            # New text is whatever lies beyond what we already had.  (Should a model ever
            # rewrite earlier text, what was sent cannot be taken back; length still rules.)
            new = piece[len(self.received) :]
            self.received = piece
        else:
            new = piece
        prompt_name = o.output_name("prompt_tokens")
        if prompt_name is not None and prompt_name in event:
            count = int_of(event[prompt_name])
            if count is not None:
                self.prompt_tokens = count
        completion_name = o.output_name("completion_tokens")
        if completion_name is not None and completion_name in event:
            count = int_of(event[completion_name])
            if count is not None:
                # Delta models (e.g. vLLM's num_output_tokens) count this response's tokens;
                # cumulative ones count everything so far.
                if self.mode == "delta" and self.completion_tokens is not None:
                    self.completion_tokens += count
                else:
                    self.completion_tokens = count
        finish_name = o.output_name("finish_reason")
        if finish_name is not None:
            reason = text_of(event.get(finish_name)).strip().lower()
            if reason and reason not in ("none", "null"):
                self.model_finish = reason
        safe = self.scanner.feed(new)
        self.text += safe
        return safe

    def finish(self) -> str:
        """End of the upstream output: the held-back text to send last."""
        tail = self.scanner.flush()
        self.text += tail
        return tail

    @property
    def finish_reason(self) -> str:
        """``stop`` for a stop string or a natural end; ``length`` when the limit was reached."""
        if self.scanner.stopped:
            return "stop"
        if self.model_finish in _LENGTH_REASONS:
            return "length"
        if (
            self.max_tokens is not None
            and self.completion_tokens is not None
            and self.completion_tokens >= self.max_tokens
        ):
            return "length"
        return "stop"

    def usage(self, prompt: str) -> dict[str, int]:
        """Token counts the model reported, each missing one estimated from characters."""
        prompt_tokens = (
            self.prompt_tokens if self.prompt_tokens is not None else estimate_tokens(prompt)
        )
        completion = (
            self.completion_tokens
            if self.completion_tokens is not None
            else estimate_tokens(self.text)
        )
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion,
        }


# --- embeddings (KServe v2 infer) -----------------------------------------------------------

_FLOATS = ("FP32", "FP16", "FP64", "BF16")


def embedding_tensors(meta: ModelMetadata, options: ModelOptions) -> tuple[TensorSpec, TensorSpec]:
    """(text input, vector output) of an embedding model: the configured names (``inputs.
    prompt``, ``outputs.embedding``) when the model has them, else its only BYTES input and its
    first floating-point output; 400 ``UNSUPPORTED`` when the model has no such tensors."""
    source = meta.find_input(options.input_name("prompt") or "")
    if source is None:
        texts = [t for t in meta.inputs.values() if t.datatype == "BYTES"]
        source = texts[0] if len(texts) == 1 else None
    wanted = options.output_name("embedding")
    target = meta.outputs.get(wanted) if wanted else None
    if target is None:
        target = next((t for t in meta.outputs.values() if t.datatype in _FLOATS), None)
    if source is None or target is None:
        raise InvalidRequest(
            f"Triton model '{meta.name}' has no text input and vector output to embed with "
            "(set inputs.prompt and outputs.embedding)",
            code="UNSUPPORTED",
            param="model",
        )
    return source, target


def split_vectors(
    provider: str, model: str, payload: dict[str, Any], name: str, count: int
) -> list[list[float]]:
    """The ``count`` vectors of output ``name`` of an infer response (row-major ``data``)."""
    outputs = payload.get("outputs")
    out = next((o for o in outputs or () if isinstance(o, dict) and o.get("name") == name), None)
    data = out.get("data") if out else None
    shape = out.get("shape") if out else None
    if not isinstance(data, list) or not isinstance(shape, list) or not data:
        raise ProviderBadResponse(
            f"Triton provider '{provider}' returned no '{name}' output for '{model}'"
        )
    width = len(data) // count
    if width * count != len(data) or not all(
        isinstance(x, (int, float)) and not isinstance(x, bool) for x in data
    ):
        raise ProviderBadResponse(
            f"Triton provider '{provider}' returned {len(data)} values of '{name}' for "
            f"{count} inputs of '{model}'"
        )
    return [[float(x) for x in data[i * width : (i + 1) * width]] for i in range(count)]
