"""What every API does with a request, between the HTTP boundary and the scheduler.

An API module (``openai.py``, ``anthropic.py``) maps its own request and reply shapes; the
steps in between are written once here:

* ``authorize``: the API key, from ``Authorization: Bearer KEY`` or ``x-api-key: KEY``,
  compared in constant time;
* ``read``: auth, the body (``boundary.read_body``) and its validation (off the event loop);
* ``route``: a request's ``model`` name -> the scheduler serving it and the adapter to use
  (the one place names are resolved);
* ``render``: the chat template, off the event loop (bounded in time and size:
  ``text.template_limits``), whose refusal is a 400; ``count``: a prompt's tokens, off the loop;
* ``prepare``: off the event loop, the prompt tokenized (once: the worker reuses the ids), the
  context checked and the constraint compiled (once: the worker uses it), so a prompt over the
  context or a bad schema is a 400 before any streaming starts; then the job queued;
* the reply assembler: ``pieces`` drains a job into text and tool calls as they close (the
  stream), ``whole`` into one parsed reply (a plain answer), both with the forced opening of a
  required tool call fed first and the tool-call markup never shown as text.
"""

from __future__ import annotations

import asyncio
import secrets
from dataclasses import dataclass, field
from typing import AsyncIterator, Optional

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from ..engine.request import PromptTooLongError, check_context
from ..text.constraints import ConstraintError, make_constraint
from ..text.tool_stream import ToolCallStream
from ..text.tools import parse_tool_calls
from .boundary import APIError, BODY_TIMEOUT, no_reply, read_body, validate, watch
from .job import DONE, Job
from .metrics import note_model, track
from .models import UNSET, Models, current
from .outbox import Outbox
from .openai_api import ChatRequest
from .scheduler import Scheduler


class Routed:
    """For an API's handler class (with ``self.service``): ``scheduler`` is the model the
    current request was routed to."""

    @property
    def scheduler(self) -> Scheduler:
        return self.service.scheduler


@dataclass
class Piece:
    """Part of a streamed reply: new visible text, the tool calls that closed in it."""

    text: str
    calls: list
    logprob: Optional[dict]  # the token's logprob entry, when the request asked for them
    response: object  # the engine's ``GenerationResponse`` (finish_reason, counts)


@dataclass
class Reply:
    """A whole reply: its text without the tool-call markup, the calls, logprob entries."""

    text: str
    calls: list
    last: object  # the last ``GenerationResponse``
    logprobs: list = field(default_factory=list)
    written: str = ""  # the reply as the model wrote it, markup and all (what a transcript keeps)


