"""``POST /v1/responses`` (OpenAI's Responses API) and ``GET``/``DELETE /v1/responses/{id}``.

Through the same pipeline as chat (validate → route → ``pipeline.walk`` → respond → record).
Per attempt, the provider decides the path: a provider with ``native_responses`` (the openai
plugin) gets the body as it is (its upstream stores and continues its own responses); every
other one gets the request translated onto chat (``responses_convert``), and the gateway
stores the conversation (``store``, default true) so ``previous_response_id`` continues it.
Streams are SSE with named events (``event: response.output_text.delta`` …), the first sent
only after the upstream produced its first chunk; a failure after that ends the stream with an
``error`` event and ``response.failed``.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from typing import Any

import orjson
from aiohttp import web

from inference_server.body import read_validated
from inference_server.context import RequestContext
from inference_server.endpoints import serve
from inference_server.endpoints.responses_convert import (
    EventStream,
    chat_usage,
    from_chat,
    input_items,
    new_id,
    output_text,
    to_chat,
)
from inference_server.endpoints.schemas import RESPONSE_ID, validate_responses
from inference_server.endpoints.store import RESPONSE_STORE, ResponseStore
from inference_server.errors import (
    GatewayError,
    InternalError,
    InvalidRequest,
    NotFound,
    ProviderBadResponse,
    RequestTooLarge,
)
from inference_server.keys import CTX, SETTINGS, TELEMETRY
from inference_server.pipeline import Operation, stream
from inference_server.providers.base import CallContext, Provider
from inference_server.providers.openai_compat import RESPONSES_TERMINAL
from inference_server.routing import Lease
from inference_server.scrub import Scrubber
from inference_server.streaming import Sink, aclose_chunks

_ID = re.compile(RESPONSE_ID)


def sse_named(event: dict[str, Any]) -> bytes:
    """One Responses stream event: ``event: <type>`` and its JSON ``data``."""
    return (
        b"event: " + str(event.get("type")).encode() + b"\ndata: " + orjson.dumps(event) + b"\n\n"
    )


class Turn:
    """One Responses request: its conversation, where it continues from, how it was served."""

    def __init__(
        self, body: dict[str, Any], items: list[dict[str, Any]], missing: str | None,
        store: ResponseStore, recent: dict[str, Any] | None = None,
    ) -> None:  # fmt: skip
        self.body = body
        #: The whole conversation: the stored one it continues (if found here) + this input.
        self.items = items
        #: A previous_response_id not stored here (a native upstream may know it).
        self.missing = missing
        self.store = store
        #: A WebSocket's most recent response (websocket.py): chained even with store false.
        self.recent = recent
        self.rid = new_id("resp")
        #: Whether the attempt that answered went to a native Responses API.
        self.native = False

    # --- the operation, per provider ----------------------------------------------------

    def _native_body(self, sent: dict[str, Any]) -> dict[str, Any]:
        body = dict(sent)
        if self.missing is None and body.get("previous_response_id"):
            body.pop("previous_response_id")  # continued here: send the whole conversation
            body["input"] = self.items
        return body

    def _chat_body(self, sent: dict[str, Any]) -> dict[str, Any]:
        if self.missing is not None:
            raise InvalidRequest(
                f"Previous response with id '{self.missing}' not found.",
                code="PREVIOUS_RESPONSE_NOT_FOUND",
                param="previous_response_id",
            )
        return to_chat(sent, self.items)

    async def call(
        self, provider: Provider, sent: dict[str, Any], call: CallContext
    ) -> dict[str, Any]:
        self.native = provider.native_responses
        if self.native:
            try:
                return await provider.respond(self._native_body(sent), call)
            except GatewayError as exc:
                if not provider.responses_unavailable(exc):
                    raise
                self.native = False  # no /v1/responses upstream after all: translate
        chat = await provider.chat(self._chat_body(sent), call)
        return from_chat(chat, self.body, self.rid)

    def open(
        self, provider: Provider, sent: dict[str, Any], call: CallContext
    ) -> AsyncIterator[dict[str, Any]]:
        self.native = provider.native_responses
        if self.native:
            return self._native(provider, sent, call)
        return self._translated(provider, self._chat_body(sent), call)

    async def _native(
        self, provider: Provider, sent: dict[str, Any], call: CallContext
    ) -> AsyncIterator[dict[str, Any]]:
        """The upstream's own events; if it turns out to have no Responses API (before any
        event, so nothing reached the client), the translated stream instead."""
        events = provider.stream_respond(self._native_body(sent), call)
        try:
            try:
                first = await anext(events, None)
            except GatewayError as exc:
                if not provider.responses_unavailable(exc):
                    raise
                self.native = False
                translated = self._translated(provider, self._chat_body(sent), call)
                try:
                    async for event in translated:
                        yield event
                finally:
                    await aclose_chunks(translated)
                return
            if first is None:
                return
            yield first
            async for event in events:
                yield event
        finally:
            await aclose_chunks(events)

    async def _translated(
        self, provider: Provider, chat: dict[str, Any], call: CallContext
    ) -> AsyncIterator[dict[str, Any]]:
        """Chat chunks as Responses events; nothing is yielded before the upstream's first
        chunk (so the 200 still waits for it, and a failure before it can be retried)."""
        chunks = provider.stream_chat(chat, call)
        try:
            first = await anext(chunks, None)
            if first is None:
                raise ProviderBadResponse(
                    f"Provider '{provider.config.name}' ended the stream before sending anything"
                )
            model = first.get("model") or self.body["model"]
            events = EventStream(self.body, self.rid, model, chat)
            for event in events.start():
                yield event
            for event in events.feed(first):
                yield event
            async for chunk in chunks:
                for event in events.feed(chunk):
                    yield event
            for event in events.done():
                yield event
        finally:
            await aclose_chunks(chunks)

    # --- respond ---------------------------------------------------------------------------

    async def remember(self, response: dict[str, Any]) -> None:
        """Store a translated, finished response with its conversation (``store``, default on);
        on a WebSocket it is also the connection's most recent one (kept even unstored)."""
        stored = self.body.get("store", True)
        if (
            self.native
            or response.get("status") == "failed"
            or not (stored or self.recent is not None)
        ):
            return
        output = [item for item in response.get("output") or () if isinstance(item, dict)]
        items = [*self.items, *(_as_input(item) for item in output)]
        record = {"response": response, "items": items}
        if stored:
            await self.store.put(response["id"], record)
        if self.recent is not None:
            self.recent.clear()  # one per connection: its memory is one conversation at most
            self.recent[response["id"]] = record

    async def respond(
        self,
        request: web.Request,
        ctx: RequestContext,
        lease: Lease,
        body: dict[str, Any],
        result: Any,
        sink: Sink | None = None,
    ) -> web.StreamResponse:
        """Step 6: the JSON answer, or the stream's events (SSE, or a WebSocket's ``sink``)."""
        if isinstance(result, tuple):
            first, events = result
            return await stream(
                request, ctx, lease, body, first, events,
                relay_with=self.relay, sink=sink, encode=sse_named,
            )  # fmt: skip
        ctx.usage = chat_usage(result.get("usage"))
        await self.remember(result)
        return web.Response(body=orjson.dumps(result), content_type="application/json")

    async def relay(
        self,
        sink: Sink,
        ctx: RequestContext,
        body: dict[str, Any],
        first: dict[str, Any],
        events: AsyncIterator[dict[str, Any]],
        *,
        include_usage: bool,
        scrubber: Scrubber,
        collect_text: bool = False,
    ) -> str | None:
        """Send every event as it comes; on a failure after the start, ``error`` and
        ``response.failed`` (the Responses API's own way to end a broken stream)."""
        send = sink.send
        seq = 0
        last: dict[str, Any] = {"id": self.rid, "object": "response", "status": "in_progress"}
        final: dict[str, Any] | None = None
        event: dict[str, Any] | None = first
        try:
            while event is not None:
                number = event.get("sequence_number")
                seq = number + 1 if isinstance(number, int) else seq + 1
                inner = event.get("response")
                if isinstance(inner, dict):
                    last = inner
                kind = event.get("type")
                if kind in RESPONSES_TERMINAL:
                    final = inner if isinstance(inner, dict) else None
                    if kind == "response.failed":
                        ctx.error_code = "PROVIDER_ERROR"
                elif kind == "error":
                    ctx.error_code = "PROVIDER_ERROR"
                await send(event)
                event = await anext(events, None)
            if final is not None:
                ctx.usage = chat_usage(final.get("usage"))
                await self.remember(final)
        except asyncio.CancelledError:
            err = sink.interrupted()
            if err is not None:
                await _write_failure(sink, seq, last, err)
                await sink.end()
                ctx.error_code = err.code
            else:
                ctx.error_code = "CLIENT_DISCONNECTED"
            raise
        except GatewayError as exc:
            scrubber.scrub_error(exc)
            ctx.error_code = exc.code
            ctx.log.warning("stream failed after it started: {} ({})", exc.message, exc.code)
            await _write_failure(sink, seq, last, exc)
        except (ConnectionResetError, web.HTTPException):
            ctx.error_code = "CLIENT_DISCONNECTED"
        except Exception as exc:  # a bug: still end the stream honestly
            ctx.log.exception("unexpected error while streaming a response")
            ctx.error_code = "INTERNAL_ERROR"
            bug = InternalError(f"Internal error: {type(exc).__name__}")
            await _write_failure(sink, seq, last, bug)
        finally:
            await aclose_chunks(events)
        return output_text(final) if collect_text and final is not None else None


