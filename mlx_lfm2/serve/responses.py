"""OpenAI's Responses API: ``POST /v1/responses``, ``GET`` / ``DELETE /v1/responses/{id}``.

The clients that speak only this API (the OpenAI Agents SDK's default model, Codex CLI,
``ChatOpenAI(use_responses_api=True)``, ``litellm.responses()``) reach the engine through the
chat route's own machinery: a request becomes a ``ChatRequest`` (``instructions`` the
system message, input items the messages, function tools the tools, ``text.format`` the
``response_format`` its constraint compiles), and its reply comes back as output items, whole
or as the Responses stream (``response.created`` ... ``response.completed``).

Input items: messages (``input_text`` / ``output_text`` parts; an ``input_image`` or
``input_file`` becomes a placeholder saying it was left out), ``function_call`` and
``function_call_output`` (Codex's ``custom_tool_call`` pair too, its input as the call's
``input`` argument), ``reasoning`` items (skipped: another model's reasoning). Tools other
than ``function`` (``web_search``, ``namespace``, hosted tools) are not offered to the model;
``reasoning``, ``include``, ``prompt_cache_key``, ``truncation``, ``metadata`` and
``client_metadata`` are accepted and not used.

``store`` (default true) keeps a response, and the conversation that led to it, in memory
(the last ``MAX_STORED``, within ``MAX_STORED_BYTES`` of JSON): ``previous_response_id``
continues that conversation, so its prompt extends the one before and the prompt cache
prefills only the new turn.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections import OrderedDict
from typing import Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from sse_starlette.sse import EventSourceResponse
from starlette.concurrency import run_in_threadpool
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

from .boundary import APIError, exception_handlers, internal_error, no_reply
from .openai_api import MAX_SEED, ChatRequest, to_template_messages
from .service import Routed

MAX_STORED = 256
MAX_STORED_BYTES = 64 << 20  # their JSON, conversations included (each holds its whole history)
OMITTED = "[{kind} omitted: this model reads text only]"
TEXT_PARTS = ("input_text", "output_text", "text", "refusal")


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="allow")  # reasoning, include, metadata, prompt_cache_key...: unused


class ResponsesRequest(_Lenient):
    model: Optional[str] = None
    input: Union[str, list[dict]] = Field(min_length=1)
    instructions: Optional[str] = None
    previous_response_id: Optional[str] = None
    tools: Optional[list[dict]] = None
    tool_choice: Union[str, dict, None] = None
    parallel_tool_calls: bool = True
    max_output_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    seed: Optional[int] = Field(None, ge=0, le=MAX_SEED)
    text: Optional[dict] = None
    stream: bool = False
    store: bool = True

    @field_validator("tool_choice")
    @classmethod
    def _tool_choice(cls, choice):
        if isinstance(choice, str) and choice not in ("auto", "none", "required"):
            raise ValueError("tool_choice is 'auto', 'none', 'required' or {'type': 'function', 'name': ...}")
        if isinstance(choice, dict) and choice.get("type") not in ("function", "allowed_tools"):
            raise ValueError(f"tool_choice type {choice.get('type')!r} is not supported here (function tools only)")
        return choice

    @property
    def function_tools(self) -> list[dict]:
        """The function tools as chat tools; others (hosted, ``namespace``) are not offered."""
        out = []
        for t in self.tools or []:
            if t.get("type") == "function":
                fn = {k: t[k] for k in ("name", "description", "parameters") if k in t}
                out.append({"type": "function", "function": fn})
        return out

    def chat_choice(self):
        choice = self.tool_choice
        if isinstance(choice, dict):
            return {"type": "function", "function": {"name": choice.get("name")}} if choice["type"] == "function" \
                else "auto"
        return choice

    def response_format(self) -> Optional[dict]:
        fmt = (self.text or {}).get("format")
        if not fmt or fmt.get("type") == "text":
            return None
        if fmt.get("type") == "json_schema":
            return {"type": "json_schema", "json_schema": {k: fmt[k] for k in ("name", "schema", "strict") if k in fmt}}
        return {"type": fmt.get("type")}

    def chat_request(self, earlier: list[dict]) -> tuple[ChatRequest, list[dict]]:
        """The chat request this one amounts to, and the conversation it continues plus its
        own input (what a stored response keeps: instructions apply only to this request)."""
        conversation = earlier + input_messages(self.input)
        system = [{"role": "system", "content": self.instructions}] if self.instructions else []
        body = {"messages": system + conversation, "tools": self.function_tools or None,
                "tool_choice": self.chat_choice() if self.function_tools else None,
                "response_format": self.response_format(), "max_tokens": self.max_output_tokens,
                **{k: getattr(self, k) for k in ("temperature", "top_p", "seed") if getattr(self, k) is not None}}
        try:
            return ChatRequest.model_validate(body), conversation
        except ValidationError as e:
            err = max(e.errors(), key=lambda err: len(err["loc"]))
            where = ".".join(str(p) for p in err["loc"])
            raise APIError(400, f"{where}: {err['msg'].removeprefix('Value error, ')}", param="input",
                           code="invalid_value")


def _content(content, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise APIError(400, f"{where}.content must be a string or a list of content parts", param="input")
    parts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in TEXT_PARTS and isinstance(part.get("text", part.get("refusal")), str):
            parts.append(part.get("text", part.get("refusal")))
        elif kind in ("input_image", "input_file", "input_audio"):
            parts.append(OMITTED.format(kind=kind.removeprefix("input_")))
        else:
            raise APIError(400, f"{where}.content.{j}: content part type {kind!r} is not supported here "
                                "(input_text, output_text, input_image, input_file)", param="input")
    return "".join(parts)


def input_messages(items: Union[str, list[dict]]) -> list[dict]:
    """Input items -> chat messages: consecutive calls join the assistant turn before them."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    out: list[dict] = []
    for i, item in enumerate(items):
        where = f"input.{i}"
        kind = item.get("type", "message") if isinstance(item, dict) else None
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise APIError(400, f"{where}.role must be user, assistant, system or developer", param="input")
            out.append({"role": role, "content": _content(item.get("content", ""), where)})
        elif kind in ("function_call", "custom_tool_call"):
            name, call_id = item.get("name"), item.get("call_id")
            if not isinstance(name, str) or not isinstance(call_id, str):
                raise APIError(400, f"{where}: a {kind} needs a name and a call_id", param="input")
            arguments = item.get("arguments", "{}") if kind == "function_call" else {"input": item.get("input", "")}
            call = {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}
            if not (out and out[-1]["role"] == "assistant"):
                out.append({"role": "assistant", "content": ""})
            out[-1].setdefault("tool_calls", []).append(call)
        elif kind in ("function_call_output", "custom_tool_call_output"):
            output = item.get("output", "")
            out.append({"role": "tool", "tool_call_id": item.get("call_id"),
                        "content": _content(output, where) if isinstance(output, list) else str(output)})
        elif kind == "reasoning":
            continue  # another model's reasoning: LFM2's template has no place for it
        else:
            raise APIError(400, f"{where}: input item type {kind!r} is not supported here (message, function_call, "
                                "function_call_output, reasoning)", param="input")
    return out


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, output_tokens: int, cached: int) -> dict:
    return {"input_tokens": prompt_tokens, "input_tokens_details": {"cached_tokens": cached},
            "output_tokens": output_tokens, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt_tokens + output_tokens}


