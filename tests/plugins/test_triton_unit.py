"""Unit tier for the triton plugin: pure conversions, and real aiohttp calls answered by
aioresponses (``http_mock``).

What is pinned here and why: the rules a real Triton enforces but rarely shows in a small test
(an INT32 input rejects ``3.0``; a list request parameter fails the whole request), the shapes of
Triton's answers (``{"error": ...}`` under HTTP 200, SSE without ``[DONE]``, a traceback under 400
with ``text/event-stream``), stop strings split across stream events, delta vs cumulative text,
chat-template rendering in the sandbox, and the 400s for tools and images a model cannot take.
The real-server tier (tests/real/test_triton_real.py) proves the same against tritonserver.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
from aioresponses import aioresponses
from inference_server_triton import TritonConfigError, TritonProvider, plugin, validate_options
from inference_server_triton.convert import (
    Generation,
    ModelMetadata,
    StopScanner,
    TensorSpec,
    build_body,
    coerce,
    parse_metadata,
)
from inference_server_triton.options import ModelOptions
from inference_server_triton.templates import ChatTemplate, prepare_messages
from yarl import URL

from inference_server.providers import (
    CallContext,
    GatewayError,
    InvalidRequest,
    ProviderConnectionFailed,
    ProviderError,
    ProviderRejected,
    StreamInterrupted,
    Timeouts,
)
from inference_server.settings import Settings
from tests.conftest import GatewayFactory, SettingsFactory
from tests.support.procs import free_port

BASE = "http://triton.test:8000"
TIMEOUTS = Timeouts(connect=2, total=5, first_byte=5, idle=5)
USER = [{"role": "user", "content": "Hi there"}]

#: What ``GET /v2/models/llm`` answers for a TensorRT-LLM-like ensemble.
LLM_METADATA: dict[str, Any] = {
    "name": "llm",
    "versions": ["1"],
    "platform": "ensemble",
    "inputs": [
        {"name": "text_input", "datatype": "BYTES", "shape": [-1, 1]},
        {"name": "max_tokens", "datatype": "INT32", "shape": [-1, 1]},
        {"name": "temperature", "datatype": "FP32", "shape": [-1, 1]},
        {"name": "stop_words", "datatype": "BYTES", "shape": [-1, -1]},
        {"name": "seed", "datatype": "UINT64", "shape": [-1, 1]},
        {"name": "stream", "datatype": "BOOL", "shape": [-1, 1]},
    ],
    "outputs": [{"name": "text_output", "datatype": "BYTES", "shape": [-1, 1]}],
}


def model_url(model: str = "llm") -> str:
    return f"{BASE}/v2/models/{model}"


def sse(*events: dict[str, Any]) -> bytes:
    """A ``/generate_stream`` body: ``data:`` events and no ``[DONE]`` (Triton ends at EOF)."""
    return b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events)


def make_provider(
    session: aiohttp.ClientSession, models: dict[str, Any] | None = None, **options: Any
) -> TritonProvider:
    from inference_server.providers import ProviderConfig

    config = ProviderConfig(
        name="tri",
        plugin="triton",
        base_url=BASE,
        api_key=None,
        timeouts=TIMEOUTS,
        max_retries=0,
        options={
            "models": {"llm": {}} if models is None else models,
            "model_defaults": {},
            "metadata_cache_secs": 60,
            **options,
        },
    )
    return TritonProvider(session, config)


def ctx(model: str = "llm") -> CallContext:
    return CallContext(request_id="req_unit", upstream_model=model, timeouts=TIMEOUTS)


def mock_model(
    http_mock: aioresponses,
    model: str = "llm",
    metadata: dict[str, Any] | None = None,
    *,
    decoupled: bool = False,
) -> None:
    """Answer the metadata and config probes of ``model`` (as often as asked)."""
    meta = dict(metadata or LLM_METADATA, name=model)
    http_mock.get(model_url(model), payload=meta, repeat=True)
    http_mock.get(
        f"{model_url(model)}/config",
        payload={"name": model, "model_transaction_policy": {"decoupled": decoupled}},
        repeat=True,
    )


def sent_bodies(http_mock: aioresponses, url: str) -> list[dict[str, Any]]:
    """The JSON bodies the provider POSTed to ``url``."""
    calls = http_mock.requests.get(("POST", URL(url)), [])
    return [json.loads(call.kwargs["data"]) for call in calls]


async def collect(chunks: AsyncIterator[dict[str, Any]]) -> list[dict[str, Any]]:
    return [c async for c in chunks]


def contents(chunks: list[dict[str, Any]]) -> str:
    return "".join(
        c["choices"][0]["delta"].get("content") or "" for c in chunks if c.get("choices")
    )


# --- chat templates ------------------------------------------------------------------------


def test_chatml_preset_renders_the_conversation_with_a_generation_prompt() -> None:
    template = ChatTemplate("chatml")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert template.render(messages, None) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_llama_preset_is_llama3_with_its_begin_of_text_token() -> None:
    rendered = ChatTemplate("llama").render([{"role": "user", "content": " Hi "}], None)
    assert rendered == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert ChatTemplate("llama3").render([{"role": "user", "content": "Hi"}], None) == rendered


def test_llama2_preset_folds_the_system_prompt_into_the_first_turn() -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Again"},
    ]
    assert ChatTemplate("llama2").render(messages, None) == (
        "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello </s><s>[INST] Again [/INST]"
    )


def test_custom_template_string_gets_messages_tools_and_template_vars() -> None:
    template = ChatTemplate(
        "{{ bos_token }}{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
        "{% if tools %}tools={{ tools | length }}\n{% endif %}"
        "{% if add_generation_prompt %}assistant:{% endif %}",
        {"bos_token": "<BOS>"},
    )
    rendered = template.render([{"role": "user", "content": "Hi"}], [{"type": "function"}])
    assert rendered == "<BOS>user: Hi\ntools=1\nassistant:"


def test_template_runs_in_a_sandbox() -> None:
    template = ChatTemplate("{{ messages.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(GatewayError) as info:
        template.render(USER, None)
    assert info.value.code == "TEMPLATE_ERROR"


def test_raise_exception_in_a_template_is_the_clients_400_on_messages() -> None:
    template = ChatTemplate(
        "{% if messages[0].role != 'system' %}{{ raise_exception('need a system prompt') }}"
        "{% endif %}"
    )
    with pytest.raises(InvalidRequest) as info:
        template.render(USER, None)
    assert info.value.param == "messages"
    assert "need a system prompt" in info.value.message


def test_unknown_preset_and_broken_template_fail_when_the_provider_is_built(
    session: aiohttp.ClientSession,
) -> None:
    with pytest.raises(TritonConfigError) as info:
        make_provider(
            session,
            {"a": {"chat_template": "chatlm"}, "b": {"chat_template": "{% for m in messages %}"}},
        )
    text = str(info.value)
    assert "providers.tri.models.a.chat_template: unknown chat template preset 'chatlm'" in text
    assert "providers.tri.models.b.chat_template: chat template does not compile" in text


def test_invalid_model_options_are_all_reported_with_their_paths(
    session: aiohttp.ClientSession,
) -> None:
    with pytest.raises(TritonConfigError) as info:
        make_provider(
            session,
            {
                "llm": {
                    "stream_output": "chunked",
                    "inputs": {"max_tokns": "max_tokens", "prompt": None},
                    "default_max_tokens": 0,
                    "colour": "blue",
                }
            },
        )
    problems = info.value.problems
    assert "providers.tri.models.llm.stream_output: must be delta or cumulative, got 'chunked'" in (
        problems
    )
    assert any(
        p.startswith("providers.tri.models.llm.inputs.max_tokns: unknown field") for p in problems
    )
    assert "providers.tri.models.llm.inputs.prompt: the prompt input cannot be null" in problems
    assert any(p.startswith("providers.tri.models.llm.default_max_tokens:") for p in problems)
    assert any(p.startswith("providers.tri.models.llm.colour: unknown key") for p in problems)


def test_validate_options_lists_problems_for_a_start_up_check() -> None:
    assert validate_options("tri", {"models": {"llm": {"chat_template": "llama2"}}}) == []
    assert validate_options("tri", {"models": {"llm": {"supports_tools": "yes"}}}) == [
        "providers.tri.models.llm.supports_tools: must be true or false"
    ]


def test_model_defaults_apply_under_each_model_and_to_unlisted_models(
    session: aiohttp.ClientSession,
) -> None:
    provider = make_provider(
        session,
        {"llm": {"inputs": {"max_tokens": "max_new_tokens"}}},
        model_defaults={"chat_template": "llama3", "inputs": {"seed": "random_seed"}},
    )
    llm = provider.options_for("LLM")  # settings keys are lower-cased; Triton names are not
    assert (llm.chat_template, llm.input_name("max_tokens"), llm.input_name("seed")) == (
        "llama3",
        "max_new_tokens",
        "random_seed",
    )
    other = provider.options_for("other")
    assert (other.chat_template, other.input_name("max_tokens")) == ("llama3", "max_tokens")


# --- what a model cannot take --------------------------------------------------------------


def _prepare(request: dict[str, Any], **caps: bool) -> tuple[list[dict[str, Any]], Any]:
    return prepare_messages(
        request,
        model="llm",
        supports_tools=caps.get("tools", False),
        supports_images=caps.get("images", False),
    )


TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}


def test_tools_are_rejected_with_param_tools_unless_the_model_supports_them() -> None:
    with pytest.raises(InvalidRequest) as info:
        _prepare({"messages": USER, "tools": [TOOL]})
    assert info.value.param == "tools"
    assert info.value.http_status == 400
    assert info.value.code == "UNSUPPORTED_PARAMETER"
    _, tools = _prepare({"messages": USER, "tools": [TOOL]}, tools=True)
    assert tools == [TOOL]


def test_tool_choice_none_lets_a_request_with_tools_through_without_them() -> None:
    _, tools = _prepare({"messages": USER, "tools": [TOOL], "tool_choice": "none"})
    assert tools is None


def test_tool_messages_and_tool_calls_are_rejected_where_they_are() -> None:
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    history = [
        *USER,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": "42"},
    ]
    with pytest.raises(InvalidRequest) as info:
        _prepare({"messages": history})
    assert info.value.param == "messages.1.tool_calls"
    with pytest.raises(InvalidRequest) as info:
        _prepare({"messages": [*USER, history[2]]})
    assert info.value.param == "messages.1.role"


def test_images_are_rejected_with_the_part_that_holds_them() -> None:
    message = {
        "role": "user",
        "content": [
            {"type": "text", "text": "What is this?"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
        ],
    }
    with pytest.raises(InvalidRequest) as info:
        _prepare({"messages": [message]})
    assert info.value.param == "messages.0.content.1"
    assert "does not support images" in info.value.message
    messages, _ = _prepare({"messages": [message]}, images=True)
    assert messages[0]["content"] == message["content"]  # the template places the image


def test_text_parts_are_joined_and_developer_becomes_system() -> None:
    messages, _ = _prepare(
        {
            "messages": [
                {"role": "developer", "content": "Be brief."},
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
                },
            ]
        }
    )
    assert [(m["role"], m["content"]) for m in messages] == [
        ("system", "Be brief."),
        ("user", "a\nb"),
    ]


# --- parameter mapping and typing ----------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "datatype", "expected"),
    [
        (3.0, "INT32", 3),
        (3, "FP32", 3.0),
        (True, "BOOL", True),
        (7, "UINT64", 7),
        (["a", "b"], "BYTES", ["a", "b"]),
        (0.5, "BYTES", "0.5"),
        ({"temperature": 0.5}, "BYTES", '{"temperature":0.5}'),
    ],
)
def test_values_are_typed_by_the_input_datatype(value: Any, datatype: str, expected: Any) -> None:
    result = coerce(value, datatype, "p")
    assert result == expected
    assert type(result) is type(expected)


@pytest.mark.parametrize(
    ("value", "datatype"), [(3.5, "INT32"), (-1, "UINT64"), ("x", "FP32"), (2, "BOOL")]
)
def test_values_that_cannot_fit_the_input_are_the_clients_400(value: Any, datatype: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        coerce(value, datatype, "seed")
    assert info.value.param == "seed"


def test_metadata_parses_inputs_outputs_and_shapes() -> None:
    meta = parse_metadata(LLM_METADATA)
    assert meta.inputs["max_tokens"] == TensorSpec("max_tokens", "INT32", (-1, 1))
    assert list(meta.outputs) == ["text_output"]
    with pytest.raises(ValueError, match="no 'name'"):
        parse_metadata({"error": "nope"})


def test_body_maps_fields_to_configured_inputs_typed_from_metadata() -> None:
    options = ModelOptions(
        inputs={"prompt": "PROMPT", "max_tokens": "max_new_tokens", "top_p": None},
        extra_inputs={"return_num_output_tokens": True},
        stop=("</s>",),
    )
    meta = ModelMetadata(
        name="m",
        inputs={
            "PROMPT": TensorSpec("PROMPT", "BYTES"),
            "max_new_tokens": TensorSpec("max_new_tokens", "INT64"),
            "temperature": TensorSpec("temperature", "FP32"),
            "stop_words": TensorSpec("stop_words", "BYTES"),
            # Settings keys arrive lower-cased; the input is matched ignoring case.
            "RETURN_NUM_OUTPUT_TOKENS": TensorSpec("RETURN_NUM_OUTPUT_TOKENS", "BOOL"),
        },
    )
    body = build_body(
        prompt="P",
        request={
            "max_completion_tokens": 8.0,
            "max_tokens": 99,
            "temperature": 1,
            "top_p": 0.5,
            "stop": "END",
            "seed": 5,
            "presence_penalty": 0.1,
        },
        options=options,
        metadata=meta,
        stream=True,
        request_id="r1",
    )
    assert body == {
        "id": "r1",
        "PROMPT": "P",
        "max_new_tokens": 8,  # max_completion_tokens wins, typed INT64
        "temperature": 1.0,
        "stop_words": ["END", "</s>"],
        "RETURN_NUM_OUTPUT_TOKENS": True,
        # not inputs of this model: scalars ride along as Triton request parameters
        "seed": 5,
        "presence_penalty": 0.1,
        "stream": True,
    }
    assert isinstance(body["max_new_tokens"], int)
    assert isinstance(body["temperature"], float)


def test_body_never_sends_a_list_as_a_parameter_and_can_drop_parameters() -> None:
    meta = ModelMetadata(name="m", inputs={"text_input": TensorSpec("text_input", "BYTES")})
    request = {"stop": ["x"], "seed": 3}
    body = build_body(
        prompt="P",
        request=request,
        options=ModelOptions(),
        metadata=meta,
        stream=False,
        request_id="r",
    )
    assert "stop_words" not in body  # Triton rejects a list parameter: "has invalid type"
    assert body["seed"] == 3
    body = build_body(
        prompt="P",
        request=request,
        options=ModelOptions(send_parameters=False, default_max_tokens=16),
        metadata=meta,
        stream=False,
        request_id="r",
    )
    assert body == {"id": "r", "text_input": "P"}


def test_a_model_without_the_prompt_input_is_a_clear_error() -> None:
    meta = ModelMetadata(name="m", inputs={"INPUT0": TensorSpec("INPUT0", "FP32")})
    with pytest.raises(InvalidRequest, match="has no input 'text_input' for the prompt"):
        build_body(
            prompt="P",
            request={},
            options=ModelOptions(),
            metadata=meta,
            stream=False,
            request_id="r",
        )


# --- stop strings, delta and cumulative text -----------------------------------------------


def feed_all(scanner: StopScanner, pieces: list[str]) -> str:
    out = "".join(scanner.feed(p) for p in pieces)
    return out + scanner.flush()


def test_stop_string_split_across_events_is_cut_and_nothing_after_it_leaks() -> None:
    scanner = StopScanner(["STOP"])
    assert scanner.feed("Hello S") == "Hello "  # "S" may start "STOP": held back
    assert scanner.feed("T") == ""
    assert scanner.feed("OP and more") == ""
    assert scanner.stopped
    assert scanner.feed("later") == ""
    assert scanner.flush() == ""


def test_a_held_back_prefix_that_never_becomes_a_stop_is_released() -> None:
    scanner = StopScanner(["STOP"])
    assert scanner.feed("a ST") == "a "
    assert scanner.feed("ARTS") == "START"  # the last "S" could still start "STOP"
    assert scanner.flush() == "S"
    assert not scanner.stopped


def test_the_earliest_of_several_stop_strings_wins_even_one_char_at_a_time() -> None:
    text = "one two<|im_end|>three\n\nfour"
    assert feed_all(StopScanner(["\n\n", "<|im_end|>"]), list(text)) == "one two"
    assert feed_all(StopScanner(["\n\n", "<|im_end|>"]), [text]) == "one two"
    assert feed_all(StopScanner([]), list(text)) == text


def test_overlapping_stop_prefixes_are_handled() -> None:
    assert feed_all(StopScanner(["aab"]), ["xa", "a", "aab", "zz"]) == "xaa"


def _generation(
    mode: str = "delta", stops: list[str] | None = None, max_tokens: int | None = None
) -> Generation:
    return Generation(
        options=ModelOptions(stream_output=mode),  # type: ignore[arg-type]
        scanner=StopScanner(stops or []),
        max_tokens=max_tokens,
        mode=mode,  # type: ignore[arg-type]
    )


def test_cumulative_outputs_are_turned_into_deltas() -> None:
    gen = _generation("cumulative")
    pieces = [gen.add({"text_output": t}) for t in ["He", "Hello", "Hello", "Hello world"]]
    assert pieces == ["He", "llo", "", " world"]
    assert gen.text == "Hello world"


def test_delta_counts_add_up_and_cumulative_counts_are_taken_as_they_are() -> None:
    delta = _generation("delta")
    for n in (2, 3):
        delta.add({"text_output": "x", "num_output_tokens": n, "num_input_tokens": [7]})
    assert delta.usage("prompt")["completion_tokens"] == 5
    assert delta.usage("prompt")["prompt_tokens"] == 7
    cumulative = _generation("cumulative")
    for n in (2, 5):
        cumulative.add({"text_output": "x" * n, "num_output_tokens": n})
    assert cumulative.usage("prompt")["completion_tokens"] == 5


def test_usage_is_estimated_from_characters_when_the_model_reports_none() -> None:
    gen = _generation()
    gen.add({"text_output": "123456789"})
    assert gen.usage("x" * 10) == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}


def test_finish_reason_is_length_when_the_model_says_so_or_the_count_hits_the_limit() -> None:
    said = _generation()
    said.add({"text_output": "a", "finish_reason": "length"})
    assert said.finish_reason == "length"
    counted = _generation(max_tokens=2)
    counted.add({"text_output": "a b", "num_output_tokens": 2})
    assert counted.finish_reason == "length"
    natural = _generation(max_tokens=5)
    natural.add({"text_output": "a b", "num_output_tokens": 2, "finish_reason": "stop"})
    assert natural.finish_reason == "stop"
    stopped = _generation(stops=["b"], max_tokens=2)
    stopped.add({"text_output": "a b", "num_output_tokens": 2})
    assert (stopped.text, stopped.finish_reason) == ("a ", "stop")


# --- /generate -----------------------------------------------------------------------------


async def test_chat_calls_generate_with_typed_inputs_and_converts_the_answer(
    http_mock: aioresponses, session: aiohttp.ClientSession
) -> None:
    mock_model(http_mock)
    http_mock.post(
        f"{model_url()}/generate",
        payload={
            "id": "req_unit",
            "model_name": "llm",
            "model_version": "1",
            "text_output": "Hello!<|im_end|>junk",
        },
    )
    provider = make_provider(session, {"llm": {"stop": ["<|im_end|>"]}})
    result = await provider.chat(
        {"messages": USER, "max_tokens": 4.0, "temperature": 1, "seed": 1}, ctx()
    )
    assert result["object"] == "chat.completion"
    assert result["model"] == "llm"
    assert result["choices"][0]["message"] == {
        "role": "assistant",
        "content": "Hello!",
        "refusal": None,
    }
    assert result["choices"][0]["finish_reason"] == "stop"
    prompt = "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
    assert result["usage"] == {
        "prompt_tokens": -(-len(prompt) // 4),
        "completion_tokens": 2,  # "Hello!": 6 characters / 4, rounded up
        "total_tokens": -(-len(prompt) // 4) + 2,
    }
    [body] = sent_bodies(http_mock, f"{model_url()}/generate")
    assert body == {
        "id": "req_unit",
        "text_input": prompt,
        "max_tokens": 4,
        "temperature": 1.0,
        "stop_words": ["<|im_end|>"],
        "seed": 1,
        "stream": False,
    }


async def test_token_counts_and_finish_reason_come_from_configured_outputs(
    http_mock: aioresponses, session: aiohttp.ClientSession
) -> None:
    mock_model(http_mock)
    http_mock.post(
        f"{model_url()}/generate",
        payload={"text_output": "a b c", "n_in": [11], "n_out": 3, "why": "length"},
    )
    outputs = {"prompt_tokens": "n_in", "completion_tokens": "n_out", "finish_reason": "why"}
    provider = make_provider(session, {"llm": {"outputs": outputs}})
    result = await provider.chat({"messages": USER, "max_tokens": 3}, ctx())
    assert result["usage"] == {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14}
    assert result["choices"][0]["finish_reason"] == "length"


async def test_metadata_is_read_once_and_reused(
    http_mock: aioresponses, session: aiohttp.ClientSession
) -> None:
    mock_model(http_mock)
    http_mock.post(f"{model_url()}/generate", payload={"text_output": "x"}, repeat=True)
    provider = make_provider(session)
    for _ in range(3):
        await provider.chat({"messages": USER}, ctx())
    assert len(http_mock.requests[("GET", URL(model_url()))]) == 1


async def test_model_names_are_quoted_into_the_url(
    http_mock: aioresponses, session: aiohttp.ClientSession
) -> None:
    http_mock.get(
        f"{BASE}/v2/models/a%2F..%2Fb/versions/2",
        status=404,
        body=b'{"error":"Request for unknown model: \'a/../b\' is not found"}',
    )
    provider = make_provider(session, {"a/../b": {"version": 2}})
    with pytest.raises(ProviderRejected):
        await provider.chat({"messages": USER}, ctx("a/../b"))


@pytest.mark.parametrize(
    ("status", "body", "error", "code", "http_status", "retryable"),
    [
        (
            404,
            b'{"error":"Request for unknown model: \'llm\' is not found"}',
            ProviderRejected,
            "MODEL_NOT_FOUND",
            404,
            False,
        ),
        (
            404,
            b'{"error":"Request for unknown model: \'llm\' has no available versions"}',
            ProviderError,
            "MODEL_NOT_READY",
            502,
            True,
        ),
        (
            503,
            b'{"error":"Server not ready"}',
            ProviderError,
            "MODEL_NOT_READY",
            502,
            True,
        ),
    ],
)
async def test_metadata_errors_tell_unknown_from_not_ready(
    http_mock: aioresponses,
    session: aiohttp.ClientSession,
    status: int,
    body: bytes,
    error: type[Exception],
    code: str,
    http_status: int,
    retryable: bool,
) -> None:
    http_mock.get(model_url(), status=status, body=body, content_type="text/plain")
    with pytest.raises(error) as info:
        await make_provider(session).chat({"messages": USER}, ctx())
    assert isinstance(info.value, GatewayError)
    assert (info.value.code, info.value.http_status, info.value.retryable) == (
        code,
        http_status,
        retryable,
    )


async def test_an_error_body_under_200_is_an_error(
    http_mock: aioresponses, session: aiohttp.ClientSession
) -> None:
    mock_model(http_mock)
    http_mock.post(f"{model_url()}/generate", payload={"error": "out of memory"})
    with pytest.raises(ProviderError) as info:
        await make_provider(session).chat({"messages": USER}, ctx())
    assert "out of memory" in info.value.message
    assert info.value.retryable


TRACEBACK = (
    'Traceback (most recent call last):\n  File "/models/llm/model.py", line 9, in execute\n'
    "    raise ValueError('bad prompt')\nValueError: bad prompt\n"
)


async def test_a_traceback_under_400_is_a_non_retryable_rejection(
    http_mock: aioresponses, session: aiohttp.ClientSession
) -> None:
    mock_model(http_mock)
    http_mock.post(
        f"{model_url()}/generate",
        status=400,
        body=json.dumps({"error": TRACEBACK}).encode(),
        content_type="text/plain",
    )
    with pytest.raises(ProviderRejected) as info:
        await make_provider(session).chat({"messages": USER}, ctx())
    err = info.value
    assert (err.code, err.http_status, err.retryable) == ("MODEL_ERROR", 400, False)
    assert err.message.endswith("failed: ValueError: bad prompt")  # no file paths leak


async def test_triton_400_without_traceback_keeps_its_message(
    http_mock: aioresponses, session: aiohttp.ClientSession
) -> None:
    mock_model(http_mock)
    http_mock.post(
        f"{model_url()}/generate",
        status=400,
        body=b"{\"error\":\"unexpected inference input 'wrong' for model 'llm'\"}",
    )
    with pytest.raises(ProviderRejected) as info:
        await make_provider(session).chat({"messages": USER}, ctx())
    assert "unexpected inference input 'wrong'" in info.value.message
    assert not info.value.retryable


async def test_connection_refused_is_provider_connection_failed(
    session: aiohttp.ClientSession,
) -> None:
    from inference_server.providers import ProviderConfig

    config = ProviderConfig(
        name="tri",
        plugin="triton",
        base_url=f"http://127.0.0.1:{free_port()}",
        api_key=None,
        timeouts=TIMEOUTS,
        max_retries=0,
        options={"models": {"llm": {}}, "model_defaults": {}, "metadata_cache_secs": 60},
    )
    provider = TritonProvider(session, config)
    with pytest.raises(ProviderConnectionFailed):
        await provider.chat({"messages": USER}, ctx())
    with pytest.raises(ProviderConnectionFailed):
        await collect(provider.stream_chat({"messages": USER}, ctx()))
    status = await provider.health()
    assert not status.healthy
    assert "Connection failed" in status.detail


async def test_decoupled_models_answer_non_streaming_requests_through_generate_stream(
    http_mock: aioresponses, session: aiohttp.ClientSession
) -> None:
    mock_model(http_mock, decoupled=True)
    http_mock.post(
        f"{model_url()}/generate_stream",
        body=sse({"text_output": "Hel"}, {"text_output": "lo"}),
        content_type="text/event-stream",
    )
    result = await make_provider(session).chat({"messages": USER}, ctx())
    assert result["choices"][0]["message"]["content"] == "Hello"


async def test_generate_refusing_a_multi_response_model_falls_back_to_the_stream_once(
    http_mock: aioresponses, session: aiohttp.ClientSession
) -> None:
    http_mock.get(model_url(), payload=LLM_METADATA, repeat=True)
    http_mock.get(f"{model_url()}/config", status=403, body=b'{"error":"restricted"}')
    http_mock.post(
        f"{model_url()}/generate",
        payload={
            "error": "generate expects model to produce exactly 1 response, use generate "
            "stream for model that generates various number of responses"
        },
    )
    http_mock.post(
        f"{model_url()}/generate_stream",
        body=sse({"text_output": "a"}, {"text_output": "b"}),
        repeat=True,
    )
    provider = make_provider(session)
    for _ in range(2):
        result = await provider.chat({"messages": USER}, ctx())
        assert result["choices"][0]["message"]["content"] == "ab"
    assert len(sent_bodies(http_mock, f"{model_url()}/generate")) == 1  # learned


# --- /generate_stream ----------------------------------------------------------------------


async def test_stream_without_done_ends_at_eof_with_finish_and_usage_chunks(
    http_mock: aioresponses, session: aiohttp.ClientSession
) -> None:
    mock_model(http_mock, decoupled=True)
    http_mock.post(
        f"{model_url()}/generate_stream",
        body=sse(
            {"model_name": "llm", "text_output": "Hel"},
            {"model_name": "llm", "text_output": "lo"},
        ),
        content_type="text/event-stream",
    )
    chunks = await collect(make_provider(session).stream_chat({"messages": USER}, ctx()))
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [c["choices"][0]["delta"] for c in chunks[1:3]] == [
        {"content": "Hel"},
        {"content": "lo"},
    ]
    assert chunks[3]["choices"][0] == {
        "index": 0,
        "delta": {},
        "logprobs": None,
        "finish_reason": "stop",
    }
    assert chunks[4]["choices"] == []
    assert chunks[4]["usage"]["completion_tokens"] == 2  # "Hello": estimated, 5 chars / 4
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert len({c["id"] for c in chunks}) == 1
    [body] = sent_bodies(http_mock, f"{model_url()}/generate_stream")
    assert body["stream"] is True


async def test_stream_cuts_at_a_stop_string_split_across_events(
    http_mock: aioresponses, session: aiohttp.ClientSession
) -> None:
    mock_model(http_mock)
    http_mock.post(
        f"{model_url()}/generate_stream",
        body=sse(
            *({"text_output": t} for t in ["The answer", " is 4", "2.\n", "\nUser:", " more"])
        ),
    )
    chunks = await collect(
        make_provider(session).stream_chat({"messages": USER, "stop": ["\n\nUser:"]}, ctx())
    )
    assert contents(chunks) == "The answer is 42."
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"


async def test_stream_of_cumulative_text_is_sent_as_deltas(
    http_mock: aioresponses, session: aiohttp.ClientSession
) -> None:
    mock_model(http_mock)
    http_mock.post(
        f"{model_url()}/generate_stream",
        body=sse(
            {"text_output": "The", "num_output_tokens": 1},
            {"text_output": "The answer", "num_output_tokens": 2},
            {"text_output": "The answer is", "num_output_tokens": 3, "finish_reason": "length"},
        ),
    )
    provider = make_provider(session, {"llm": {"stream_output": "cumulative"}})
    chunks = await collect(provider.stream_chat({"messages": USER, "max_tokens": 3}, ctx()))
    deltas = [c["choices"][0]["delta"].get("content") for c in chunks[1:-2]]
    assert deltas == ["The", " answer", " is"]
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["usage"]["completion_tokens"] == 3


async def test_an_error_event_mid_stream_interrupts_after_the_chunks_sent(
    http_mock: aioresponses, session: aiohttp.ClientSession
) -> None:
    mock_model(http_mock)
    http_mock.post(
        f"{model_url()}/generate_stream",
        body=sse({"text_output": "a"}, {"text_output": "b"}, {"error": TRACEBACK}),
    )
    received: list[dict[str, Any]] = []

    async def consume() -> None:
        async for chunk in make_provider(session).stream_chat({"messages": USER}, ctx()):
            received.append(chunk)

    with pytest.raises(StreamInterrupted) as info:
        await consume()
    assert contents(received) == "ab"
    assert info.value.message.endswith("failed mid-stream: ValueError: bad prompt")


async def test_an_error_as_the_first_event_is_raised_before_any_chunk(
    http_mock: aioresponses, session: aiohttp.ClientSession
) -> None:
    mock_model(http_mock)
    http_mock.post(f"{model_url()}/generate_stream", body=sse({"error": "model crashed"}))
    stream = make_provider(session).stream_chat({"messages": USER}, ctx())
    with pytest.raises(ProviderError) as info:
        await anext(stream)
    assert not isinstance(info.value, StreamInterrupted)
    assert info.value.retryable


async def test_a_traceback_event_under_400_is_a_rejection_before_the_stream(
    http_mock: aioresponses, session: aiohttp.ClientSession
) -> None:
    mock_model(http_mock)
    http_mock.post(
        f"{model_url()}/generate_stream",
        status=400,
        body=sse({"error": TRACEBACK}),
        content_type="text/event-stream",
    )
    with pytest.raises(ProviderRejected) as info:
        await collect(make_provider(session).stream_chat({"messages": USER}, ctx()))
    assert info.value.code == "MODEL_ERROR"


async def test_tools_and_images_are_rejected_before_any_upstream_call(
    http_mock: aioresponses, session: aiohttp.ClientSession
) -> None:
    provider = make_provider(session)
    with pytest.raises(InvalidRequest) as info:
        await provider.chat({"messages": USER, "tools": [TOOL]}, ctx())
    assert info.value.param == "tools"
    image = {"type": "image_url", "image_url": {"url": "https://x.test/cat.png"}}
    with pytest.raises(InvalidRequest) as info:
        await collect(
            provider.stream_chat({"messages": [{"role": "user", "content": [image]}]}, ctx())
        )
    assert info.value.param == "messages.0.content.0"
    with pytest.raises(InvalidRequest) as info:
        await provider.chat({"messages": USER, "n": 2}, ctx())
    assert info.value.param == "n"
    assert http_mock.requests == {}


# --- health and models ---------------------------------------------------------------------


async def test_health_needs_the_server_and_every_configured_model_ready(
    http_mock: aioresponses, session: aiohttp.ClientSession
) -> None:
    http_mock.get(f"{BASE}/v2/health/ready", status=200, repeat=True)
    http_mock.get(f"{model_url('a')}/ready", status=200, repeat=True)
    http_mock.get(
        f"{model_url('b')}/ready", status=400, body=b'{"error":"Model version not ready"}'
    )
    provider = make_provider(session, {"a": {}, "b": {}})
    status = await provider.health()
    assert not status.healthy
    assert status.detail == "Triton is up; model(s) not ready: b"
    http_mock.get(f"{model_url('b')}/ready", status=200)
    assert (await provider.health()).healthy


async def test_health_and_models_use_the_triton_name_of_a_model(
    http_mock: aioresponses, session: aiohttp.ClientSession
) -> None:
    http_mock.get(f"{BASE}/v2/health/ready", status=200)
    http_mock.get(f"{model_url('Ensemble')}/ready", status=200)
    mock_model(http_mock, "Ensemble")
    provider = make_provider(session, {"ensemble": {"name": "Ensemble"}})
    assert (await provider.health()).healthy
    assert [m.id for m in await provider.list_models()] == ["Ensemble"]
    assert provider.options_for("Ensemble") is provider.models["ensemble"]


async def test_health_reports_a_server_that_is_not_ready(
    http_mock: aioresponses, session: aiohttp.ClientSession
) -> None:
    http_mock.get(f"{BASE}/v2/health/ready", status=400)
    status = await make_provider(session).health()
    assert not status.healthy
    assert "answered 400" in status.detail


async def test_list_models_returns_the_configured_models_triton_knows(
    http_mock: aioresponses, session: aiohttp.ClientSession
) -> None:
    mock_model(http_mock, "a")
    http_mock.get(
        model_url("gone"),
        status=404,
        body=b'{"error":"Request for unknown model: \'gone\' is not found"}',
    )
    models = await make_provider(session, {"a": {}, "gone": {}}).list_models()
    assert [m.id for m in models] == ["a"]


async def test_list_models_without_configured_models_asks_the_repository_index(
    http_mock: aioresponses, session: aiohttp.ClientSession
) -> None:
    http_mock.post(
        f"{BASE}/v2/repository/index",
        payload=[{"name": "x", "version": "1", "state": "READY"}],
    )
    assert [m.id for m in await make_provider(session, {}).list_models()] == ["x"]
    http_mock.post(f"{BASE}/v2/repository/index", status=403, body=b'{"error":"restricted"}')
    assert await make_provider(session, {}).list_models() == []


# --- through the gateway -------------------------------------------------------------------


def triton_settings(
    make_settings: SettingsFactory, models: dict[str, Any] | None = None
) -> Settings:
    """The issue's settings shape: provider 'triton' and public model 'triton-llm'."""
    return make_settings(
        {
            "providers": {
                "triton": {
                    "plugin": "triton",
                    "base_url": BASE,
                    "max_retries": 0,
                    "models": models or {"llm": {"chat_template": "chatml"}},
                }
            },
            "models": {"triton-llm": {"provider": "triton", "upstream_model": "llm"}},
        },
        plugins={"triton": plugin},
    )


