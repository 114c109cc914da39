"""An OpenAI-compatible server: ``python -m mlx_lfm2.server --model PATH_OR_REPO``.

One worker thread owns the model, so the event loop never blocks on MLX. It takes requests
in arrival order from a bounded queue (full: 429) into a continuous batch of up to
``max_batch`` (engine/batch.py): every active request decodes in the same forward, each with
its own sampling, stops and limit, and a newcomer's prefill is interleaved with the others'
decode steps. Tokens travel back to each request's coroutine through an asyncio queue; a
client that disconnects sets its job's stop event, which takes its row out of the batch at
the next step.

Prompt reuse: after each request the worker keeps its ``PromptCache`` (cache plus the text
it consumed); a later prompt that extends one of those texts copies it and prefills only the
new part. Copies are cheap (MLX arrays are immutable) and necessary: the conv state cannot
be rewound, so a cache is never trimmed back, only extended.

Limits (see README, "Security model"): bodies must be JSON, at most ``MAX_BODY`` bytes,
counted while they arrive and read within ``body_timeout``; every value is validated by
``openai_api`` before it reaches the worker; a reply is at most ``default_max_tokens`` unless
the request asks for more (never past the context); a client that leaves stops its job.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import queue
import sys
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
from starlette.concurrency import run_in_threadpool
from starlette.routing import Route

from ..engine.batch import BatchGenerator, TextStream, request_for
from ..engine.generation import default_sampling
from . import anthropic
from .openai_api import (APIError, ChatRequest, CompletionRequest, chat_chunk, loads, logprob_entry, new_id,
                         openai_tool_calls, to_template_messages, usage)
from ..engine.session import PromptCache
from ..text.constraints import ConstraintError, make_constraint
from ..text.tools import ToolCallStream, parse_tool_calls

MAX_BODY = 4 * 1024 * 1024
BODY_TIMEOUT = 30.0  # seconds to receive a whole body: a stalled upload must not hold a slot
HEADER_TIMEOUT = 30.0  # seconds from connecting (or the last response) to a complete request head
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


class Engine:
    """The model, its worker thread, the request queue and the prompt caches."""

    def __init__(self, model, tokenizer, model_id: str, queue_size: int = 16, cache_entries: int = 8,
                 max_context: Optional[int] = None, default_max_tokens: int = DEFAULT_MAX_TOKENS,
                 max_batch: int = 8):
        self.model, self.tokenizer, self.model_id = model, tokenizer, model_id
        self.max_context = min(max_context or 1 << 62, model.args.max_position_embeddings)
        self.default_max_tokens = default_max_tokens
        # Ids from requests must index both the tokenizer and the embedding rows.
        rows = getattr(model.args, "vocab_size", None)
        self.vocab = min(tokenizer.vocab_size, rows) if rows else tokenizer.vocab_size
        self.live: dict = {}  # uid -> _Live: the requests in the batch
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

    def _take_cache(self, text: str) -> PromptCache:
        """A copy of the cached prompt that is the longest prefix of ``text`` (or a fresh one)."""
        best = max((k for k in self.caches if text.startswith(k)), key=len, default=None)
        if best is None:
            return PromptCache(self.model)
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

    def _keep_cache(self, pc: PromptCache) -> None:
        if pc.offset == len(pc.tokens) and pc.text:
            self.caches[pc.text] = pc
            self.caches.move_to_end(pc.text)
            while len(self.caches) > self.cache_entries:
                self.caches.popitem(last=False)

    def _work(self) -> None:
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

    def _insert(self, job: Job) -> None:
        tok = self.tokenizer
        pc = self._take_cache(job.prompt_text)
        ids = pc.new_tokens(tok, job.prompt_text)
        if not ids:  # a cache that consumed this whole prompt leaves nothing to sample from
            pc = PromptCache(self.model)
            ids = pc.new_tokens(tok, job.prompt_text)
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


@dataclass
class _Live:
    job: Job
    pc: PromptCache
    ids: list  # the prompt ids prefilled (those after the cached prefix)
    text: TextStream
    generated: list = field(default_factory=list)


def _error(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


async def _body(request: Request, timeout: float = BODY_TIMEOUT) -> dict:
    """The JSON object a POST carries. Only ``application/json``: a web page can send a
    ``text/plain`` POST to a loopback server without a CORS preflight, never a JSON one."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/json":
        raise APIError(415, f"the body must be sent as Content-Type: application/json (got {kind or 'none'!r})",
                       code="unsupported_media_type")
    size = request.headers.get("content-length")
    if size and size.isdigit() and int(size) > MAX_BODY:
        raise APIError(413, f"request body over {MAX_BODY} bytes", code="body_too_large")

    async def read() -> bytes:  # counted as it arrives: a chunked body has no length to check
        chunks, n = [], 0
        async for chunk in request.stream():
            n += len(chunk)
            if n > MAX_BODY:
                raise APIError(413, f"request body over {MAX_BODY} bytes", code="body_too_large")
            chunks.append(chunk)
        return b"".join(chunks)

    try:
        raw = await asyncio.wait_for(read(), timeout)
    except asyncio.TimeoutError:
        raise APIError(408, f"the body did not arrive within {timeout:g} s", code="request_timeout")
    body = loads(raw)
    if not isinstance(body, dict):
        raise APIError(400, "the body must be a JSON object", code="invalid_json")
    return body