def _event(kind: str, **data) -> dict:
    return {"type": kind, **data}


class ReplyItems:
    """A reply's output items as it is written, with the stream events each step makes.

    ``text(piece)`` and ``call(name, arguments)`` append to the items (a message item, then
    one ``function_call`` item per call) and return the events announcing them; ``close()``
    finishes an open message. A whole reply uses the same steps and drops the events, so
    both shapes hold the same items."""

    def __init__(self):
        self.items: list[dict] = []
        self._open: Optional[dict] = None  # the message item being written

    def text(self, piece: str) -> list[dict]:
        if not piece:
            return []
        events = []
        if self._open is None:
            self._open = {"type": "message", "id": new_id("msg"), "status": "in_progress", "role": "assistant",
                          "content": []}
            self.items.append(self._open)
            events.append(_event("response.output_item.added", output_index=len(self.items) - 1,
                                      item={**self._open, "content": []}))
            self._open["content"].append({"type": "output_text", "text": "", "annotations": [], "logprobs": []})
            events.append(_event("response.content_part.added", item_id=self._open["id"],
                                      output_index=len(self.items) - 1, content_index=0,
                                      part={"type": "output_text", "text": "", "annotations": []}))
        self._open["content"][0]["text"] += piece
        events.append(_event("response.output_text.delta", item_id=self._open["id"],
                                  output_index=len(self.items) - 1, content_index=0, delta=piece, logprobs=[]))
        return events

    def close(self) -> list[dict]:
        if self._open is None:
            return []
        item, self._open = self._open, None
        item["status"] = "completed"
        index, part = self.items.index(item), item["content"][0]
        return [_event("response.output_text.done", item_id=item["id"], output_index=index, content_index=0,
                            text=part["text"], logprobs=[]),
                _event("response.content_part.done", item_id=item["id"], output_index=index, content_index=0,
                            part=part),
                _event("response.output_item.done", output_index=index, item=item)]

    def call(self, name: str, arguments: dict) -> list[dict]:
        events = self.close()
        args = json.dumps(arguments, ensure_ascii=False)
        item = {"type": "function_call", "id": new_id("fc"), "call_id": new_id("call"), "name": name,
                "arguments": args, "status": "completed"}
        self.items.append(item)
        index = len(self.items) - 1
        return events + [
            _event("response.output_item.added", output_index=index,
                        item={**item, "arguments": "", "status": "in_progress"}),
            _event("response.function_call_arguments.delta", item_id=item["id"], output_index=index, delta=args),
            _event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                        name=name, arguments=args),
            _event("response.output_item.done", output_index=index, item=item)]

