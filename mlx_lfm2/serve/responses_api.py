"""The Responses API's shapes, separate from serving (the routes are ``responses.py``).

``ResponsesRequest`` validates a request and builds the ``ChatRequest`` it amounts to;
``input_messages`` turns input items into chat messages; ``ReplyItems`` writes a reply's
output items (and the stream events announcing them); ``response_body`` is the response object.

Input items: messages (``input_text`` / ``output_text`` parts; an ``input_image`` or
``input_file`` becomes a placeholder saying it was left out), ``function_call`` and
``function_call_output`` (Codex's ``custom_tool_call`` pair too, its input as the call's
``input`` argument), ``reasoning`` items (skipped: another model's reasoning). Tools other
than ``function`` (``web_search``, ``namespace``, hosted tools) are not offered to the model;
``reasoning``, ``include``, ``prompt_cache_key``, ``truncation``, ``metadata`` and
``client_metadata`` are accepted and not used.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .boundary import APIError
from .openai_api import MAX_SEED, ChatRequest

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