def _as_input(item: dict[str, Any]) -> dict[str, Any]:
    """An output item as the input item that repeats it in a later turn."""
    if item.get("type") == "message":
        return {"type": "message", "role": "assistant", "content": item.get("content") or []}
    return {k: item[k] for k in ("type", "call_id", "name", "arguments") if k in item}


async def _write_failure(sink: Sink, seq: int, last: dict[str, Any], err: GatewayError) -> None:
    failed = {**last, "status": "failed", "error": {"code": err.code, "message": err.message}}
    events = (
        {"type": "error", "sequence_number": seq, "code": err.code, "message": err.message,
         "param": err.param},
        {"type": "response.failed", "sequence_number": seq + 1, "response": failed},
    )  # fmt: skip
    try:
        for event in events:
            await sink.send(event)
    except (ConnectionResetError, RuntimeError):
        return


async def responses(request: web.Request) -> web.StreamResponse:
    """POST /v1/responses."""
    app = request.app
    # 1. admit — authentication (tenancy.access_middleware); limits: in serve(), once the
    #    model is known.
    # 2. validate
    with app[TELEMETRY].span("inference.validate"):
        body = await read_validated(request, validate_responses)
    turn, op = await prepare(request, body)
    return await serve(request, body, op, turn.respond, stream=bool(body.get("stream")))