def response_body(rid: str, req: ResponsesRequest, model_id: str, items: list, status: str,
                  usage_: Optional[dict] = None, incomplete: Optional[str] = None) -> dict:
    """The ``response`` object (also inside ``response.created`` / ``.completed`` events)."""
    return {"id": rid, "object": "response", "created_at": int(time.time()), "status": status,
            "model": req.model or model_id, "output": items, "error": None,
            "incomplete_details": {"reason": incomplete} if incomplete else None,
            "instructions": req.instructions, "previous_response_id": req.previous_response_id,
            "tools": req.tools or [], "tool_choice": req.tool_choice or "auto",
            "parallel_tool_calls": req.parallel_tool_calls, "max_output_tokens": req.max_output_tokens,
            "temperature": req.temperature, "top_p": req.top_p, "text": req.text or {"format": {"type": "text"}},
            "store": req.store, "truncation": "disabled", "reasoning": {"effort": None, "summary": None},
            "metadata": getattr(req, "metadata", None) or {}, "usage": usage_}


class Store:
    """Stored responses (``store: true``), the newest ``limit`` within ``max_bytes`` of JSON:
    each with the conversation that led to it, for ``previous_response_id``. Thread-safe;
    evicts the oldest (the newest is always kept)."""

    def __init__(self, limit: int = MAX_STORED, max_bytes: int = MAX_STORED_BYTES):
        self.limit, self.max_bytes, self._lock = limit, max_bytes, threading.Lock()
        self._entries: OrderedDict[str, tuple[dict, list, int]] = OrderedDict()
        self.bytes = 0

    def put(self, body: dict, conversation: list[dict]) -> None:
        size = len(json.dumps(body, ensure_ascii=False)) + len(json.dumps(conversation, ensure_ascii=False))
        with self._lock:
            old = self._entries.pop(body["id"], None)
            self.bytes += size - (old[2] if old else 0)
            self._entries[body["id"]] = (body, conversation, size)
            while len(self._entries) > 1 and (len(self._entries) > self.limit or self.bytes > self.max_bytes):
                self.bytes -= self._entries.popitem(last=False)[1][2]

    def get(self, rid: str) -> Optional[tuple[dict, list]]:
        with self._lock:
            return self._entries.get(rid)

    def delete(self, rid: str) -> bool:
        with self._lock:
            entry = self._entries.pop(rid, None)
            if entry is not None:
                self.bytes -= entry[2]
            return entry is not None

    def conversation(self, rid: str) -> list[dict]:
        entry = self.get(rid)
        if entry is None:
            raise APIError(404, f"previous response {rid!r} not found (responses are kept only with store: true, "
                                f"the latest {self.limit} within {self.max_bytes >> 20} MiB, until the server restarts)",
                           param="previous_response_id", code="previous_response_not_found")
        return entry[1]

    def found(self, rid: str) -> dict:
        entry = self.get(rid)
        if entry is None:
            raise APIError(404, f"response {rid!r} not found", type_="invalid_request_error", code="not_found")
        return entry[0]


def sse(event: dict, seq: int) -> dict:
    """One server-sent event of the stream, named by its type and numbered in order."""
    return {"event": event["type"], "data": json.dumps({**event, "sequence_number": seq}, ensure_ascii=False)}




PREFIX = "/v1/responses"


