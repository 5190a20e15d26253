"""The Responses API translated onto chat completions (pure functions, no I/O).

Providers without a native ``/v1/responses`` (llama.cpp, Triton, the mock) get a chat request:
``instructions`` → a system message, input items → messages (``function_call`` items → an
assistant message's ``tool_calls``, ``function_call_output`` → a ``tool`` message), function
``tools``/``tool_choice`` → chat's shape, ``text.format`` → ``response_format``,
``max_output_tokens`` → ``max_tokens``.  The chat answer comes back as a ``response`` object
(a ``message`` item with ``output_text``, one ``function_call`` item per tool call), and a chat
stream as the standard event sequence (:class:`EventStream`).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from typing import Any

from inference_server.endpoints.schemas import invalid
from inference_server.streaming import estimate_prompt_tokens

#: Chat finish reasons that mean the answer was cut (``status: incomplete``).
_INCOMPLETE = {"length": "max_output_tokens", "content_filter": "content_filter"}
_ROLES = ("user", "system", "developer", "assistant")
#: Request fields echoed on the response object (OpenAI echoes the request's settings).
_ECHOED = ("instructions", "max_output_tokens", "metadata", "previous_response_id", "user")


def new_id(prefix: str) -> str:
    """A random id (``resp_``, ``msg_``, ``fc_``): unguessable, since it names stored data."""
    return f"{prefix}_{secrets.token_hex(16)}"


def input_items(body: dict[str, Any]) -> list[dict[str, Any]]:
    """The request's ``input`` as a list of items (a string is one user message)."""
    value = body.get("input")
    if isinstance(value, str):
        return [{"type": "message", "role": "user", "content": value}]
    return list(value or [])


