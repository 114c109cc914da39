"""OpenAI's Responses API: ``POST /v1/responses``, ``GET`` / ``DELETE /v1/responses/{id}``.

The clients that speak only this API (the OpenAI Agents SDK's default model, Codex CLI,
``ChatOpenAI(use_responses_api=True)``, ``litellm.responses()``) reach the engine through the
chat route's own machinery: a request becomes a ``ChatRequest`` (``instructions`` the
system message, input items the messages, function tools the tools, ``text.format`` the
``response_format`` its constraint compiles), and its reply comes back as output items, whole
or as the Responses stream (``response.created`` ... ``response.completed``).

The request and reply shapes (input items, output items, the response object) are
``responses_api.py``.

``store`` (default true) keeps a response, and the conversation that led to it, in memory
(the last ``MAX_STORED``, within ``MAX_STORED_BYTES`` of JSON): ``previous_response_id``
continues that conversation, so its prompt extends the one before and the prompt cache
prefills only the new turn.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from typing import Optional

from sse_starlette.sse import EventSourceResponse
from starlette.concurrency import run_in_threadpool
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

from .boundary import APIError, exception_handlers, internal_error, no_reply
from .openai_api import to_template_messages
from .responses_api import ReplyItems, ResponsesRequest, new_id, response_body, usage
from .service import Routed

MAX_STORED = 256
MAX_STORED_BYTES = 64 << 20  # their JSON, conversations included (each holds its whole history)


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
