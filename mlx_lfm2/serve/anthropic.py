"""Anthropic's Messages API (``POST /v1/messages``) over the same engine as the OpenAI routes.

Agents written for Claude (the ``anthropic`` SDK, Claude Code) can point at a local LFM2
model. Requests are validated here and mapped onto the chat template's messages: ``system``
(a string or text blocks) becomes the system message, ``tool_use`` blocks become LFM2's
Pythonic call text in the assistant turn and ``tool_result`` blocks become ``tool`` messages.
Replies come back as ``text`` and ``tool_use`` blocks, whole or as the streamed events
``message_start``, ``content_block_start/delta/stop``, ``message_delta`` (stop reason, usage)
and ``message_stop``. Errors have Anthropic's shape: ``{"type": "error", "error": {...}}``.

Usage follows Anthropic's split: ``input_tokens`` are the prompt tokens prefilled for this
request and not written to the disk cache, ``cache_read_input_tokens`` those reused from an
earlier request's cache, ``cache_creation_input_tokens`` those this request wrote to the disk
cache (its new 256-token blocks; 0 without a disk tier). The three add up to the prompt.
"""

from __future__ import annotations

import json
import logging
import uuid
from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from sse_starlette.sse import EventSourceResponse
from starlette.concurrency import run_in_threadpool
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from ..engine.sample import SamplingParams
from ..text.tool_grammar import MAX_CALLS, forced_tool_opening, tool_call_grammar
from .boundary import APIError, exception_handlers, internal_error
from .openai_api import ChatRequest, checked_stops, to_template_messages
from .service import Routed, Service

PREFIX = "/v1/messages"

# OpenAI-side error types (the engine's) -> Anthropic's.
ERROR_TYPES = {"server_error": "api_error", "rate_limit_error": "rate_limit_error",
               "authentication_error": "authentication_error", "not_found_error": "not_found_error"}
log = logging.getLogger(__name__)
STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "cancelled": "end_turn"}


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="allow")  # cache_control, metadata, citations...: accepted, unused


class Tool(_Lenient):
    name: str = Field(min_length=1, max_length=128, pattern=r"^[a-zA-Z0-9_.-]+$")
    description: Optional[str] = None
    input_schema: dict = Field(default_factory=lambda: {"type": "object", "properties": {}})
    type: Optional[str] = None

    @field_validator("type")
    @classmethod
    def _custom(cls, kind):
        if kind not in (None, "custom"):
            raise ValueError(f"tool type {kind!r} is not supported here: only custom tools (name, input_schema)")
        return kind


class ToolChoice(_Lenient):
    type: Literal["auto", "any", "tool", "none"]
    name: Optional[str] = None
    disable_parallel_tool_use: bool = False


class Message(_Lenient):
    role: Literal["user", "assistant", "system"]  # system: mid-conversation system text (Claude Code)
    content: Union[str, list[dict]]