def _text_parts(content: Any, param: str) -> str | list[dict[str, Any]]:
    """A message's content for chat: a string, or chat content parts (text and images)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise invalid(param, "must be a string or a list of content parts")
    parts: list[dict[str, Any]] = []
    for i, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_text", "output_text", "text") and isinstance(part.get("text"), str):
            parts.append({"type": "text", "text": part["text"]})
        elif kind == "input_image" and isinstance(part.get("image_url"), str):
            image: dict[str, Any] = {"url": part["image_url"]}
            if part.get("detail"):
                image["detail"] = part["detail"]
            parts.append({"type": "image_url", "image_url": image})
        elif kind == "refusal" and isinstance(part.get("refusal"), str):
            parts.append({"type": "text", "text": part["refusal"]})
        else:
            raise invalid(
                f"{param}.{i}",
                "content parts must be input_text, output_text or input_image (with a URL) "
                "for this model",
            )
    if all(p["type"] == "text" for p in parts):
        return "".join(p["text"] for p in parts)
    return parts


def items_to_messages(items: list[dict[str, Any]], instructions: str | None) -> list[Any]:
    """Responses input items → chat messages (consecutive function calls: one assistant turn)."""
    messages: list[dict[str, Any]] = []
    if instructions:
        messages.append({"role": "system", "content": instructions})
    for i, item in enumerate(items):
        param = f"input.{i}"
        if not isinstance(item, dict):
            raise invalid(param, "must be an object")
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in _ROLES:
                raise invalid(f"{param}.role", f"must be one of: {', '.join(_ROLES)}")
            messages.append(
                {"role": role, "content": _text_parts(item.get("content"), f"{param}.content")}
            )
        elif kind == "function_call":
            call_id, name = item.get("call_id"), item.get("name")
            arguments = item.get("arguments", "")
            if not isinstance(call_id, str) or not call_id:
                raise invalid(f"{param}.call_id", "a function_call needs a call_id")
            if not isinstance(name, str) or not name:
                raise invalid(f"{param}.name", "a function_call needs a name")
            if not isinstance(arguments, str):
                raise invalid(f"{param}.arguments", "must be a string (JSON)")
            call = {
                "id": call_id,
                "type": "function",
                "function": {"name": name, "arguments": arguments},
            }
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant" and last.get("tool_calls"):
                last["tool_calls"].append(call)
            else:
                # "" not null: llama-cpp-python rejects a null content (found in the real tier).
                messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "function_call_output":
            call_id, output = item.get("call_id"), item.get("output")
            if not isinstance(call_id, str) or not call_id:
                raise invalid(f"{param}.call_id", "a function_call_output needs a call_id")
            if not isinstance(output, str):
                raise invalid(f"{param}.output", "must be a string")
            messages.append({"role": "tool", "tool_call_id": call_id, "content": output})
        elif kind == "reasoning":
            continue  # a native model's reasoning summary: nothing a chat model can take
        else:
            raise invalid(
                f"{param}.type",
                "must be message, function_call or function_call_output for this model",
            )
    return messages


def _chat_tools(tools: list[Any]) -> list[dict[str, Any]]:
    out = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise invalid(f"tools.{i}.type", "only function tools are served for this model")
        function = {"name": tool.get("name"), "parameters": tool.get("parameters") or {}}
        if not isinstance(function["name"], str) or not function["name"]:
            raise invalid(f"tools.{i}.name", "a function tool needs a name")
        if tool.get("description") is not None:
            function["description"] = tool["description"]
        if tool.get("strict") is not None:
            function["strict"] = tool["strict"]
        out.append({"type": "function", "function": function})
    return out


def _tool_choice(choice: Any) -> Any:
    if isinstance(choice, dict) and choice.get("type") == "function":
        return {"type": "function", "function": {"name": choice.get("name")}}
    return choice


def _response_format(fmt: Any) -> dict[str, Any] | None:
    if not isinstance(fmt, dict) or fmt.get("type") in (None, "text"):
        return None
    if fmt["type"] == "json_object":
        return {"type": "json_object"}
    schema = {"name": fmt.get("name") or "response", "schema": fmt.get("schema") or {}}
    if fmt.get("strict") is not None:
        schema["strict"] = fmt["strict"]
    return {"type": "json_schema", "json_schema": schema}


def to_chat(body: dict[str, Any], items: list[dict[str, Any]]) -> dict[str, Any]:
    """The chat request for a Responses request whose conversation is ``items``."""
    chat: dict[str, Any] = {
        "model": body["model"],
        "messages": items_to_messages(items, body.get("instructions")),
    }
    for key in ("temperature", "top_p", "user", "parallel_tool_calls", "seed"):
        if body.get(key) is not None:
            chat[key] = body[key]
    if body.get("max_output_tokens") is not None:
        chat["max_tokens"] = body["max_output_tokens"]
    if body.get("tools"):
        chat["tools"] = _chat_tools(body["tools"])
    if body.get("tool_choice") is not None and body.get("tools"):
        chat["tool_choice"] = _tool_choice(body["tool_choice"])
    fmt = _response_format((body.get("text") or {}).get("format"))
    if fmt is not None:
        chat["response_format"] = fmt
    if body.get("stream"):
        chat["stream"] = True
        chat["stream_options"] = {"include_usage": True}
    return chat


def usage_from_chat(usage: Any) -> dict[str, Any] | None:
    """Chat usage → Responses usage (``input_tokens``/``output_tokens`` and their details)."""
    if not isinstance(usage, dict):
        return None
    prompt = usage.get("prompt_tokens") or 0
    completion = usage.get("completion_tokens") or 0
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    reasoning = (usage.get("completion_tokens_details") or {}).get("reasoning_tokens") or 0
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": cached},
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": reasoning},
        "total_tokens": usage.get("total_tokens") or prompt + completion,
    }


def chat_usage(usage: Any) -> dict[str, Any] | None:
    """Responses usage → chat usage (what metrics and the access log read)."""
    if not isinstance(usage, dict):
        return None
    prompt = usage.get("input_tokens") or 0
    completion = usage.get("output_tokens") or 0
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": usage.get("total_tokens") or prompt + completion,
    }


def skeleton(body: dict[str, Any], rid: str, model: str, status: str) -> dict[str, Any]:
    """A ``response`` object without output (what ``response.created`` carries)."""
    text = body.get("text") or {"format": {"type": "text"}}
    response: dict[str, Any] = {
        "id": rid,
        "object": "response",
        "created_at": int(time.time()),
        "status": status,
        "error": None,
        "incomplete_details": None,
        "model": model,
        "output": [],
        "parallel_tool_calls": body.get("parallel_tool_calls", True),
        "temperature": body.get("temperature"),
        "top_p": body.get("top_p"),
        "tool_choice": body.get("tool_choice", "auto"),
        "tools": body.get("tools") or [],
        "text": text,
        "store": body.get("store", True),
        "usage": None,
    }
    for key in _ECHOED:
        response[key] = body.get(key)
    if response["metadata"] is None:
        response["metadata"] = {}
    return response


def message_item(
    text: str, status: str = "completed", item_id: str | None = None
) -> dict[str, Any]:
    return {
        "type": "message",
        "id": item_id or new_id("msg"),
        "status": status,
        "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": []}],
    }


def call_item(call: dict[str, Any], status: str = "completed") -> dict[str, Any]:
    function = call.get("function") or {}
    return {
        "type": "function_call",
        "id": new_id("fc"),
        "call_id": call.get("id") or new_id("call"),
        "name": function.get("name") or "",
        "arguments": function.get("arguments") or "",
        "status": status,
    }


def finish(response: dict[str, Any], finish_reason: Any, usage: Any) -> dict[str, Any]:
    """Set status (completed / incomplete with its reason) and usage on ``response``."""
    reason = _INCOMPLETE.get(finish_reason) if isinstance(finish_reason, str) else None
    response["status"] = "incomplete" if reason else "completed"
    response["incomplete_details"] = {"reason": reason} if reason else None
    response["usage"] = usage_from_chat(usage)
    return response


def from_chat(chat: dict[str, Any], body: dict[str, Any], rid: str) -> dict[str, Any]:
    """A chat completion → the ``response`` object."""
    response = skeleton(body, rid, chat.get("model") or body["model"], "completed")
    choices = chat.get("choices") or [{}]
    choice = choices[0] if isinstance(choices[0], dict) else {}
    message = choice.get("message") or {}
    content = message.get("content")
    if isinstance(content, str) and content:
        response["output"].append(message_item(content))
    for call in message.get("tool_calls") or ():
        if isinstance(call, dict):
            response["output"].append(call_item(call))
    return finish(response, choice.get("finish_reason"), chat.get("usage"))


def output_text(response: dict[str, Any]) -> str:
    """The concatenated ``output_text`` of a response (what ``response.output_text`` gives)."""
    return "".join(
        part.get("text", "")
        for item in response.get("output") or ()
        if isinstance(item, dict) and item.get("type") == "message"
        for part in item.get("content") or ()
        if isinstance(part, dict) and part.get("type") == "output_text"
    )


class EventStream:
    """Chat chunks in, Responses stream events out (each with its ``sequence_number``).

    ``start`` gives ``response.created`` and ``response.in_progress``; ``feed`` the events a
    chunk causes (a message item and its text part are opened on the first text; a
    ``function_call`` item per tool call, its arguments streamed); ``done`` closes every open
    item and gives ``response.completed`` (or ``incomplete``); ``failed`` gives ``error`` and
    ``response.failed``.
    """

    def __init__(
        self, body: dict[str, Any], rid: str, model: str, chat: dict[str, Any] | None = None
    ) -> None:
        self.body = body
        #: The chat request, to estimate usage when the upstream reports none (llama.cpp).
        self.chat = chat
        self.deltas = 0
        self.response = skeleton(body, rid, model, "in_progress")
        self.seq = 0
        self.text: list[str] | None = None
        self.message: dict[str, Any] | None = None
        self.message_index = -1
        #: chat tool-call index → (output index, item)
        self.calls: dict[int, tuple[int, dict[str, Any]]] = {}
        self.finish_reason: Any = None
        self.usage: Any = None

    def _event(self, kind: str, **fields: Any) -> dict[str, Any]:
        event = {"type": kind, "sequence_number": self.seq, **fields}
        self.seq += 1
        return event

    def start(self) -> Iterator[dict[str, Any]]:
        yield self._event("response.created", response=dict(self.response))
        yield self._event("response.in_progress", response=dict(self.response))

    def feed(self, chunk: dict[str, Any]) -> Iterator[dict[str, Any]]:
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        for choice in chunk.get("choices") or ():
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]
            delta = choice.get("delta") or {}
            content = delta.get("content")
            if isinstance(content, str) and content:
                self.deltas += 1
                yield from self._text(content)
            for call in delta.get("tool_calls") or ():
                if isinstance(call, dict):
                    self.deltas += 1
                    yield from self._call(call)

    def _text(self, content: str) -> Iterator[dict[str, Any]]:
        output = self.response["output"]
        if self.message is None:
            self.text = []
            self.message = message_item("", "in_progress")
            self.message["content"] = []
            self.message_index = len(output)
            output.append(self.message)
            yield self._event(
                "response.output_item.added",
                output_index=self.message_index,
                item=dict(self.message),
            )
            yield self._event(
                "response.content_part.added",
                item_id=self.message["id"],
                output_index=self.message_index,
                content_index=0,
                part={"type": "output_text", "text": "", "annotations": []},
            )
        assert self.text is not None
        self.text.append(content)
        yield self._event(
            "response.output_text.delta",
            item_id=self.message["id"],
            output_index=self.message_index,
            content_index=0,
            delta=content,
            logprobs=[],
        )

    def _call(self, call: dict[str, Any]) -> Iterator[dict[str, Any]]:
        index = call.get("index", 0)
        function = call.get("function") or {}
        known = self.calls.get(index)
        if known is None:
            item = call_item(
                {"id": call.get("id"), "function": {"name": function.get("name")}}, "in_progress"
            )
            out_index = len(self.response["output"])
            self.response["output"].append(item)
            self.calls[index] = (out_index, item)
            yield self._event("response.output_item.added", output_index=out_index, item=dict(item))
        else:
            out_index, item = known
        piece = function.get("arguments")
        if isinstance(piece, str) and piece:
            item["arguments"] += piece
            yield self._event(
                "response.function_call_arguments.delta",
                item_id=item["id"],
                output_index=out_index,
                delta=piece,
            )

    def done(self) -> Iterator[dict[str, Any]]:
        if self.message is not None and self.text is not None:
            text = "".join(self.text)
            part = {"type": "output_text", "text": text, "annotations": []}
            ident, index = self.message["id"], self.message_index
            yield self._event(
                "response.output_text.done",
                item_id=ident,
                output_index=index,
                content_index=0,
                text=text,
                logprobs=[],
            )
            yield self._event(
                "response.content_part.done",
                item_id=ident,
                output_index=index,
                content_index=0,
                part=part,
            )
            self.message["content"] = [part]
            self.message["status"] = "completed"
            yield self._event("response.output_item.done", output_index=index, item=self.message)
        for out_index, item in self.calls.values():
            yield self._event(
                "response.function_call_arguments.done",
                item_id=item["id"],
                output_index=out_index,
                arguments=item["arguments"],
            )
            item["status"] = "completed"
            yield self._event("response.output_item.done", output_index=out_index, item=item)
        usage = self.usage
        if usage is None and self.chat is not None:
            # Estimated like chat streams' usage (see ARCHITECTURE.md "Usage accounting").
            prompt = estimate_prompt_tokens(self.chat)
            usage = {"prompt_tokens": prompt, "completion_tokens": self.deltas,
                     "total_tokens": prompt + self.deltas}  # fmt: skip
        finish(self.response, self.finish_reason, usage)
        kind = (
            "response.completed"
            if self.response["status"] == "completed"
            else "response.incomplete"
        )
        yield self._event(kind, response=self.response)

    def failed(self, code: str, message: str, param: str | None) -> Iterator[dict[str, Any]]:
        yield self._event("error", code=code, message=message, param=param)
        self.response["status"] = "failed"
        self.response["error"] = {"code": code, "message": message}
        yield self._event("response.failed", response=self.response)
