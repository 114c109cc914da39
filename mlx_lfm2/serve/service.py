"""What every API does with a request, between the HTTP boundary and the scheduler.

An API module (``openai.py``, ``anthropic.py``) maps its own request and reply shapes; the
steps in between are written once here:

* ``authorize``: the API key, from ``Authorization: Bearer KEY`` or ``x-api-key: KEY``,
  compared in constant time;
* ``read``: auth, the body (``boundary.read_body``) and its validation;
* ``route``: a request's ``model`` name -> the scheduler serving it and the adapter to use
  (the one place names are resolved);
* ``render``: the chat template, whose refusal is a 400;
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
from ..text.tools import ToolCallStream, parse_tool_calls
from .boundary import APIError, BODY_TIMEOUT, no_reply, read_body, validate, watch
from .metrics import track
from .outbox import Outbox
from .openai_api import ChatRequest
from .scheduler import DONE, Job, Scheduler


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
    """The steps both APIs share, over one scheduler."""

    def __init__(self, scheduler: Scheduler, api_key: Optional[str] = None, body_timeout: float = BODY_TIMEOUT):
        self.scheduler, self.api_key, self.body_timeout = scheduler, api_key, body_timeout
        self.tokenizer = scheduler.tokenizer

    def names(self) -> list[str]:
        """Every name a request may give as ``model``: the base's, then each resident adapter's."""
        s = self.scheduler
        return [s.model_id, *(s.adapters.loaded if s.adapters is not None else [])]

    def route(self, name: Optional[str]) -> tuple[Scheduler, Optional[str]]:
        """``(scheduler, adapter name or None)`` for a request's ``model``. With one name to
        serve, any name (or none) is the model: clients send their own names (Claude Code's,
        say). With adapters resident, a name that is none of ``names()`` is a 404 listing them."""
        s = self.scheduler
        if s.adapters is not None and name in s.adapters:
            return s, name
        names = self.names()
        if not name or name == s.model_id or len(names) == 1:
            return s, None
        raise APIError(404, f"model {name!r} not found: this server serves {', '.join(map(repr, names))}",
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
        """The request's body as ``model_cls`` (``overrides``: keys set whatever the body says)."""
        self.authorize(request)
        body = await read_body(request, self.body_timeout)
        return validate(model_cls, {**body, **(overrides or {})}, self.scheduler.vocab)

    def render(self, messages: list[dict], tools=None) -> str:
        try:
            return self.tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True)
        except Exception as e:
            raise APIError(400, f"the chat template rejected these messages: {e}", param="messages")

    def _compile(self, req, prompt_text: str):
        """Off the event loop: the prompt's ids (the worker reuses them), the context check,
        the constraint compiled (the first builds llguidance's view of the vocabulary, ~1 s)."""
        s = self.scheduler
        ids = self.tokenizer.encode(prompt_text, add_special_tokens=False)
        try:
            check_context(s.model, len(ids), context=s.max_context)
        except PromptTooLongError as e:
            raise APIError(400, str(e), param="messages", code="context_length_exceeded")
        param = "tools" if isinstance(req, ChatRequest) and req.forced_tool_call() else "response_format"
        try:
            spec = req.constraint()
            return ids, spec, make_constraint(self.tokenizer, **spec) if spec else None
        except ConstraintError as e:
            raise APIError(400, f"{param}: {e}", param=param, code="invalid_schema")

    async def prepare(self, req, prompt_text: str, top_logprobs: Optional[int] = None,
                      score_ids: Optional[list] = None, model: Optional[str] = None) -> Job:
        """Queue ``prompt_text`` with ``req``'s sampling, limit and constraint -> its job. What
        can be refused is refused here, before any streaming starts: a prompt over the context,
        a bad schema (400s naming the problem); the worker builds the request from the ids and
        the constraint compiled here. ``score_ids``: the prompt's ids, scored first into
        ``job.scores`` (completions' echo with logprobs). ``model``: the name asked for (default
        ``req.model``), resolved by ``route``."""
        name = model if model is not None else getattr(req, "model", None)
        s, adapter = self.route(name)
        ids, spec, constraint = await run_in_threadpool(self._compile, req, prompt_text)
        limit = s.default_max_tokens if req.limit is None else req.limit  # 0: score only (completions)
        params = req.sampling(s.defaults).replace(max_tokens=limit, **spec)
        job = Job(prompt_text, params, top_logprobs, asyncio.get_running_loop(), ids=ids, constraint=constraint,
                  schema_warnings=constraint.warnings if constraint is not None else [], score_ids=score_ids,
                  out=Outbox(s.max_buffered))
        job.pin = req.pin_cache
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