class MessagesRequest(_Lenient):
    model: Optional[str] = None
    max_tokens: int = Field(ge=1)
    messages: list[Message] = Field(min_length=1)
    system: Union[str, list[dict], None] = None
    stop_sequences: Optional[list[str]] = None
    stream: bool = False
    temperature: Optional[float] = Field(None, ge=0, le=1)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    top_k: Optional[int] = Field(None, ge=0)
    tools: Optional[list[Tool]] = None
    tool_choice: Optional[ToolChoice] = None
    output_config: Optional[dict] = None  # structured outputs: {"format": {"type": "json_schema", ...}}
    output_format: Optional[dict] = None  # the same, as the beta spelled it

    @field_validator("stop_sequences")
    @classmethod
    def _stops(cls, stops):
        return checked_stops(stops or [])

    @field_validator("output_config", "output_format")
    @classmethod
    def _format(cls, value, info):
        fmt = (value or {}).get("format") if info.field_name == "output_config" else value
        if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "json_schema"
                                    and isinstance(fmt.get("schema"), dict)):
            raise ValueError("the output format is {'type': 'json_schema', 'schema': {...}}")
        return value

    @model_validator(mode="after")
    def _tool_choice(self):
        choice = self.tool_choice
        if choice is None or choice.type in ("auto", "none"):
            return self
        if not self.tools:
            raise ValueError(f"tool_choice {choice.type!r} needs tools")
        if choice.type == "tool" and choice.name not in {t.name for t in self.tools}:
            raise ValueError(f"tool_choice names {choice.name!r}, which is not one of the tools")
        return self

    @property
    def pin_cache(self) -> bool:
        """A ``cache_control`` breakpoint anywhere (system, tools, messages): the prompt's
        prefix is kept in the disk prompt cache after everything unmarked."""
        def marked(v) -> bool:
            if isinstance(v, dict):
                return v.get("cache_control") is not None or any(map(marked, v.values()))
            return isinstance(v, list) and any(map(marked, v))

        return marked(self.model_dump(include={"system", "tools", "messages"}))

    # The server's request interface: ``service.prepare`` reads these two and ``constraint()``.
    @property
    def limit(self) -> int:
        return self.max_tokens

    def sampling(self, defaults: SamplingParams) -> SamplingParams:
        given = {k: getattr(self, k) for k in ("temperature", "top_p", "top_k") if getattr(self, k) is not None}
        return defaults.replace(**given, stop=tuple(self.stop_sequences or ()))

    @property
    def offered_tools(self) -> Optional[list[dict]]:
        """The tools as the chat template reads them (None when the model may not call any)."""
        if not self.tools or (self.tool_choice and self.tool_choice.type == "none"):
            return None
        return [{"type": "function", "function": {"name": t.name, "description": t.description or "",
                                                  "parameters": t.input_schema}} for t in self.tools]

    @property
    def forced_name(self) -> Optional[str]:
        return self.tool_choice.name if self.tool_choice and self.tool_choice.type == "tool" else None

    def forced_opening(self) -> str:
        """The reply's opening for ``any`` / ``tool``, written for the model (as on the OpenAI route)."""
        if self.tool_choice and self.tool_choice.type in ("any", "tool"):
            return forced_tool_opening(self.forced_name)
        return ""

    def constraint(self) -> dict:
        """A forced call keeps to the tools' call syntax and input schemas (a grammar over the
        rest of it); otherwise ``output_config.format`` (or the beta ``output_format``) shapes
        the reply as JSON of its schema."""
        if self.forced_opening():
            return {"grammar": tool_call_grammar(self.offered_tools, self.forced_name, opened=True,
                                                 max_calls=1 if self.one_call else MAX_CALLS)}
        fmt = (self.output_config or {}).get("format") or self.output_format
        return {"json_schema": fmt["schema"]} if fmt else {}

    @property
    def tool_names(self) -> frozenset:
        return frozenset(t.name for t in self.tools or [])

    @property
    def one_call(self) -> bool:
        return bool(self.tool_choice and self.tool_choice.disable_parallel_tool_use)


BILLING_HEADER = "x-anthropic-billing-header:"  # Claude Code's first system block: a per-request nonce
OMITTED = "[{kind} omitted: this model reads text only]"


def _text(blocks, where: str) -> str:
    """Text blocks (or a string) as one string. An image, or a document that is not plain
    text, becomes a placeholder saying it was left out; any other block is refused."""
    if isinstance(blocks, str):
        return blocks
    if not isinstance(blocks, list):
        raise APIError(400, f"{where}: content is a string or a list of content blocks, not "
                            f"{type(blocks).__name__}")
    parts = []
    for b in blocks:
        kind = b.get("type") if isinstance(b, dict) else type(b).__name__
        if kind == "text" and isinstance(b.get("text"), str):
            parts.append(b["text"])
        elif kind in ("image", "document"):
            source = b.get("source") if isinstance(b.get("source"), dict) else {}
            plain = kind == "document" and source.get("type") == "text" and isinstance(source.get("data"), str)
            parts.append(source["data"] if plain else OMITTED.format(kind=kind))
        else:
            raise APIError(400, f"{where}: content block type {kind!r} is not supported here "
                                "(text, image and document blocks)")
    return "\n\n".join(parts)


