"""The triton plugin's legacy completions (generate without a chat template) and embeddings
(KServe v2 infer, batched by the model's metadata), on mocked HTTP."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aioresponses import CallbackResult, aioresponses
from yarl import URL

from inference_server.providers import InvalidRequest, ProviderBadResponse
from tests.plugins.test_triton_unit import (
    USER,
    collect,
    ctx,
    make_provider,
    mock_model,
    model_url,
    sent_bodies,
    sse,
)

EMBED_METADATA: dict[str, Any] = {
    "name": "emb",
    "inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [-1, 1]}],
    "outputs": [{"name": "VECTOR", "datatype": "FP32", "shape": [-1, 3]}],
}


async def test_completion_sends_the_prompt_without_a_template(
    http_mock: aioresponses, session: aiohttp.ClientSession
) -> None:
    mock_model(http_mock)
    http_mock.post(f"{model_url()}/generate", payload={"text_output": " upon a time"})
    provider = make_provider(session)
    done = await provider.complete({"prompt": "Once", "max_tokens": 4, "echo": True}, ctx())
    assert done["object"] == "text_completion"
    assert done["choices"][0]["text"] == "Once upon a time"
    sent = sent_bodies(http_mock, f"{model_url()}/generate")[0]
    assert sent["text_input"] == "Once"  # no <|im_start|> framing
    assert sent["max_tokens"] == 4


async def test_completion_stream(http_mock: aioresponses, session: aiohttp.ClientSession) -> None:
    mock_model(http_mock)
    http_mock.post(
        f"{model_url()}/generate_stream",
        body=sse({"text_output": " upon"}, {"text_output": " a time"}),
        content_type="text/event-stream",
    )
    provider = make_provider(session)
    chunks = await collect(provider.stream_complete({"prompt": ["Once"], "stream": True}, ctx()))
    assert all(c["object"] == "text_completion" for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == " upon a time"
    assert chunks[-1]["usage"]["completion_tokens"] > 0
    sent = sent_bodies(http_mock, f"{model_url()}/generate_stream")[0]
    assert sent["text_input"] == "Once"


@pytest.mark.parametrize(
    ("request_body", "param"),
    [
        ({"prompt": ["a", "b"]}, "prompt"),
        ({"prompt": [1, 2]}, "prompt"),
        ({"prompt": "a", "suffix": "!"}, "suffix"),
        ({"prompt": "a", "best_of": 2}, "best_of"),
    ],
)
async def test_completion_parameters_triton_cannot_take(
    session: aiohttp.ClientSession, request_body: dict[str, Any], param: str
) -> None:
    provider = make_provider(session)
    with pytest.raises(InvalidRequest) as info:
        await provider.complete(request_body, ctx())
    assert info.value.param == param


async def test_embeddings_are_one_batched_infer(
    http_mock: aioresponses, session: aiohttp.ClientSession
) -> None:
    mock_model(http_mock, "emb", EMBED_METADATA)
    http_mock.post(
        f"{model_url('emb')}/infer",
        payload={
            "outputs": [
                {"name": "VECTOR", "datatype": "FP32", "shape": [2, 3], "data": [1, 2, 3, 4, 5, 6]}
            ]
        },
    )
    provider = make_provider(session, {"emb": {}})
    out = await provider.embed({"input": ["a", "b"]}, ctx("emb"))
    assert [d["embedding"] for d in out["data"]] == [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]
    assert provider.supports("embeddings")
    sent = sent_bodies(http_mock, f"{model_url('emb')}/infer")
    assert len(sent) == 1
    assert sent[0]["inputs"] == [
        {"name": "TEXT", "shape": [2, 1], "datatype": "BYTES", "data": ["a", "b"]}
    ]
    assert sent[0]["outputs"] == [{"name": "VECTOR"}]


async def test_embeddings_without_a_batch_dimension_go_one_by_one(
    http_mock: aioresponses, session: aiohttp.ClientSession
) -> None:
    meta = {
        "name": "emb",
        "inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [1]}],
        "outputs": [{"name": "VECTOR", "datatype": "FP32", "shape": [2]}],
    }
    mock_model(http_mock, "emb", meta)
    answer = {"outputs": [{"name": "VECTOR", "datatype": "FP32", "shape": [2], "data": [1, 0]}]}
    http_mock.post(f"{model_url('emb')}/infer", payload=answer, repeat=True)
    provider = make_provider(session, {"emb": {}})
    out = await provider.embed({"input": ["a", "b", "c"]}, ctx("emb"))
    assert [d["index"] for d in out["data"]] == [0, 1, 2]
    assert len(sent_bodies(http_mock, f"{model_url('emb')}/infer")) == 3


async def test_embedding_problems_are_clear(
    http_mock: aioresponses, session: aiohttp.ClientSession
) -> None:
    mock_model(http_mock, "emb", EMBED_METADATA)
    http_mock.post(
        f"{model_url('emb')}/infer",
        payload={"outputs": [{"name": "VECTOR", "shape": [2, 3], "data": [1, 2, 3, 4, 5]}]},
    )
    provider = make_provider(session, {"emb": {}})
    with pytest.raises(ProviderBadResponse):
        await provider.embed({"input": ["a", "b"]}, ctx("emb"))
    with pytest.raises(InvalidRequest) as tokens:
        await provider.embed({"input": [[1, 2]]}, ctx("emb"))
    assert tokens.value.param == "input"
    mock_model(http_mock, "llm")  # a generate model: BYTES text_input but no float output
    with pytest.raises(InvalidRequest) as no_vectors:
        await make_provider(session).embed({"input": ["a"]}, ctx())
    assert no_vectors.value.code == "UNSUPPORTED"


async def test_embeddings_are_split_into_batches_the_model_takes(
    http_mock: aioresponses, session: aiohttp.ClientSession
) -> None:
    """Triton rejects a request larger than the model's ``max_batch_size`` (from its config):
    more inputs than that go as several batches, answered in the inputs' order."""
    http_mock.get(model_url("emb"), payload=EMBED_METADATA, repeat=True)
    http_mock.get(
        f"{model_url('emb')}/config",
        payload={"name": "emb", "max_batch_size": 2, "model_transaction_policy": {}},
        repeat=True,
    )

    def answer(url: URL, **kwargs: Any) -> CallbackResult:
        texts = json.loads(kwargs["data"])["inputs"][0]["data"]
        if len(texts) > 2:
            return CallbackResult(status=400, payload={"error": "batch-size must be <= 2"})
        data = [x for t in texts for x in (float(len(t)), 0.0, 1.0)]
        shape = [len(texts), 3]
        return CallbackResult(
            payload={
                "outputs": [{"name": "VECTOR", "datatype": "FP32", "shape": shape, "data": data}]
            }
        )

    http_mock.post(f"{model_url('emb')}/infer", callback=answer, repeat=True)
    provider = make_provider(session, {"emb": {}})
    texts = ["a", "bb", "ccc", "dddd", "eeeee"]
    out = await provider.embed({"input": texts}, ctx("emb"))
    assert [d["embedding"][0] for d in out["data"]] == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert [d["index"] for d in out["data"]] == [0, 1, 2, 3, 4]
    shapes = sorted(
        b["inputs"][0]["shape"] for b in sent_bodies(http_mock, f"{model_url('emb')}/infer")
    )
    assert shapes == [[1, 1], [2, 1], [2, 1]]