def _validate(model_cls, body: dict, vocab: int):
    try:
        return model_cls.model_validate(body, context={"vocab": vocab})
    except ValidationError as e:
        # Of a union's alternatives, report the one that got furthest into the value.
        err = max(e.errors(), key=lambda err: len(err["loc"]))
        where = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        raise APIError(422, f"{where}: {msg}" if where else msg, param=where or None, code="invalid_value")


@contextlib.asynccontextmanager
async def _watch(request: Request, job: "Job", every: float = 0.2):
    """While the handler waits on ``job``, poll the client: one that hangs up stops the job
    even while tokens keep arriving (a non-streaming reply would otherwise run to its end)."""

    async def poll():
        while not job.stop.is_set():
            if await request.is_disconnected():
                job.stop.set()
                return
            await asyncio.sleep(every)

    task = asyncio.ensure_future(poll())
    try:
        yield
    finally:
        task.cancel()


async def _sse(events):
    """Server-sent events; a failure after the 200 was sent becomes an error event (the
    shape OpenAI streams), so a client always learns why its stream ended."""
    try:
        async for event in events:
            yield event
    except APIError as e:
        yield json.dumps(e.body())
    except Exception as e:
        yield json.dumps(APIError(500, f"internal error: {type(e).__name__}", type_="server_error").body())


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
        kwargs["max_tokens"] = min(req.limit or engine.default_max_tokens, engine.max_context - n_prompt)
        kwargs.update(constraint or {})
        job = Job(prompt_text, kwargs, top_logprobs, asyncio.get_running_loop())
        engine.submit(job)
        return job

    async def results(job: Job):
        """(response, logprob entry) pairs until done. Whoever drives this stops the job when
        the client leaves: ``_watch`` for a plain reply, sse-starlette for a stream."""
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
        req = _validate(ChatRequest, await _body(request, body_timeout), engine.vocab)
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
            return EventSourceResponse(_sse(_stream_chat(job, cid, model_id, req, forced)), ping=15)
        text, entries, last = forced, [], None
        async with _watch(request, job):
            async for r, entry in results(job):
                text += r.text
                last = r
                if entry:
                    entries.append(entry)
        if last is None:
            raise _no_reply(engine)
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
            raise _no_reply(engine)
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
        req = _validate(CompletionRequest, await _body(request, body_timeout), engine.vocab)
        prompt = req.prompt if isinstance(req.prompt, str) else tok.decode(req.prompt)
        job = prepare(req, prompt, (req.logprobs or 0) if req.logprobs else None, await constrained(req))
        cid, model_id = new_id("cmpl"), engine.model_id

        def body(text, finish, lps=None):
            return {"id": cid, "object": "text_completion", "created": int(time.time()), "model": model_id,
                    "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": lps}]}

        if req.stream:
            async def events():
                last = None
                async for r, _ in results(job):
                    last = r
                    if r.text:
                        yield json.dumps(body(r.text, None))
                if last is None:
                    raise _no_reply(engine)
                yield json.dumps(body("", _finish(last.finish_reason)))
                yield "[DONE]"
            return EventSourceResponse(_sse(events()), ping=15)
        text, last, tokens, token_lps = (prompt if req.echo else ""), None, [], []
        async with _watch(request, job):
            async for r, entry in results(job):
                text += r.text
                last = r
                if entry:
                    tokens.append(entry["token"])
                    token_lps.append(entry["logprob"])
        if last is None:
            raise _no_reply(engine)
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
                             "batch": engine.batch.status, "cached_prompts": len(engine.caches)})

    async def api_error(request, exc: APIError):
        response = _error(exc)
        if exc.status in (408, 413):  # the rest of the body is not read: end the connection
            response.headers["connection"] = "close"
        return response

    async def http_error(request, exc: HTTPException):
        kind = {404: "not_found_error", 405: "invalid_request_error"}.get(exc.status_code, "invalid_request_error")
        error = APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", kind)
        return anthropic.error_response(error) if request.url.path.startswith("/v1/messages") else _error(error)

    async def crash(request, exc: Exception):  # the catch-all: logged by uvicorn, answered here
        return _error(APIError(500, f"internal error: {type(exc).__name__}", type_="server_error"))

    return Starlette(
        routes=[
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/v1/completions", completions, methods=["POST"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/health", health, methods=["GET"]),
            *anthropic.routes(engine, api_key, body_timeout, prepare, results),
        ],
        exception_handlers={APIError: api_error, HTTPException: http_error, Exception: crash},
    )


