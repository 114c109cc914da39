"""OpenAI's routes: ``/v1/chat/completions``, ``/v1/completions``, ``/v1/models``.

Requests are validated by the models in ``openai_api`` and served through ``service``
(auth, prepare, the reply assembler); replies are Chat Completions and Completions objects,
whole or streamed as server-sent events ending in ``[DONE]``. Errors have OpenAI's shape,
``{"error": {"message", "type", "param", "code"}}``, also inside a stream that has begun.
"""

from __future__ import annotations

import json
import time
from typing import Optional

from sse_starlette.sse import EventSourceResponse
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from .boundary import APIError, exception_handlers, internal_error, no_reply
from .openai_api import (ChatRequest, CompletionRequest, chat_chunk, new_id, openai_tool_calls,
                         to_template_messages, usage)
from .service import Service


def app(service: Service, routes: tuple = ()) -> Starlette:
    """The OpenAI routes (and ``routes``, answered with OpenAI's errors too)."""
    api = OpenAI(service)
    return Starlette(routes=[Route("/v1/chat/completions", api.chat_completions, methods=["POST"]),
                             Route("/v1/completions", api.completions, methods=["POST"]),
                             Route("/v1/models", api.models, methods=["GET"]), *routes],
                     exception_handlers=exception_handlers())


class OpenAI:
    def __init__(self, service: Service):
        self.service = service
        self.scheduler = service.scheduler

    async def chat_completions(self, request: Request):
        sv = self.service
        req = await sv.read(request, ChatRequest)
        tools = req.tool_names if req.tools and req.tool_choice != "none" else frozenset()
        messages = to_template_messages(req, self.scheduler.template_renders_tool_calls)
        prompt = sv.render(messages, req.tools if tools else None)
        top = (req.top_logprobs or 0) if req.logprobs else None
        forced = req.forced_tool_call()  # the reply's opening, written for the model
        job = await sv.prepare(req, prompt + forced, top)
        cid, model_id = new_id("chatcmpl"), self.scheduler.model_id
        if req.stream:
            return EventSourceResponse(sse_events(self._stream_chat(job, cid, req, forced, tools)), ping=15)
        reply = await sv.whole(request, job, forced, tools)
        content, calls = reply.text, reply.calls
        message = {"role": "assistant", "content": content if (content or not calls) else None}
        finish = reply.last.finish_reason
        if calls:
            message["tool_calls"] = [{k: v for k, v in c.items() if k != "index"} for c in openai_tool_calls(calls)]
            finish = "tool_calls"
        choice = {"index": 0, "message": message, "finish_reason": _finish(finish),
                  "logprobs": {"content": reply.logprobs} if top is not None else None}
        if req.response_format and req.response_format.get("type") != "text":
            choice["response_format_valid"] = _is_json(content)
        return JSONResponse({"id": cid, "object": "chat.completion", "created": int(time.time()),
                             "model": model_id, "choices": [choice],
                             "usage": usage(job.prompt_tokens, reply.last.generation_tokens, job.cached_tokens)})

    async def _stream_chat(self, job, cid: str, req: ChatRequest, forced: str, tools: frozenset):
        model_id = self.scheduler.model_id
        yield json.dumps(chat_chunk(cid, model_id, {"role": "assistant", "content": ""}))
        n_calls, last = 0, None
        async for p in self.service.pieces(job, forced, tools):
            last = p.response
            lp = {"content": [p.logprob]} if p.logprob else None
            if p.text or lp:
                yield json.dumps(chat_chunk(cid, model_id, {"content": p.text}, logprobs=lp))
            if p.calls:
                yield json.dumps(chat_chunk(cid, model_id, {"tool_calls": openai_tool_calls(p.calls, n_calls)}))
                n_calls += len(p.calls)
        if last is None:  # dropped at shutdown (or its client left): say so in the stream
            raise no_reply(self.scheduler)
        finish = "tool_calls" if n_calls else _finish(last.finish_reason)
        yield json.dumps(chat_chunk(cid, model_id, {}, finish=finish))
        if (req.stream_options or {}).get("include_usage"):
            chunk = chat_chunk(cid, model_id, {})
            chunk["choices"] = []
            chunk["usage"] = usage(job.prompt_tokens, last.generation_tokens, job.cached_tokens)
            yield json.dumps(chunk)
        yield "[DONE]"

    async def completions(self, request: Request):
        sv = self.service
        req = await sv.read(request, CompletionRequest)
        prompt = req.prompt if isinstance(req.prompt, str) else sv.tokenizer.decode(req.prompt)
        job = await sv.prepare(req, prompt, (req.logprobs or 0) if req.logprobs else None)
        cid, model_id = new_id("cmpl"), self.scheduler.model_id

        def body(text, finish, lps=None):
            return {"id": cid, "object": "text_completion", "created": int(time.time()), "model": model_id,
                    "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": lps}]}

        if req.stream:
            async def events():
                last = None
                async for p in sv.pieces(job):
                    last = p.response
                    if p.text:
                        yield json.dumps(body(p.text, None))
                if last is None:
                    raise no_reply(self.scheduler)
                yield json.dumps(body("", _finish(last.finish_reason)))
                yield "[DONE]"
            return EventSourceResponse(sse_events(events()), ping=15)
        reply = await sv.whole(request, job, prompt if req.echo else "")
        lps = {"tokens": [e["token"] for e in reply.logprobs],
               "token_logprobs": [e["logprob"] for e in reply.logprobs]} if req.logprobs else None
        out = body(reply.text, _finish(reply.last.finish_reason), lps)
        out["usage"] = usage(job.prompt_tokens, reply.last.generation_tokens, job.cached_tokens)
        return JSONResponse(out)

    async def models(self, request: Request):
        self.service.authorize(request)
        return JSONResponse({"object": "list", "data": [
            {"id": self.scheduler.model_id, "object": "model", "created": 0, "owned_by": "mlx_lfm2"}]})


async def sse_events(events):
    """Server-sent events; a failure after the 200 was sent becomes an error event (the
    shape OpenAI streams), so a client always learns why its stream ended."""
    try:
        async for event in events:
            yield event
    except APIError as e:
        yield json.dumps(e.body())
    except Exception as e:
        yield json.dumps(internal_error(e).body())


def _finish(reason: Optional[str]) -> Optional[str]:
    return {"cancelled": "stop"}.get(reason, reason)


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except ValueError:
        return False
