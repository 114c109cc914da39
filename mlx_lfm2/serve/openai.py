"""OpenAI's routes: ``/v1/chat/completions``, ``/v1/completions``, ``/v1/models[/{id}]``
(the Responses API is ``responses.py``).

Requests are validated by the models in ``openai_api`` and served through ``service``
(auth, prepare, the reply assembler); replies are Chat Completions and Completions objects,
whole or streamed as server-sent events ending in ``[DONE]``. Errors have OpenAI's shape,
``{"error": {"message", "type", "param", "code"}}``, also inside a stream that has begun.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Optional

from sse_starlette.sse import EventSourceResponse
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from ..text.constraints import schema_errors
from ..engine.distributed import group
from .boundary import APIError, exception_handlers, internal_error, no_reply
from .openai_api import (ChatRequest, CompletionRequest, chat_chunk, new_id, openai_tool_calls,
                         to_template_messages, usage)
from .service import Routed, Service


def app(service: Service, routes: tuple = ()) -> Starlette:
    """The OpenAI routes (and ``routes``, answered with OpenAI's errors too)."""
    api = OpenAI(service)
    return Starlette(routes=[Route("/v1/chat/completions", api.chat_completions, methods=["POST"]),
                             Route("/v1/completions", api.completions, methods=["POST"]),
                             Route("/v1/models", api.models, methods=["GET"]),
                             Route("/v1/models/{name:path}", api.model, methods=["GET"]), *routes],
                     exception_handlers=exception_handlers())


class OpenAI(Routed):
    def __init__(self, service: Service):
        self.service = service

    async def chat_completions(self, request: Request):
        sv = self.service
        req = await sv.read(request, ChatRequest)
        tools = req.tool_names if req.tools and req.tool_choice != "none" else frozenset()
        messages = to_template_messages(req, self.scheduler.template_renders_tool_calls)
        prompt = await sv.render(messages, req.tools if tools else None)
        top = (req.top_logprobs or 0) if req.logprobs else None
        forced = req.forced_tool_call()  # the reply's opening, written for the model
        job = await sv.prepare(req, prompt + forced, top)
        cid, model_id = new_id("chatcmpl"), job.model
        headers = _warning_headers(job)
        if req.stream:
            return EventSourceResponse(sse_events(self._stream_chat(job, cid, req, forced, tools)), ping=15,
                                       headers=headers)
        reply = await sv.whole(request, job, forced, tools)
        content, calls = reply.text, reply.calls[:1] if req.one_call else reply.calls
        message = {"role": "assistant", "content": content if (content or not calls) else None}
        if calls:
            message["tool_calls"] = [{k: v for k, v in c.items() if k != "index"} for c in openai_tool_calls(calls)]
        choice = {"index": 0, "message": message, "finish_reason": _chat_finish(reply.last, len(calls)),
                  "logprobs": {"content": reply.logprobs} if top is not None else None,
                  **_format_check(req, job, content)}
        return JSONResponse({"id": cid, "object": "chat.completion", "created": int(time.time()),
                             "model": model_id, "choices": [choice],
                             "usage": usage(job.prompt_tokens, reply.last.generation_tokens, job.cached_tokens)},
                            headers=headers)

    async def _stream_chat(self, job, cid: str, req: ChatRequest, forced: str, tools: frozenset):
        model_id = job.model
        yield json.dumps(chat_chunk(cid, model_id, {"role": "assistant", "content": ""}))
        n_calls, last, text = 0, None, []
        async for p in self.service.pieces(job, forced, tools):
            last = p.response
            lp = {"content": [p.logprob]} if p.logprob else None
            if p.text or lp:
                yield json.dumps(chat_chunk(cid, model_id, {"content": p.text}, logprobs=lp))
                text.append(p.text)
            new = p.calls[:max(0, 1 - n_calls)] if req.one_call else p.calls
            if new:
                yield json.dumps(chat_chunk(cid, model_id, {"tool_calls": openai_tool_calls(new, n_calls)}))
                n_calls += len(new)
        if last is None:  # dropped at shutdown (or its client left): say so in the stream
            raise no_reply(self.scheduler)
        chunk = chat_chunk(cid, model_id, {}, finish=_chat_finish(last, n_calls))
        chunk["choices"][0].update(_format_check(req, job, "".join(text)))
        yield json.dumps(chunk)
        if (req.stream_options or {}).get("include_usage"):
            chunk = chat_chunk(cid, model_id, {})
            chunk["choices"] = []
            chunk["usage"] = usage(job.prompt_tokens, last.generation_tokens, job.cached_tokens)
            yield json.dumps(chunk)
        yield "[DONE]"

    async def completions(self, request: Request):
        """One choice per prompt, ``index`` in order; a batch of prompts in flight at a time."""
        req = await self.service.read(request, CompletionRequest)
        if req.echo and req.top is not None and group() is not None:  # the other ranks cannot follow
            raise APIError(400, "echo with logprobs (scoring a prompt) is not available under mlx.launch",
                           param="echo", code="unsupported")
        cid = new_id("cmpl")
        if req.stream:
            if len(req.prompts) > 1:
                raise APIError(400, "stream takes one prompt (a list of prompts is answered whole)", param="prompt")
            text, ids = self._text_and_ids(req.prompts[0])
            job = await self.service.prepare(req, text, req.top, score_ids=ids if req.echo else None,
                                             ids=None if isinstance(req.prompts[0], str) else ids)
            return EventSourceResponse(sse_events(self._stream_completion(job, req, cid, text, ids)), ping=15)
        done, step = [], self.scheduler.batch.max_batch
        for start in range(0, len(req.prompts), step):
            done += await asyncio.gather(*(self._completion(request, req, p)
                                           for p in req.prompts[start: start + step]))
        jobs = [(job, reply) for _, (job, reply) in done]
        out = completion_body(cid, jobs[0][0].model if jobs else self.scheduler.model_id,
                              [{**c, "index": i} for i, (c, _) in enumerate(done)])
        out["usage"] = usage(sum(j.prompt_tokens for j, _ in jobs), sum(r.last.generation_tokens for _, r in jobs),
                             sum(j.cached_tokens for j, _ in jobs))
        return JSONResponse(out)

    def _text_and_ids(self, prompt) -> tuple[str, list[int]]:
        """Text as given, or ids as given (scored and continued exactly as sent; their decoding
        is the text the prompt cache matches on)."""
        tok = self.service.tokenizer
        if isinstance(prompt, str):
            return prompt, tok.encode(prompt, add_special_tokens=False)
        return tok.decode(prompt), list(prompt)

    async def _completion(self, request: Request, req: CompletionRequest, prompt):
        text, ids = self._text_and_ids(prompt)
        job = await self.service.prepare(req, text, req.top, score_ids=ids if req.echo else None,
                                         ids=None if isinstance(prompt, str) else ids)
        reply = await self.service.whole(request, job, text if req.echo else "")
        lps = None
        if req.top is not None:
            lps = logprobs_block(self.service.tokenizer, ids if req.echo else None, job.scores, reply.logprobs)
        return completion_choice(reply.text, _finish(reply.last.finish_reason), lps), (job, reply)

    async def _stream_completion(self, job, req: CompletionRequest, cid: str, text: str, ids: list):
        model_id, tok = job.model, self.service.tokenizer
        last, first = None, True
        async for p in self.service.pieces(job):
            last = p.response
            lps = None
            if req.top is not None:
                lps = logprobs_block(tok, ids if req.echo and first else None, job.scores,
                                     [p.logprob] if p.logprob else [])
            piece = (text if req.echo and first else "") + p.text
            if piece or lps:
                yield json.dumps(completion_body(cid, model_id, [completion_choice(piece, None, lps)]))
            first = False
        if last is None:
            raise no_reply(self.scheduler)
        yield json.dumps(completion_body(cid, model_id, [completion_choice("", _finish(last.finish_reason))]))
        if (req.stream_options or {}).get("include_usage"):
            chunk = completion_body(cid, model_id, [])
            chunk["usage"] = usage(job.prompt_tokens, last.generation_tokens, job.cached_tokens)
            yield json.dumps(chunk)
        yield "[DONE]"

    @staticmethod
    def model_card(name: str) -> dict:
        """OpenAI's model object, with the fields Anthropic's clients read (Claude Code lists models)."""
        return {"id": name, "object": "model", "created": 0, "owned_by": "mlx_lfm2", "type": "model",
                "display_name": name, "created_at": "1970-01-01T00:00:00Z"}

    async def models(self, request: Request):
        self.service.authorize(request)
        names = self.service.names()  # the models, then each resident adapter
        return JSONResponse({"object": "list", "data": [self.model_card(n) for n in names], "has_more": False,
                             "first_id": names[0], "last_id": names[-1]})

    async def model(self, request: Request):
        self.service.authorize(request)
        name = request.path_params["name"]
        if name not in self.service.names():
            raise self.service.unknown(name)
        return JSONResponse(self.model_card(name))


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


def completion_body(cid: str, model_id: str, choices: list[dict]) -> dict:
    return {"id": cid, "object": "text_completion", "created": int(time.time()), "model": model_id,
            "choices": choices}


def completion_choice(text: str, finish: Optional[str], logprobs: Optional[dict] = None) -> dict:
    return {"index": 0, "text": text, "finish_reason": finish, "logprobs": logprobs}


def _top(chosen: str, logprob: float, alternatives) -> dict:
    """A position's ``top_logprobs``: the alternatives and the chosen token (as vLLM answers,
    so ``logprobs: 0`` still names the token, and the likeliest is always among them)."""
    return {**dict(alternatives), chosen: logprob}


def logprobs_block(tokenizer, prompt_ids: Optional[list[int]], scores, generated: list[dict]) -> dict:
    """Completions' ``logprobs``: the prompt's tokens (with ``echo``: the first has no
    context, so null, as OpenAI answered; ``scores`` from ``engine.score``), then the
    generated ones (the chat route's entries)."""
    tokens, lps, tops = [], [], []
    if prompt_ids is not None:
        strings = [tokenizer.decode([i]) for i in prompt_ids]
        tokens += strings
        lps.append(None)
        tops.append(None)
        for text, s in zip(strings[1:], scores):
            lps.append(s.logprob)
            tops.append(_top(text, s.logprob, ((tokenizer.decode([t]), lp) for t, lp in s.top)))
    for e in generated:
        tokens.append(e["token"])
        lps.append(e["logprob"])
        tops.append(_top(e["token"], e["logprob"], ((t["token"], t["logprob"]) for t in e["top_logprobs"])))
    offsets, at = [], 0
    for t in tokens:
        offsets.append(at)
        at += len(t)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def _finish(reason: Optional[str]) -> Optional[str]:
    return {"cancelled": "stop"}.get(reason, reason)


def _chat_finish(last, n_calls: int) -> Optional[str]:
    """"tool_calls" when calls were made, unless max_tokens cut the reply ("length", with the
    calls finished before the cut)."""
    return "tool_calls" if n_calls and last.finish_reason != "length" else _finish(last.finish_reason)


def _warning_headers(job) -> dict:
    """What a lenient schema skipped, said before the reply (streamed or not)."""
    if not job.schema_warnings:
        return {}
    return {"x-schema-warnings": "; ".join(job.schema_warnings).encode("ascii", "replace").decode()[:2000]}


def _format_check(req: ChatRequest, job, content: str) -> dict:
    """For ``response_format``: whether the reply validates against its schema (checked after
    generation: a lenient schema's skipped keywords are not enforced while decoding), the
    errors when not, and the skipped keywords."""
    schema = req.response_schema
    if schema is None:
        return {}
    errors = schema_errors(schema, content)
    return {"response_format_valid": not errors, **({"response_format_errors": errors} if errors else {}),
            **({"response_format_warnings": job.schema_warnings} if job.schema_warnings else {})}