def _no_reply(engine: Engine) -> APIError:
    if engine.closed:
        return APIError(503, "the server is shutting down", type_="server_error", code="shutting_down")
    return APIError(499, "client closed the request")


def _finish(reason: Optional[str]) -> Optional[str]:
    return {"cancelled": "stop"}.get(reason, reason)


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except ValueError:
        return False


def _h11_with_header_deadline(timeout: float):
    """uvicorn's h11 protocol, plus a deadline for each request head: uvicorn closes idle
    keep-alive connections, but not one that sends half a request line and stalls."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class Protocol(H11Protocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm(None)

        def on_response_complete(self) -> None:
            done = self.cycle
            super().on_response_complete()
            if self.cycle is done:  # no pipelined request started: the next head is awaited
                self._arm(done)

        def _arm(self, cycle) -> None:
            def expire():
                if self.cycle is cycle and not self.transport.is_closing():
                    self.transport.close()

            self.loop.call_later(timeout, expire)

    return Protocol


def make_server(engine: Engine, app: Starlette, host: str = "127.0.0.1", port: int = 8080,
                header_timeout: float = HEADER_TIMEOUT, keep_alive: int = 5, graceful: int = 5):
    """A uvicorn server whose SIGTERM/SIGINT also stop the engine's jobs; requests still
    open ``graceful`` seconds later are cancelled, so a signal always ends the process."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            # Not inline: the signal may interrupt the event loop while it holds the queue's lock.
            threading.Thread(target=engine.close, daemon=True).start()
            super().handle_exit(sig, frame)

    return Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                 http=_h11_with_header_deadline(header_timeout),
                                 timeout_keep_alive=keep_alive, timeout_graceful_shutdown=graceful))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="OpenAI-compatible server for LFM2 models.")
    p.add_argument("--model", required=True, help="model folder or hub repo id")
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
    a = p.parse_args(argv)
    if a.host not in ("127.0.0.1", "localhost", "::1") and not a.api_key:
        print(f"warning: serving on {a.host} without --api-key: anyone who can reach this port can use the model",
              file=sys.stderr)
    from ..weights.loader import load

    try:
        model, tokenizer = load(a.model)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    if a.max_batch < 1:
        raise SystemExit("error: --max-batch must be at least 1")
    engine = Engine(model, tokenizer, a.model, a.queue_size, a.cache_entries, a.max_context,
                    a.default_max_tokens, a.max_batch)
    app = create_app(engine, a.api_key, a.body_timeout)
    make_server(engine, app, a.host, a.port, a.header_timeout).run()


if __name__ == "__main__":
    main()