class Service:
    """The steps every API shares, over the served models (``models.Models``)."""

    def __init__(self, models: Models, api_key: Optional[str] = None, body_timeout: float = BODY_TIMEOUT):
        self.models, self.api_key, self.body_timeout = models, api_key, body_timeout

    @property
    def scheduler(self) -> Scheduler:
        """The scheduler of the model this request was routed to (``route``)."""
        return current()

    @property
    def tokenizer(self):
        return self.scheduler.tokenizer

    def names(self) -> list[str]:
        """Every name a request may give as ``model``: each served model's, then each resident
        adapter's (adapters sit on a loaded model)."""
        adapters = [n for e in self.models.loaded() if e.scheduler.adapters is not None
                    for n in e.scheduler.adapters.loaded]
        return [*self.models.names, *adapters]

    async def route(self, name: Optional[str], keep_alive=UNSET) -> tuple[Scheduler, Optional[str]]:
        """The one place a request's ``model`` is resolved: ``(scheduler, adapter name or None)``,
        the model loaded if need be and held until the response ends (``models``), ``keep_alive``:
        how long it stays loaded once idle. With one name to serve, any name (or none) is the
        model: clients send their own names (Claude Code's, say); with several, no name is the
        first model and a name that is none of ``names()`` is a 404 listing them."""
        if name is not None and not isinstance(name, str):
            raise APIError(400, "model: a string", param="model")
        entry, adapter = self.resolve(name)
        await self.models.acquire(entry, keep_alive)
        note_model(adapter or entry.name)
        return entry.scheduler, adapter

    def resolve(self, name: Optional[str]):
        """``(registry entry, adapter name or None)`` that ``name`` picks (see ``route``), nothing loaded."""
        for e in self.models.loaded():
            if e.scheduler.adapters is not None and name in e.scheduler.adapters:
                return e, name
        if name in self.models.entries:
            return self.models.entries[name], None
        names = self.names()
        if not name or len(names) == 1:
            return self.models.entries[names[0]], None
        raise self.unknown(name)

    def unknown(self, name: str) -> APIError:
        return APIError(404, f"model {name!r:.80} not found: this server serves {', '.join(map(repr, self.names()))}",
                        param="model", type_="not_found_error", code="model_not_found")

    def authorize(self, request: Request) -> None:
        if not self.api_key:
            return
        auth = request.headers.get("authorization", "")
        given = [request.headers.get("x-api-key", ""), auth[7:] if auth[:7].lower() == "bearer " else ""]
        key = self.api_key.encode()
        if not any([secrets.compare_digest(g.encode(), key) for g in given]):  # a list: both compared
            raise APIError(401, "missing or wrong API key (Authorization: Bearer KEY, or x-api-key: KEY)",
                           type_="authentication_error", code="invalid_api_key")

    async def read(self, request: Request, model_cls, overrides: Optional[dict] = None):
        """The request's body as ``model_cls`` (``overrides``: keys set whatever the body says),
        its ``model`` routed (``keep_alive``: an extension on every API, as on Ollama's)."""
        self.authorize(request)
        body = await read_body(request, self.body_timeout)
        scheduler, _ = await self.route(body.get("model"), body.pop("keep_alive", UNSET))
        return await run_in_threadpool(validate, model_cls, {**body, **(overrides or {})}, scheduler.vocab)

    async def render(self, messages: list[dict], tools=None) -> str:
        """The prompt, rendered in a worker thread (by the routed model's tokenizer, taken
        here): a multi-MB body never stalls the loop."""
        return await run_in_threadpool(self._render, self.tokenizer, messages, tools)

    @staticmethod
    def _render(tokenizer, messages: list[dict], tools=None) -> str:
        try:
            return tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True)
        except Exception as e:
            raise APIError(400, f"the chat template rejected these messages: {e}", param="messages")

    async def count(self, prompt: str) -> int:
        """``prompt``'s tokens (the routed model's), counted in a worker thread."""
        return len(await run_in_threadpool(self.tokenizer.encode, prompt, add_special_tokens=False))

    @staticmethod
    def _compile(s: Scheduler, req, prompt_text: str, ids: Optional[list] = None):
        """Off the event loop: the prompt's ids (the worker reuses them; given: taken as they
        are), the context check, the constraint compiled (the first builds llguidance's view
        of the vocabulary, ~1 s)."""
        if ids is None:
            ids = s.tokenizer.encode(prompt_text, add_special_tokens=False)
        try:
            check_context(s.model, len(ids), context=s.max_context)
        except PromptTooLongError as e:
            raise APIError(400, str(e), param="messages", code="context_length_exceeded")
        param = "tools" if isinstance(req, ChatRequest) and req.forced_tool_call() else "response_format"
        try:
            spec = req.constraint()
            return ids, spec, make_constraint(s.tokenizer, **spec) if spec else None
        except ConstraintError as e:
            raise APIError(400, f"{param}: {e}", param=param, code="invalid_schema")

    async def prepare(self, req, prompt_text: str, top_logprobs: Optional[int] = None,
                      score_ids: Optional[list] = None, ids: Optional[list] = None,
                      model: Optional[str] = None) -> Job:
        """Queue ``prompt_text`` with ``req``'s sampling, limit and constraint -> its job. What
        can be refused is refused here, before any streaming starts: a prompt over the context,
        a bad schema (400s naming the problem); the worker builds the request from the ids and
        the constraint compiled here. ``score_ids``: the prompt's ids, scored first into
        ``job.scores`` (completions' echo with logprobs). ``ids``: the prompt as token ids
        (completions), which the model then sees exactly; ``prompt_text`` is their decoding.
        ``model``: the name asked for (default ``req.model``), resolved by ``route`` (held
        already when ``read`` routed it)."""
        name = model if model is not None else getattr(req, "model", None)
        s, adapter = await self.route(name)
        exact = ids is not None
        ids, spec, constraint = await run_in_threadpool(self._compile, s, req, prompt_text, ids)
        limit = s.default_max_tokens if req.limit is None else req.limit  # 0: score only (completions)
        memory = s.admission.check(len(ids), limit) if s.admission is not None else None  # too big even alone: 400
        params = req.sampling(s.defaults).replace(max_tokens=limit, **spec)
        job = Job(prompt_text, params, top_logprobs, asyncio.get_running_loop(), ids=ids, constraint=constraint,
                  schema_warnings=constraint.warnings if constraint is not None else [], score_ids=score_ids,
                  out=Outbox(s.max_buffered), exact_ids=exact)
        job.pin, job.memory = req.pin_cache, memory
        job.adapter, job.model = adapter, adapter or s.model_id
        track(job)
        s.submit(job)
        return job

    @staticmethod
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

    async def pieces(self, job: Job, forced: str = "", tools: frozenset = frozenset()) -> AsyncIterator[Piece]:
        """The reply as it streams. ``tools``: the offered tools' names (empty: no tool calls,
        the text as it comes); ``forced``: the reply's opening already in the prompt."""
        calls = ToolCallStream(bare_names=tools) if tools else None
        if calls:
            calls.feed(forced)  # held back like any call until it closes
        async for r, entry in self.results(job):
            text = calls.feed(r.text) if calls else r.text
            if calls and r.finish_reason:
                text += calls.finish()
            yield Piece(text, calls.new_calls() if calls else [], entry, r)

    async def whole(self, request: Request, job: Job, forced: str = "", tools: frozenset = frozenset()) -> Reply:
        """The whole reply (the client is watched meanwhile: hanging up stops the job)."""
        text, entries, last = forced, [], None
        async with watch(request, job):
            async for r, entry in self.results(job):
                text += r.text
                last = r
                if entry:
                    entries.append(entry)
        if last is None:
            raise no_reply(self.scheduler)
        content, calls = parse_tool_calls(text, bare_names=tools) if tools else (text, [])
        return Reply(content, calls, last, entries, text)
