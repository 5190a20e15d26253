"""Smoke: the app answers through the fixtures (the fuller suites live beside this file)."""

from tests.support.fake_upstream import FakeUpstream


async def test_chat_through_fake_upstream(gateway_for, fake_upstream: FakeUpstream) -> None:
    client = await gateway_for()
    resp = await client.post(
        "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]}
    )
    assert resp.status == 200
    body = await resp.json()
    assert body["choices"][0]["message"]["content"] == "Hello from the fake upstream."
    assert fake_upstream.requests[0]["model"] == "gpt-oss-20b"
    assert resp.headers["x-request-id"].startswith("req_")