def _system_text(blocks, where: str) -> str:
    """System text without Claude Code's billing header: it changes with every request, so
    rendering it would make no two prompts share a cached prefix."""
    if not isinstance(blocks, str):
        blocks = [b for b in blocks if not (isinstance(b, dict) and isinstance(b.get("text"), str)
                                             and b["text"].startswith(BILLING_HEADER))]
    elif blocks.startswith(BILLING_HEADER):
        blocks = ""
    return _text(blocks, where)


def to_chat_messages(req: MessagesRequest) -> list[dict]:
    """Anthropic messages -> OpenAI-shaped messages (tool calls and results included). A
    ``system`` message inside ``messages`` stays a system message where it stands (LFM2's
    template renders one anywhere)."""
    system = _system_text(req.system, "system") if req.system else ""
    out = [{"role": "system", "content": system}] if system else []
    for i, m in enumerate(req.messages):
        where = f"messages.{i}"
        if m.role == "system":
            text = _system_text(m.content, where)
            if text:
                out.append({"role": "system", "content": text})
            continue
        if isinstance(m.content, str):
            out.append({"role": m.role, "content": m.content})
            continue
        texts, calls = [], []
        for j, b in enumerate(m.content):
            kind = b.get("type")
            if kind in ("text", "image", "document"):
                texts.append(b)
            elif kind in ("thinking", "redacted_thinking"):
                continue  # another model's reasoning: LFM2's template has no place for it
            elif kind == "tool_use" and m.role == "assistant":
                if not isinstance(b.get("name"), str) or not isinstance(b.get("input", {}), dict):
                    raise APIError(400, f"{where}.content.{j}: tool_use needs a name and an input object")
                calls.append({"id": b.get("id"), "type": "function",
                              "function": {"name": b["name"], "arguments": b.get("input", {})}})
            elif kind == "tool_result" and m.role == "user":
                content = b.get("content", "")
                result = _text(content, f"{where}.content.{j}") if content else ""
                out.append({"role": "tool", "tool_call_id": b.get("tool_use_id"),
                            "content": ("Error: " + result) if b.get("is_error") else result})
            else:
                raise APIError(400, f"{where}.content.{j}: a {m.role} message cannot hold a {kind!r} block "
                                    "(text, image, document, tool_use in assistant turns, tool_result in user turns)")
        if texts or calls:
            msg = {"role": m.role, "content": _text(texts, where)}
            if calls:
                msg["tool_calls"] = calls
            out.append(msg)
    return out


def template_messages(req: MessagesRequest, template_renders_tool_calls: bool) -> list[dict]:
    """The chat template's messages, through the OpenAI route's own mapping (one LFM2 call format)."""
    try:
        chat = ChatRequest.model_validate({"messages": to_chat_messages(req)})
    except ValidationError as e:
        err = e.errors()[0]
        raise APIError(400, f"messages: {err['msg'].removeprefix('Value error, ')}", param="messages")
    return to_template_messages(chat, template_renders_tool_calls)


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


def tool_use_block(call: dict) -> dict:
    return {"type": "tool_use", "id": new_id("toolu"), "name": call["name"], "input": call["arguments"]}


def usage(job, output_tokens: int) -> dict:
    return {"input_tokens": job.prompt_tokens - job.cached_tokens - job.cache_written, "output_tokens": output_tokens,
            "cache_read_input_tokens": job.cached_tokens, "cache_creation_input_tokens": job.cache_written}


def stop_reason(last, n_calls: int) -> tuple[str, Optional[str]]:
    """Cut by max_tokens stays "max_tokens", with the calls finished before the cut."""
    if n_calls and last.finish_reason != "length":
        return "tool_use", None
    if last.finish_reason == "stop" and last.stop_sequence:
        return "stop_sequence", last.stop_sequence
    return STOP_REASONS.get(last.finish_reason, "end_turn"), None


def error_body(e: APIError) -> dict:
    kind = "request_too_large" if e.status == 413 else ERROR_TYPES.get(e.type, "invalid_request_error")
    return {"type": "error", "error": {"type": kind, "message": e.message}}


def render_error(e: APIError) -> tuple[int, dict]:
    """Anthropic's status and body for ``e`` (a failed validation is a 400 there)."""
    return 400 if e.status == 422 else e.status, error_body(e)