async def test_a_model_without_a_text_output_cannot_chat(
    http_mock: aioresponses, session: aiohttp.ClientSession
) -> None:
    """Triton's ``/generate`` runs any model: an embedding model answers with its vectors and no
    text, which was an empty 200 completion.  Now a 400 before Triton is called."""
    mock_model(http_mock, "emb", EMBED_METADATA)
    for endpoint in ("generate", "generate_stream"):
        http_mock.post(
            f"{model_url('emb')}/{endpoint}",
            payload={"model_name": "emb", "VECTOR": [1.0, 2.0, 3.0]},
            repeat=True,
        )
    provider = make_provider(session, {"emb": {"inputs": {"prompt": "TEXT"}}})
    calls: list[Callable[[], Awaitable[object]]] = [
        lambda: provider.chat({"messages": USER}, ctx("emb")),
        lambda: collect(provider.stream_chat({"messages": USER, "stream": True}, ctx("emb"))),
        lambda: provider.complete({"prompt": "Once"}, ctx("emb")),
    ]
    for call in calls:
        with pytest.raises(InvalidRequest) as info:
            await call()
        assert info.value.code == "UNSUPPORTED"
        assert info.value.param == "model"
        assert "no text output 'text_output'" in info.value.message
        assert "/v1/embeddings" in info.value.message
    assert sent_bodies(http_mock, f"{model_url('emb')}/generate") == []
    assert sent_bodies(http_mock, f"{model_url('emb')}/generate_stream") == []
