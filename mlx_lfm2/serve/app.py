"""An OpenAI-compatible server: ``python -m mlx_lfm2.server --model PATH_OR_REPO``.

One worker thread owns the model and runs requests in arrival order from a bounded queue
(full: 429), so the event loop never blocks on MLX. Tokens travel back to each request's
coroutine through an asyncio queue; a client that disconnects sets its job's stop event,
which ends its generation at the next token and frees the worker.

Prompt reuse: after each request the worker keeps its ``PromptCache`` (cache plus the text
it consumed); a later prompt that extends one of those texts copies it and prefills only the
new part. Copies are cheap (MLX arrays are immutable) and necessary: the conv state cannot
be rewound, so a cache is never trimmed back, only extended.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import queue
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Optional

from pydantic import ValidationError
from sse_starlette.sse import EventSourceResponse
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from ..engine.generation import PromptTooLongError, default_sampling, stream_generate
from . import anthropic
from .openai_api import (APIError, ChatRequest, CompletionRequest, chat_chunk, logprob_entry, new_id,
                         openai_tool_calls, to_template_messages, usage)
from ..engine.session import PromptCache
from ..text.tools import ToolCallStream, parse_tool_calls

MAX_BODY = 4 * 1024 * 1024
DONE = object()


@dataclass
class Job:
    prompt_text: str
    kwargs: dict
    top_logprobs: Optional[int]  # None: no logprobs
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue = field(default_factory=asyncio.Queue)
    stop: threading.Event = field(default_factory=threading.Event)
    prompt_tokens: int = 0
    cached_tokens: int = 0

    def emit(self, item) -> None:
        self.loop.call_soon_threadsafe(self.out.put_nowait, item)


class Engine:
    """The model, its worker thread, the request queue and the prompt caches."""

    def __init__(self, model, tokenizer, model_id: str, queue_size: int = 16, cache_entries: int = 8,
                 max_context: Optional[int] = None):
        self.model, self.tokenizer, self.model_id = model, tokenizer, model_id
        self.max_context = min(max_context or 1 << 62, model.args.max_position_embeddings)
        self.defaults = default_sampling(model)
        self.jobs: queue.Queue = queue.Queue(maxsize=queue_size)
        self.caches: OrderedDict[str, PromptCache] = OrderedDict()
        self.cache_entries = cache_entries
        self.stats = {"completed": 0, "cancelled": 0, "active": 0}
        self.template_renders_tool_calls = "tool_calls" in (tokenizer.chat_template or "")
        threading.Thread(target=self._work, daemon=True, name="mlx_lfm2-worker").start()

    def submit(self, job: Job) -> None:
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise APIError(429, "the server is busy: too many queued requests, retry shortly",
                           type_="rate_limit_error", code="queue_full")

    def _take_cache(self, text: str) -> PromptCache:
        """A copy of the cached prompt that is the longest prefix of ``text`` (or a fresh one)."""
        best = max((k for k in self.caches if text.startswith(k)), key=len, default=None)
        if best is None:
            return PromptCache(self.model)
        self.caches.move_to_end(best)
        return self.caches[best].copy()

    def _keep_cache(self, pc: PromptCache) -> None:
        if pc.offset == len(pc.tokens) and pc.text:
            self.caches[pc.text] = pc
            self.caches.move_to_end(pc.text)
            while len(self.caches) > self.cache_entries:
                self.caches.popitem(last=False)

    def _work(self) -> None:
        while True:
            job = self.jobs.get()
            if job.stop.is_set():  # its client left while it waited
                self.stats["cancelled"] += 1
                job.emit(DONE)
                continue
            self.stats["active"] = 1
            try:
                self._run(job)
            except Exception as e:  # report it to that request; the worker lives on
                job.emit(APIError(500, f"generation failed: {type(e).__name__}: {e}", type_="server_error"))
            finally:
                self.stats["active"] = 0
                job.emit(DONE)

    def _run(self, job: Job) -> None:
        tok = self.tokenizer
        pc = self._take_cache(job.prompt_text)
        ids = pc.new_tokens(tok, job.prompt_text)
        job.cached_tokens = pc.offset
        job.prompt_tokens = pc.offset + len(ids)
        generated, finished = [], False
        for r in stream_generate(self.model, tok, ids, cache=pc.cache, stop_event=job.stop, **job.kwargs):
            if r.token is not None:
                generated.append(r.token)
            entry = None
            if job.top_logprobs is not None and r.logprobs is not None and not r.finish_reason:
                entry = logprob_entry(tok, r.token, r.logprobs, job.top_logprobs)
            job.emit((r, entry))
            finished = r.finish_reason is not None
        if job.stop.is_set():
            self.stats["cancelled"] += 1
        else:
            self.stats["completed"] += 1
        if finished:
            pc.commit(tok, job.prompt_text, ids, generated)
            self._keep_cache(pc)


def _error(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


async def _body(request: Request) -> dict:
    size = request.headers.get("content-length")
    if size and size.isdigit() and int(size) > MAX_BODY:
        raise APIError(413, f"request body over {MAX_BODY} bytes", code="body_too_large")
    raw = await request.body()
    if len(raw) > MAX_BODY:
        raise APIError(413, f"request body over {MAX_BODY} bytes", code="body_too_large")
    try:
        body = json.loads(raw)
    except ValueError as e:
        raise APIError(400, f"the body is not valid JSON: {e}", code="invalid_json")
    if not isinstance(body, dict):
        raise APIError(400, "the body must be a JSON object", code="invalid_json")
    return body


def _validate(model_cls, body: dict):
    try:
        return model_cls.model_validate(body)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise APIError(422, f"{where}: {err['msg']}" if where else err["msg"], param=where or None,
                       code="invalid_value")


def create_app(engine: Engine, api_key: Optional[str] = None) -> Starlette:
    tok = engine.tokenizer

    def check_auth(request: Request) -> None:
        if api_key and request.headers.get("authorization") != f"Bearer {api_key}":
            raise APIError(401, "missing or wrong API key (Authorization: Bearer ...)",
                           type_="authentication_error", code="invalid_api_key")

    def prepare(req, prompt_text: str, top_logprobs) -> Job:
        n_prompt = len(tok.encode(prompt_text, add_special_tokens=False))
        if n_prompt + 1 > engine.max_context:
            raise APIError(400, f"this prompt has {n_prompt} tokens, over the model's context of "
                           f"{engine.max_context}", param="messages", code="context_length_exceeded")
        kwargs = req.sampling_kwargs(engine.defaults)
        kwargs["max_tokens"] = min(req.limit or engine.max_context, engine.max_context - n_prompt)
        job = Job(prompt_text, kwargs, top_logprobs, asyncio.get_running_loop())
        engine.submit(job)
        return job

    async def results(job: Job, request: Request):
        """(response, logprob entry) pairs until done; stops the job if the client leaves."""
        try:
            while True:
                try:
                    item = await asyncio.wait_for(job.out.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        job.stop.set()
                        return
                    continue
                if item is DONE:
                    return
                if isinstance(item, APIError):
                    raise item
                yield item
        finally:
            job.stop.set()  # a no-op when finished; frees the worker when the client is gone

    async def chat_completions(request: Request):
        check_auth(request)
        req = _validate(ChatRequest, await _body(request))
        messages = to_template_messages(req, engine.template_renders_tool_calls)
        tools = req.tools if req.tool_choice != "none" else None
        try:
            prompt = tok.apply_chat_template(messages, tools=tools, add_generation_prompt=True)
        except Exception as e:
            raise APIError(400, f"the chat template rejected these messages: {e}", param="messages")
        top = (req.top_logprobs or 0) if req.logprobs else None
        forced = req.forced_tool_call()  # the reply's opening, written for the model
        job = prepare(req, prompt + forced, top)
        cid, model_id = new_id("chatcmpl"), engine.model_id
        if req.stream:
            return EventSourceResponse(_stream_chat(job, request, cid, model_id, req, forced), ping=15)
        text, entries, last = forced, [], None
        async for r, entry in results(job, request):
            text += r.text
            last = r
            if entry:
                entries.append(entry)
        if last is None:
            raise APIError(499, "client closed the request")
        content, calls = parse_tool_calls(text) if tools else (text, [])
        message = {"role": "assistant", "content": content if (content or not calls) else None}
        finish = last.finish_reason
        if calls:
            message["tool_calls"] = [{k: v for k, v in c.items() if k != "index"} for c in openai_tool_calls(calls)]
            finish = "tool_calls"
        choice = {"index": 0, "message": message, "finish_reason": _finish(finish),
                  "logprobs": {"content": entries} if top is not None else None}
        if req.response_format and req.response_format.get("type") != "text":
            choice["response_format_valid"] = _is_json(content)
        return JSONResponse({"id": cid, "object": "chat.completion", "created": int(time.time()),
                             "model": model_id, "choices": [choice],
                             "usage": usage(job.prompt_tokens, last.generation_tokens, job.cached_tokens)})

    async def _stream_chat(job, request, cid, model_id, req, forced):
        tools = ToolCallStream() if req.tools and req.tool_choice != "none" else None
        if tools:
            tools.feed(forced)  # held back like any call until it closes
        yield json.dumps(chat_chunk(cid, model_id, {"role": "assistant", "content": ""}))
        n_calls, last = 0, None
        async for r, entry in results(job, request):
            last = r
            piece = tools.feed(r.text) if tools else r.text
            if tools and r.finish_reason:
                piece += tools.finish()
            lp = {"content": [entry]} if entry else None
            if piece or lp:
                yield json.dumps(chat_chunk(cid, model_id, {"content": piece}, logprobs=lp))
            if tools:
                new = tools.new_calls()
                if new:
                    yield json.dumps(chat_chunk(cid, model_id, {"tool_calls": openai_tool_calls(new, n_calls)}))
                    n_calls += len(new)
        if last is None:
            return
        finish = "tool_calls" if n_calls else _finish(last.finish_reason)
        yield json.dumps(chat_chunk(cid, model_id, {}, finish=finish))
        if (req.stream_options or {}).get("include_usage"):
            chunk = chat_chunk(cid, model_id, {})
            chunk["choices"] = []
            chunk["usage"] = usage(job.prompt_tokens, last.generation_tokens, job.cached_tokens)
            yield json.dumps(chunk)
        yield "[DONE]"

    async def completions(request: Request):
        check_auth(request)
        req = _validate(CompletionRequest, await _body(request))
        prompt = req.prompt if isinstance(req.prompt, str) else tok.decode(req.prompt)
        job = prepare(req, prompt, (req.logprobs or 0) if req.logprobs else None)
        cid, model_id = new_id("cmpl"), engine.model_id

        def body(text, finish, lps=None):
            return {"id": cid, "object": "text_completion", "created": int(time.time()), "model": model_id,
                    "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": lps}]}

        if req.stream:
            async def events():
                last = None
                async for r, _ in results(job, request):
                    last = r
                    if r.text:
                        yield json.dumps(body(r.text, None))
                if last is not None:
                    yield json.dumps(body("", _finish(last.finish_reason)))
                    yield "[DONE]"
            return EventSourceResponse(events(), ping=15)
        text, last, tokens, token_lps = (prompt if req.echo else ""), None, [], []
        async for r, entry in results(job, request):
            text += r.text
            last = r
            if entry:
                tokens.append(entry["token"])
                token_lps.append(entry["logprob"])
        if last is None:
            raise APIError(499, "client closed the request")
        out = body(text, _finish(last.finish_reason),
                   {"tokens": tokens, "token_logprobs": token_lps} if req.logprobs else None)
        out["usage"] = usage(job.prompt_tokens, last.generation_tokens, job.cached_tokens)
        return JSONResponse(out)

    async def models(request: Request):
        check_auth(request)
        return JSONResponse({"object": "list", "data": [
            {"id": engine.model_id, "object": "model", "created": 0, "owned_by": "mlx_lfm2"}]})

    async def health(request: Request):
        return JSONResponse({"status": "ok", "queued": engine.jobs.qsize(), **engine.stats,
                             "cached_prompts": len(engine.caches)})

    async def api_error(request, exc: APIError):
        return _error(exc)

    async def http_error(request, exc: HTTPException):
        kind = {404: "not_found_error", 405: "invalid_request_error"}.get(exc.status_code, "invalid_request_error")
        return _error(APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", kind))

    async def crash(request, exc: Exception):
        return _error(APIError(500, "internal error", type_="server_error"))

    return Starlette(
        routes=[
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/v1/completions", completions, methods=["POST"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/health", health, methods=["GET"]),
            *anthropic.routes(engine, api_key, _body, _validate, prepare, results),
        ],
        exception_handlers={APIError: api_error, HTTPException: http_error, Exception: crash},
    )


def _finish(reason: Optional[str]) -> Optional[str]:
    return {"cancelled": "stop"}.get(reason, reason)


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except ValueError:
        return False


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="OpenAI-compatible server for LFM2 models.")
    p.add_argument("--model", required=True, help="model folder or hub repo id")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY'")
    p.add_argument("--queue-size", type=int, default=16, help="requests waiting before 429")
    p.add_argument("--max-context", type=int, help="context limit in tokens (default: the model's)")
    p.add_argument("--cache-entries", type=int, default=8, help="prompt caches kept for reuse")
    a = p.parse_args(argv)
    import uvicorn

    from ..weights.loader import load

    try:
        model, tokenizer = load(a.model)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    engine = Engine(model, tokenizer, a.model, a.queue_size, a.cache_entries, a.max_context)
    uvicorn.run(create_app(engine, a.api_key), host=a.host, port=a.port, log_level="warning")


if __name__ == "__main__":
    main()