def app(service) -> Starlette:
    """``POST /v1/responses``, ``GET`` / ``DELETE /v1/responses/{id}``, mounted at ``PREFIX``
    with OpenAI's error shape, over the service (auth, prepare, the reply assembler)."""
    api = Responses(service, Store())
    return Starlette(routes=[Route(PREFIX, api.create, methods=["POST"]),
                             Route(PREFIX + "/{rid}", api.get, methods=["GET"]),
                             Route(PREFIX + "/{rid}", api.delete, methods=["DELETE"])],
                     exception_handlers=exception_handlers())


class Responses(Routed):
    def __init__(self, service, store: Store):
        self.service, self.store = service, store

    async def create(self, request):
        sv = self.service
        req = await sv.read(request, ResponsesRequest)
        earlier = self.store.conversation(req.previous_response_id) if req.previous_response_id else []
        chat, conversation = await run_in_threadpool(req.chat_request, earlier)
        tools = chat.tool_names if chat.tools and chat.tool_choice != "none" else frozenset()
        messages = to_template_messages(chat, self.scheduler.template_renders_tool_calls)
        forced = chat.forced_tool_call()
        job = await sv.prepare(chat, await sv.render(messages, chat.tools if tools else None) + forced, model=req.model)
        turn = Turn(self, req, conversation, job, forced)
        if req.stream:
            return EventSourceResponse(turn.stream(sv.pieces(job, forced, tools)), ping=15)
        reply = await sv.whole(request, job, forced, tools)
        turn.reply.text(reply.text)
        for call in reply.calls[:1] if not req.parallel_tool_calls else reply.calls:
            turn.reply.call(call["name"], call["arguments"])
        turn.reply.close()
        return JSONResponse(turn.finish(reply.last, reply.written)["response"])

    async def get(self, request):
        self.service.authorize(request)
        return JSONResponse(self.store.found(request.path_params["rid"]))

    async def delete(self, request):
        self.service.authorize(request)
        rid = request.path_params["rid"]
        if not self.store.delete(rid):
            self.store.found(rid)  # raises the 404
        return JSONResponse({"id": rid, "object": "response", "deleted": True})


class Turn:
    """One response being made: its items, its final object, what the store keeps."""

    def __init__(self, api: Responses, req: ResponsesRequest, conversation: list, job, forced: str = ""):
        self.api, self.req, self.conversation, self.job, self.forced = api, req, conversation, job, forced
        self.rid, self.reply = new_id("resp"), ReplyItems()

    def body(self, status: str, last=None, why: Optional[str] = None) -> dict:
        job = self.job
        counts = usage(job.prompt_tokens, last.generation_tokens, job.cached_tokens) if last else None
        return response_body(self.rid, self.req, self.api.scheduler.model_id, self.reply.items, status, counts, why)

    def finish(self, last, written: str) -> dict:
        """The closing event (``response.completed`` or ``.incomplete``); stores the response."""
        calls = any(i["type"] == "function_call" for i in self.reply.items)
        cut = last.finish_reason == "length" and not calls  # the token limit: "incomplete"
        status, why = ("incomplete", "max_output_tokens") if cut else ("completed", None)
        body = self.body(status, last, why)
        if self.req.store:  # the reply as written, so the next turn's prompt extends this one's
            self.api.store.put(body, self.conversation + [{"role": "assistant", "content": written}])
        return {"type": f"response.{status}", "response": body}

    async def stream(self, pieces):
        """The Responses event stream; a failure after it began is ``response.failed``."""
        seq = 0

        def numbered(events):
            nonlocal seq
            for e in events:
                yield sse(e, seq)
                seq += 1

        start = self.body("in_progress")
        for e in numbered([{"type": "response.created", "response": start},
                           {"type": "response.in_progress", "response": start}]):
            yield e
        last, written, n_calls = None, "", 0
        try:
            async for p in pieces:
                last = p.response
                written += p.response.text
                for e in numbered(self.reply.text(p.text)):
                    yield e
                for call in p.calls:
                    if n_calls and not self.req.parallel_tool_calls:
                        continue
                    n_calls += 1
                    for e in numbered(self.reply.call(call["name"], call["arguments"])):
                        yield e
            if last is None:
                raise no_reply(self.api.scheduler)
        except Exception as e:
            error = e if isinstance(e, APIError) else internal_error(e)
            failed = self.body("failed")
            failed["error"] = {"code": error.code or error.type, "message": error.message}
            for ev in numbered([{"type": "response.failed", "response": failed}]):
                yield ev
            return
        for e in numbered(self.reply.close() + [self.finish(last, self.forced + written)]):
            yield e