def app(service: Service) -> Starlette:
    """``/v1/messages`` and ``/v1/messages/count_tokens``, mounted at ``PREFIX`` with this
    API's error shape. The key comes as ``x-api-key`` (the SDK's way) or ``Authorization:
    Bearer`` (Claude Code's auth token)."""
    api = Messages(service)
    return Starlette(routes=[Route(PREFIX, api.messages, methods=["POST"]),
                             Route(PREFIX + "/count_tokens", api.count_tokens, methods=["POST"])],
                     exception_handlers=exception_handlers(render_error))


class Messages(Routed):
    def __init__(self, service: Service):
        self.service = service

    async def parse(self, request: Request, overrides: Optional[dict] = None) -> tuple[MessagesRequest, str]:
        req = await self.service.read(request, MessagesRequest, overrides)
        messages = await run_in_threadpool(template_messages, req, self.scheduler.template_renders_tool_calls)
        return req, await self.service.render(messages, req.offered_tools)

    async def count_tokens(self, request: Request):
        _, prompt = await self.parse(request, {"max_tokens": 1})  # count_tokens takes no max_tokens
        return JSONResponse({"input_tokens": await self.service.count(prompt)})

    async def messages(self, request: Request):
        req, prompt = await self.parse(request)
        forced = req.forced_opening()
        job = await self.service.prepare(req, prompt + forced)
        mid = new_id("msg")
        if req.stream:
            return EventSourceResponse(self._stream(job, req, forced, mid), ping=15)
        reply = await self.service.whole(request, job, forced, req.tool_names if req.offered_tools else frozenset())
        calls = reply.calls[:1] if req.one_call else reply.calls
        blocks = ([{"type": "text", "text": reply.text}] if reply.text or not calls else []) + [
            tool_use_block(c) for c in calls]
        reason, sequence = stop_reason(reply.last, len(calls))
        return JSONResponse({"id": mid, "type": "message", "role": "assistant",
                             "model": req.model or self.scheduler.model_id, "content": blocks,
                             "stop_reason": reason, "stop_sequence": sequence,
                             "usage": usage(job, reply.last.generation_tokens)})

    async def _stream(self, job, req: MessagesRequest, forced: str, mid: str):
        try:
            async for event in self._events(job, req, forced, mid):
                yield event
        except APIError as e:  # the stream has begun: the error travels as an event
            yield {"event": "error", "data": json.dumps(error_body(e))}
        except Exception as e:
            log.exception("streaming %s failed", mid)
            yield {"event": "error", "data": json.dumps(error_body(internal_error(e)))}

    async def _events(self, job, req: MessagesRequest, forced: str, mid: str):
        def event(name: str, **data) -> dict:
            return {"event": name, "data": json.dumps({"type": name, **data}, ensure_ascii=False)}

        index, text_open, n_calls, last = 0, False, 0, None
        async for p in self.service.pieces(job, forced, req.tool_names if req.offered_tools else frozenset()):
            if last is None:
                message = {"id": mid, "type": "message", "role": "assistant", "content": [],
                           "model": req.model or self.scheduler.model_id, "stop_reason": None,
                           "stop_sequence": None, "usage": usage(job, 0)}
                yield event("message_start", message=message)
            last = p.response
            if p.text:
                if not text_open:
                    yield event("content_block_start", index=index, content_block={"type": "text", "text": ""})
                    text_open = True
                yield event("content_block_delta", index=index, delta={"type": "text_delta", "text": p.text})
            for call in p.calls:
                if req.one_call and n_calls:
                    continue
                if text_open:
                    yield event("content_block_stop", index=index)
                    index, text_open = index + 1, False
                block = tool_use_block(call)
                yield event("content_block_start", index=index, content_block={**block, "input": {}})
                yield event("content_block_delta", index=index, delta={
                    "type": "input_json_delta", "partial_json": json.dumps(block["input"], ensure_ascii=False)})
                yield event("content_block_stop", index=index)
                index, n_calls = index + 1, n_calls + 1
        if last is None:
            return
        if text_open:
            yield event("content_block_stop", index=index)
        reason, sequence = stop_reason(last, n_calls)
        yield event("message_delta", delta={"stop_reason": reason, "stop_sequence": sequence},
                    usage=usage(job, last.generation_tokens))  # whole: some clients read only this one
        yield event("message_stop")
