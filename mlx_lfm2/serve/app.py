"""An OpenAI-compatible server: ``python -m mlx_lfm2.server --model PATH_OR_REPO``.

One worker thread owns the model, so the event loop never blocks on MLX. It takes requests
in arrival order from a bounded queue (full: 429) into a continuous batch of up to
``max_batch`` (engine/batch.py): every active request decodes in the same forward, each with
its own sampling, stops and limit, and a newcomer's prefill is interleaved with the others'
decode steps. Tokens travel back to each request's coroutine through an asyncio queue; a
client that disconnects sets its job's stop event, which takes its row out of the batch at
the next step.

Prompt reuse: after each request the worker keeps its ``PromptCache`` (cache plus the text
it consumed); a later prompt copies the one that shares the longest prefix with it, which
extends, or rewinds to the longest common prefix it can reach (a regenerated reply or an
edited last message), and prefills only the rest. Copies are cheap (MLX arrays are immutable).
With ``--draft-model`` or ``--prompt-lookup`` replies are decoded speculatively, one request
at a time (as under ``mlx.launch``, whose ranks must run the same steps).

Limits (see README, "Security model", and ``boundary``): bodies are JSON of bounded size read
within a deadline, every value is validated by ``openai_api`` before it reaches the worker, a
reply is at most ``default_max_tokens`` unless the request asks for more (never past the
context), and a client that leaves stops its job.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import queue
import sys
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Optional

from sse_starlette.sse import EventSourceResponse
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.routing import Route

from ..engine.batch import BatchGenerator, TextStream, request_for
from ..engine.generation import default_sampling, stream_generate
from . import anthropic, completions, responses
from .boundary import (BODY_TIMEOUT, HEADER_TIMEOUT, error_response, make_server, no_reply, read_body,
                       sse_events, validate, watch)
from .openai_api import (APIError, ChatRequest, chat_chunk, logprob_entry, new_id,
                         openai_tool_calls, to_template_messages, usage)
from ..engine.distributed import broadcast, group, leader
from ..engine.session import PromptCache
from ..text.constraints import ConstraintError, make_constraint
from ..text.tools import ToolCallStream, parse_tool_calls

DEFAULT_MAX_TOKENS = 2048
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
    started: bool = False  # a token was generated

    def emit(self, item) -> None:
        self.loop.call_soon_threadsafe(self.out.put_nowait, item)


@dataclass
class WorkerCall:
    """A function to run on the worker thread (which owns the model), between batch steps."""
    fn: object
    loop: asyncio.AbstractEventLoop
    done: asyncio.Future
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        try:
            result, error = self.fn(), None
        except Exception as e:
            result, error = None, e
        self.loop.call_soon_threadsafe(
            lambda: self.done.done() or (self.done.set_exception(error) if error else self.done.set_result(result)))

    def emit(self, item) -> None:  # shutdown drops it like a job
        self.loop.call_soon_threadsafe(
            lambda: self.done.done() or self.done.set_exception(APIError(503, "the server is shutting down",
                                                                         type_="server_error")))


class Engine:
    """The model, its worker thread, the request queue and the prompt caches."""

    def __init__(self, model, tokenizer, model_id: str, queue_size: int = 16, cache_entries: int = 8,
                 max_context: Optional[int] = None, default_max_tokens: int = DEFAULT_MAX_TOKENS,
                 max_batch: int = 8, draft_model=None, prompt_lookup: bool = False,
                 num_draft_tokens: Optional[int] = None):
        self.model, self.tokenizer, self.model_id = model, tokenizer, model_id
        self.draft_model = draft_model
        self.speculative = dict(prompt_lookup=prompt_lookup, num_draft_tokens=num_draft_tokens)
        self.max_context = min(max_context or 1 << 62, model.args.max_position_embeddings)
        self.default_max_tokens = default_max_tokens
        # Ids from requests must index both the tokenizer and the embedding rows.
        rows = getattr(model.args, "vocab_size", None)
        self.vocab = min(tokenizer.vocab_size, rows) if rows else tokenizer.vocab_size
        self.live: dict = {}  # uid -> _Live: the requests in the batch
        self.current: Optional[Job] = None  # the request of the one-at-a-time path
        self.batch = BatchGenerator(model, max_batch)
        self.closed = False
        self.defaults = default_sampling(model)
        self.jobs: queue.Queue = queue.Queue(maxsize=queue_size)
        self.caches: OrderedDict[str, PromptCache] = OrderedDict()
        self.cache_entries = cache_entries
        self.stats = {"completed": 0, "cancelled": 0, "active": 0, "peak_batch": 0}
        self.template_renders_tool_calls = "tool_calls" in (tokenizer.chat_template or "")
        threading.Thread(target=self._work, daemon=True, name="mlx_lfm2-worker").start()

    def submit(self, job: Job) -> None:
        if self.closed:
            raise APIError(503, "the server is shutting down", type_="server_error", code="shutting_down")
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise APIError(429, "the server is busy: too many queued requests, retry shortly",
                           type_="rate_limit_error", code="queue_full")

    async def on_worker(self, fn):
        """``fn()`` run on the worker thread, queued like a request (full queue: 429)."""
        if group() is not None:  # the other ranks would wait for a step that never comes
            raise APIError(400, "this request needs a forward of its own (scoring a prompt), "
                                "which is not available under mlx.launch", code="unsupported")
        loop = asyncio.get_running_loop()
        call = WorkerCall(fn, loop, loop.create_future())
        self.submit(call)
        return await call.done

    def _take_cache(self, text: str) -> PromptCache:
        """A copy of the cached prompt sharing the longest prefix with ``text`` (or a fresh one);
        ``PromptCache.new_tokens`` then extends it or rewinds it to what it can reuse."""
        shared = {k: len(os.path.commonprefix([k, text])) for k in self.caches}
        best = max(shared, key=shared.get, default=None)
        if best is None or shared[best] == 0:
            return PromptCache(self.model, draft_model=self.draft_model)
        self.caches.move_to_end(best)
        return self.caches[best].copy()

    def close(self) -> None:
        """Stop the running job and drop the queued ones (on SIGTERM/SIGINT): their handlers
        return at once, so the server's graceful shutdown does not wait on generation."""
        self.closed = True
        while True:
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                break
            job.stop.set()
            job.emit(DONE)
        for live in self.live.copy().values():  # copy(): atomic while the worker changes it
            live.job.stop.set()
        if self.current is not None:
            self.current.stop.set()

    def _keep_cache(self, pc: PromptCache) -> None:
        if pc.offset == len(pc.tokens) and pc.text:
            self.caches[pc.text] = pc
            self.caches.move_to_end(pc.text)
            while len(self.caches) > self.cache_entries:
                self.caches.popitem(last=False)

    def _work(self) -> None:
        if self.draft_model is not None or self.speculative["prompt_lookup"] or group() is not None:
            return self._work_serial()  # speculative decoding and mlx.launch ranks: one at a time
        while True:
            self._admit()
            for uid, live in list(self.live.items()):
                if live.job.stop.is_set():  # its client left: out of the batch now
                    self._end(uid, self.batch.remove(uid), [live.text.end("cancelled")])
            if not self.live:
                continue
            try:
                tokens = self.batch.step()
                self.stats["peak_batch"] = max(self.stats["peak_batch"], len(tokens))
            except Exception as e:  # report it to every request in the batch; the worker lives on
                for uid, live in self.live.items():
                    live.job.emit(APIError(500, f"generation failed: {type(e).__name__}: {e}", type_="server_error"))
                    live.job.emit(DONE)
                self.live.clear()
                self.batch = BatchGenerator(self.model, self.batch.max_batch)
                self.stats["active"] = 0
                continue
            for t in tokens:
                live = self.live[t.uid]
                out = live.text.feed(t.token, t.logprobs, t.finish_reason)
                if out[-1].finish_reason:
                    cache = t.cache if t.finish_reason else self.batch.remove(t.uid)  # a stop string
                    self._end(t.uid, cache, out)
                else:
                    self._emit(live, out)

    def _admit(self) -> None:
        """Move queued requests into the batch while it has room; wait for one when idle."""
        while len(self.live) < self.batch.max_batch:
            try:
                job = self.jobs.get(block=not self.live)
            except queue.Empty:
                return
            if isinstance(job, WorkerCall):
                job.run()
                continue
            if job.stop.is_set():  # its client left while it waited
                self.stats["cancelled"] += 1
                job.emit(DONE)
                continue
            try:
                self._insert(job)
            except ValueError as e:  # the request's fault, found before its first token: a 400
                job.emit(APIError(400, str(e), code="invalid_value"))
                job.emit(DONE)
            except Exception as e:
                job.emit(APIError(500, f"generation failed: {type(e).__name__}: {e}", type_="server_error"))
                job.emit(DONE)

    def _prompt_cache(self, prompt_text: str):
        """The cached conversation sharing the most of ``prompt_text``, and the ids still to feed."""
        pc = self._take_cache(prompt_text)
        ids = pc.new_tokens(self.tokenizer, prompt_text)
        if not ids:  # a cache that consumed this whole prompt leaves nothing to sample from
            pc = PromptCache(self.model, draft_model=self.draft_model)
            ids = pc.new_tokens(self.tokenizer, prompt_text)
        return pc, ids

    def _insert(self, job: Job) -> None:
        tok = self.tokenizer
        pc, ids = self._prompt_cache(job.prompt_text)
        kwargs = dict(job.kwargs)
        stop = kwargs.pop("stop", None)
        request = request_for(self.model, tok, ids, held=pc.offset, **kwargs)
        job.cached_tokens = pc.offset
        job.prompt_tokens = pc.offset + len(ids)
        live = _Live(job, pc, ids, TextStream(tok, stop, len(ids)))
        if request["max_tokens"] == 0:
            job.emit((live.text.end("length"), None))
            self.stats["completed"] += 1
            job.emit(DONE)
            return
        uid = self.batch.insert(**request, cache=pc.cache)
        self.live[uid] = live
        self.stats["active"] = len(self.live)

    def _emit(self, live: "_Live", responses) -> None:
        for r in responses:
            live.job.started = True
            if r.token is not None:
                live.generated.append(r.token)
            entry = None
            if live.job.top_logprobs is not None and r.logprobs is not None and not r.finish_reason:
                entry = logprob_entry(self.tokenizer, r.token, r.logprobs, live.job.top_logprobs)
            live.job.emit((r, entry))

    def _end(self, uid: int, cache: Optional[list], responses) -> None:
        """A request leaves the batch: its last responses, the stats, its cache kept for reuse."""
        live = self.live.pop(uid)
        self._emit(live, responses)
        self.stats["cancelled" if live.job.stop.is_set() else "completed"] += 1
        self.stats["active"] = len(self.live)
        if cache is not None:  # None: it left before its prefill finished
            live.pc.cache = cache
            live.pc.commit(self.tokenizer, live.job.prompt_text, live.ids, live.generated)
            self._keep_cache(live.pc)
        live.job.emit(DONE)


    def _work_serial(self) -> None:
        while True:
            job = self.jobs.get()
            if isinstance(job, WorkerCall):
                job.run()
                continue
            if job.stop.is_set():  # its client left while it waited
                self.stats["cancelled"] += 1
                job.emit(DONE)
                continue
            self.stats["active"], self.current = 1, job
            try:
                if group() is not None:  # mlx.launch: the other ranks run it with us (follow())
                    broadcast({"prompt_text": job.prompt_text, "kwargs": job.kwargs})
                self._run(job)
            except ValueError as e:
                # The engine checks its inputs before the first token: a ValueError then is
                # the request's fault (a 400); one later is a fault of ours.
                if job.started:
                    job.emit(APIError(500, f"generation failed: {e}", type_="server_error"))
                else:
                    job.emit(APIError(400, str(e), code="invalid_value"))
            except Exception as e:  # report it to that request; the worker lives on
                job.emit(APIError(500, f"generation failed: {type(e).__name__}: {e}", type_="server_error"))
            finally:
                self.stats["active"], self.current = 0, None
                job.emit(DONE)

    def _run(self, job: Job) -> None:
        tok = self.tokenizer
        pc, ids = self._prompt_cache(job.prompt_text)
        job.cached_tokens = pc.offset
        job.prompt_tokens = pc.offset + len(ids)
        generated, finished = [], False
        spec = dict(self.speculative, draft_model=self.draft_model, draft_cache=pc.draft_cache)
        for r in stream_generate(self.model, tok, ids, cache=pc.cache, stop_event=job.stop, **spec, **job.kwargs):
            job.started = True
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

    def follow(self) -> None:
        """Ranks other than 0 under mlx.launch: run each job rank 0 runs, with no client."""
        while True:
            spec = broadcast()
            kwargs = spec["kwargs"]
            if kwargs.get("logit_bias"):  # JSON made its token ids strings
                kwargs["logit_bias"] = {int(k): v for k, v in kwargs["logit_bias"].items()}
            job = Job(spec["prompt_text"], kwargs, None, loop=None)
            job.emit = lambda item: None
            try:
                self._run(job)
            except Exception:  # rank 0 met the same error and reports it to its client
                pass