async def test_gateway_rejects_tools_with_an_openai_error_naming_the_param(
    http_mock: aioresponses, make_settings: SettingsFactory, make_gateway: GatewayFactory
) -> None:
    client = await make_gateway(triton_settings(make_settings))
    resp = await client.post(
        "/v1/chat/completions",
        json={"model": "triton-llm", "messages": USER, "tools": [TOOL]},
    )
    assert resp.status == 400
    error = (await resp.json())["error"]
    assert error["param"] == "tools"
    assert error["type"] == "invalid_request_error"


async def test_gateway_streams_triton_and_ends_a_mid_stream_failure_with_one_error_event(
    http_mock: aioresponses, make_settings: SettingsFactory, make_gateway: GatewayFactory
) -> None:
    mock_model(http_mock)
    http_mock.post(
        f"{model_url()}/generate_stream",
        body=sse({"text_output": "a"}, {"error": TRACEBACK}),
    )
    client = await make_gateway(triton_settings(make_settings))
    resp = await client.post(
        "/v1/chat/completions",
        json={"model": "triton-llm", "messages": USER, "stream": True},
    )
    assert resp.status == 200
    text = await resp.text()
    events = [line[len("data: ") :] for line in text.split("\n") if line.startswith("data: ")]
    assert "[DONE]" not in events
    errors = [json.loads(e) for e in events if "error" in json.loads(e)]
    assert len(errors) == 1
    assert errors[0]["error"]["code"] == "STREAM_INTERRUPTED"


def test_settings_keys_are_declared_with_defaults() -> None:
    assert set(plugin.settings) == {"models", "model_defaults", "metadata_cache_secs"}
    assert plugin.default_base_url == "http://127.0.0.1:8000"
    describe: Callable[[str], Any] = lambda key: plugin.settings[key].default  # noqa: E731
    assert (describe("models"), describe("model_defaults"), describe("metadata_cache_secs")) == (
        {},
        {},
        60,
    )