async def prepare(
    request: web.Request, body: dict[str, Any], recent: dict[str, Any] | None = None
) -> tuple[Turn, Operation]:
    """A validated Responses body → its :class:`Turn` (the conversation it continues) and the
    operation to walk; shared by ``POST /v1/responses`` and the WebSocket mode (``recent``:
    the connection's most recent response, which ``previous_response_id`` may name even when
    it was not stored, as in OpenAI's WebSocket mode)."""
    app = request.app
    ctx = request[CTX]
    ctx.operation = "responses"
    ctx.include_usage = bool(body.get("stream"))  # ask upstreams for stream usage
    store = app[RESPONSE_STORE]
    items = input_items(body)
    previous = body.get("previous_response_id")
    missing = None
    if previous:
        record = recent.get(previous) if recent else None
        if record is None:
            record = await store.get(previous)
        if record is None:
            missing = previous
        else:
            items = [*record["items"], *items]
            # The conversation is what the client would otherwise send itself: the same
            # limit, so a chain of turns cannot grow stored records (or upstream bodies).
            size = len(orjson.dumps(items))
            limit = app[SETTINGS].server.max_body_bytes
            if size > limit:
                raise RequestTooLarge(
                    f"The conversation continued from '{previous}' is {size} bytes, over the "
                    f"{limit}-byte request limit (server.max_body_bytes); start a new one",
                    param="previous_response_id",
                )
    turn = Turn(body, items, missing, store, recent)
    return turn, Operation("responses", "responses", turn.call, turn.open)


def _response_id(request: web.Request) -> str:
    rid = request.match_info["response_id"]
    if not _ID.match(rid):
        raise NotFound("Response with that id not found.", code="RESPONSE_NOT_FOUND")
    return rid


async def get_response(request: web.Request) -> web.Response:
    """GET /v1/responses/{response_id}: a stored (translated) response."""
    rid = _response_id(request)
    record = await request.app[RESPONSE_STORE].get(rid)
    if record is None:
        raise NotFound(f"Response with id '{rid}' not found.", code="RESPONSE_NOT_FOUND")
    return web.Response(body=orjson.dumps(record["response"]), content_type="application/json")


async def delete_response(request: web.Request) -> web.Response:
    """DELETE /v1/responses/{response_id}."""
    rid = _response_id(request)
    if not await request.app[RESPONSE_STORE].delete(rid):
        raise NotFound(f"Response with id '{rid}' not found.", code="RESPONSE_NOT_FOUND")
    answer = {"id": rid, "object": "response", "deleted": True}
    return web.Response(body=orjson.dumps(answer), content_type="application/json")