@dataclass
class _Live:
    job: Job
    pc: PromptCache
    ids: list  # the prompt ids prefilled (those after the cached prefix)
    text: TextStream
    generated: list = field(default_factory=list)


def create_app(engine: Engine, api_key: Optional[str] = None, body_timeout: float = BODY_TIMEOUT) -> Starlette:
    tok = engine.tokenizer

    def check_auth(request: Request) -> None:
        if api_key and request.headers.get("authorization") != f"Bearer {api_key}":
            raise APIError(401, "missing or wrong API key (Authorization: Bearer ...)",
                           type_="authentication_error", code="invalid_api_key")

    async def constrained(req) -> dict:
        """The request's constraint (``response_format``, forced tool call), compiled once here,
        off the event loop (the first builds llguidance's view of the vocabulary, ~1 s), so a
        bad schema is a 400 naming the problem before any streaming starts."""
        param = "tools" if isinstance(req, ChatRequest) and req.forced_tool_call() else "response_format"
        try:
            constraint = req.constraint()
            if constraint:
                await run_in_threadpool(lambda: make_constraint(tok, **constraint))
        except ConstraintError as e:
            raise APIError(400, f"{param}: {e}", param=param, code="invalid_schema")
        return constraint

    def prepare(req, prompt_text: str, top_logprobs, constraint: Optional[dict] = None) -> Job:
        n_prompt = len(tok.encode(prompt_text, add_special_tokens=False))
        if n_prompt + 1 > engine.max_context:
            raise APIError(400, f"this prompt has {n_prompt} tokens, over the model's context of "
                           f"{engine.max_context}", param="messages", code="context_length_exceeded")
        kwargs = req.sampling_kwargs(engine.defaults)
        limit = engine.default_max_tokens if req.limit is None else req.limit  # 0: score only (completions)
        kwargs["max_tokens"] = min(limit, engine.max_context - n_prompt)
        kwargs.update(constraint or {})
        job = Job(prompt_text, kwargs, top_logprobs, asyncio.get_running_loop())
        engine.submit(job)
        return job

    async def results(job: Job):
        """(response, logprob entry) pairs until done. Whoever drives this stops the job when
        the client leaves: ``watch`` for a plain reply, sse-starlette for a stream."""
        try:
            while True:
                item = await job.out.get()
                if item is DONE:
                    return
                if isinstance(item, APIError):
                    raise item
                yield item
        finally:
            job.stop.set()  # a no-op when finished; frees the worker when the client is gone

    async def chat_completions(request: Request):
        check_auth(request)
        req = validate(ChatRequest, await read_body(request, body_timeout), engine.vocab)
        messages = to_template_messages(req, engine.template_renders_tool_calls)
        tools = req.tools if req.tool_choice != "none" else None
        try:
            prompt = tok.apply_chat_template(messages, tools=tools, add_generation_prompt=True)
        except Exception as e:
            raise APIError(400, f"the chat template rejected these messages: {e}", param="messages")
        top = (req.top_logprobs or 0) if req.logprobs else None
        forced = req.forced_tool_call()  # the reply's opening, written for the model
        job = prepare(req, prompt + forced, top, await constrained(req))
        cid, model_id = new_id("chatcmpl"), engine.model_id
        if req.stream:
            return EventSourceResponse(sse_events(_stream_chat(job, cid, model_id, req, forced)), ping=15)
        text, entries, last = forced, [], None
        async with watch(request, job):
            async for r, entry in results(job):
                text += r.text
                last = r
                if entry:
                    entries.append(entry)
        if last is None:
            raise no_reply(engine)
        content, calls = parse_tool_calls(text, bare_names=req.tool_names) if tools else (text, [])
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

    async def _stream_chat(job, cid, model_id, req, forced):
        tools = ToolCallStream(bare_names=req.tool_names) if req.tools and req.tool_choice != "none" else None
        if tools:
            tools.feed(forced)  # held back like any call until it closes
        yield json.dumps(chat_chunk(cid, model_id, {"role": "assistant", "content": ""}))
        n_calls, last = 0, None
        async for r, entry in results(job):
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
        if last is None:  # dropped at shutdown (or its client left): say so in the stream
            raise no_reply(engine)
        finish = "tool_calls" if n_calls else _finish(last.finish_reason)
        yield json.dumps(chat_chunk(cid, model_id, {}, finish=finish))
        if (req.stream_options or {}).get("include_usage"):
            chunk = chat_chunk(cid, model_id, {})
            chunk["choices"] = []
            chunk["usage"] = usage(job.prompt_tokens, last.generation_tokens, job.cached_tokens)
            yield json.dumps(chunk)
        yield "[DONE]"

    def model_card() -> dict:  # OpenAI's model object, with the fields Anthropic's clients read
        return {"id": engine.model_id, "object": "model", "created": 0, "owned_by": "mlx_lfm2",
                "type": "model", "display_name": engine.model_id, "created_at": "1970-01-01T00:00:00Z"}

    async def models(request: Request):
        check_auth(request)
        return JSONResponse({"object": "list", "data": [model_card()], "has_more": False,
                             "first_id": engine.model_id, "last_id": engine.model_id})

    async def model(request: Request):
        check_auth(request)
        if request.path_params["name"] != engine.model_id:
            raise APIError(404, f"model {request.path_params['name']!r} not found: this server serves "
                                f"{engine.model_id!r}", type_="not_found_error", code="model_not_found")
        return JSONResponse(model_card())

    async def health(request: Request):
        import mlx.core as mx

        return JSONResponse({"status": "ok", "queued": engine.jobs.qsize(), **engine.stats,
                             "batch": engine.batch.status, "cached_prompts": len(engine.caches),
                             "mlx_active_mb": round(mx.get_active_memory() / 2**20, 1),
                             "mlx_cache_mb": round(mx.get_cache_memory() / 2**20, 1)})

    async def api_error(request, exc: APIError):
        response = error_response(exc)
        if exc.status in (408, 413):  # the rest of the body is not read: end the connection
            response.headers["connection"] = "close"
        return response

    async def http_error(request, exc: HTTPException):
        kind = {404: "not_found_error", 405: "invalid_request_error"}.get(exc.status_code, "invalid_request_error")
        error = APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", kind)
        return anthropic.error_response(error) if request.url.path.startswith("/v1/messages") else error_response(error)

    async def crash(request, exc: Exception):  # the catch-all: logged by uvicorn, answered here
        return error_response(APIError(500, f"internal error: {type(exc).__name__}", type_="server_error"))

    return Starlette(
        routes=[
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            *completions.routes(engine, check_auth, body_timeout, constrained, prepare, results, engine.on_worker),
            Route("/v1/models", models, methods=["GET"]),
            Route("/v1/models/{name:path}", model, methods=["GET"]),
            Route("/health", health, methods=["GET"]),
            *anthropic.routes(engine, api_key, body_timeout, constrained, prepare, results),
            *responses.routes(engine, check_auth, body_timeout, constrained, prepare, results, responses.Store()),
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


def served_name(model: str, given: Optional[str] = None) -> str:
    """The model's id in the API: a name, never a local path (which would tell every client
    where the server's files live): ``--served-model-name``, a folder's name, or the repo id."""
    if given:
        return given
    path = os.path.expanduser(model)
    return os.path.basename(os.path.normpath(os.path.abspath(path))) if os.path.exists(path) else model


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="OpenAI-compatible server for LFM2 models.")
    p.add_argument("--model", required=True, help="model folder or hub repo id")
    p.add_argument("--served-model-name", help="the model's name in the API (default: the folder's name or the repo id)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY'")
    p.add_argument("--queue-size", type=int, default=16, help="requests waiting before 429")
    p.add_argument("--max-context", type=int, help="context limit in tokens (default: the model's)")
    p.add_argument("--cache-entries", type=int, default=8, help="prompt caches kept for reuse")
    p.add_argument("--max-batch", type=int, default=8,
                   help="requests decoded together in one batch (default 8; 1: one at a time)")
    p.add_argument("--default-max-tokens", type=int, default=DEFAULT_MAX_TOKENS,
                   help=f"reply limit when a request gives no max_tokens (default {DEFAULT_MAX_TOKENS})")
    p.add_argument("--body-timeout", type=float, default=BODY_TIMEOUT,
                   help=f"seconds to receive a request body (default {BODY_TIMEOUT:g})")
    p.add_argument("--header-timeout", type=float, default=HEADER_TIMEOUT,
                   help=f"seconds to receive a request head (default {HEADER_TIMEOUT:g})")
    p.add_argument("--draft-model", help="a small LFM2 with the same tokenizer for speculative decoding")
    p.add_argument("--num-draft-tokens", type=int, help="tokens drafted per step (default: adaptive)")
    p.add_argument("--prompt-lookup", action="store_true", help="speculative decoding from n-grams of the prompt")
    a = p.parse_args(argv)
    if a.host not in ("127.0.0.1", "localhost", "::1") and not a.api_key:
        print(f"warning: serving on {a.host} without --api-key: anyone who can reach this port can use the model",
              file=sys.stderr)
    from ..weights.loader import load, load_draft

    try:
        model, tokenizer = load(a.model)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    if a.max_batch < 1:
        raise SystemExit("error: --max-batch must be at least 1")
    try:
        draft = load_draft(a.draft_model, model, a.prompt_lookup)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: draft model: {e}")
    engine = Engine(model, tokenizer, served_name(a.model, a.served_model_name), a.queue_size, a.cache_entries, a.max_context,
                    a.default_max_tokens, a.max_batch, draft, a.prompt_lookup, a.num_draft_tokens)
    if not leader():  # mlx.launch: rank 0 serves HTTP, the others serve their layers
        return engine.follow()
    app = create_app(engine, a.api_key, a.body_timeout)
    make_server(engine, app, a.host, a.port, a.header_timeout).run()


if __name__ == "__main__":
    main()
