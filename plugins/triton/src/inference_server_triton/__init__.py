"""NVIDIA Triton Inference Server provider: OpenAI chat over Triton's generate extension.

Triton serves tensors, not chats: this plugin renders the conversation into a prompt with a chat
template per model, maps OpenAI sampling fields to the model's input tensors (typed from
``GET /v2/models/{m}``), calls ``/generate`` or ``/generate_stream`` and turns the answers back into
``chat.completion`` objects and chunks, with stop strings, finish reasons and usage.  See
:mod:`inference_server_triton.provider` for the wire facts it relies on.

Settings (``providers.<name>``, besides the core keys)::

    triton:
      plugin: triton
      base_url: "http://127.0.0.1:8000"
      metadata_cache_secs: 60
      model_defaults: {chat_template: chatml}
      models:
        ensemble: {chat_template: llama3, inputs: {max_tokens: max_tokens}, stream_output: delta}
"""

from __future__ import annotations

from inference_server.providers import ProviderPlugin, Setting
from inference_server_triton.options import ModelOptions, TritonConfigError
from inference_server_triton.provider import TritonProvider, validate_options

__all__ = ["ModelOptions", "TritonConfigError", "TritonProvider", "plugin", "validate_options"]

plugin = ProviderPlugin(
    name="triton",
    factory=TritonProvider,
    validate_options=validate_options,
    settings={
        "models": Setting(
            (dict,),
            {},
            description="upstream model name → its options (chat_template, inputs, outputs, "
            "stream_output, ...); listed by /v1/models when Triton knows them",
        ),
        "model_defaults": Setting(
            (dict,),
            {},
            description="options applied under every model's own (and to unlisted models)",
        ),
        "metadata_cache_secs": Setting(
            (int, float),
            60,
            gte=0,
            lte=86400,
            description="how long a model's metadata (input names and types) is reused; 0: never",
        ),
    },
    default_base_url="http://127.0.0.1:8000",
)
