"""OpenAI request validation and response shapes, separate from serving (routes: ``openai.py``).

Requests are checked with pydantic models (unknown fields are tolerated, as OpenAI's
server does); answers follow the Chat Completions and Completions schemas, including
streamed ``chat.completion.chunk`` deltas and ``tool_calls``.

This is the server's one validation layer: every value a request carries is checked here
(numbers in range, token ids below the vocabulary given as ``context={"vocab": n}``, JSON
depth), so nothing malformed reaches the engine, where MLX does not bounds-check ids.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from ..text.tool_grammar import MAX_CALLS, forced_tool_opening, tool_call_grammar
from ..text.tools import format_pythonic_call
from ..engine.sample import SamplingParams
from .boundary import APIError, loads


SAMPLING = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed", "frequency_penalty",
            "presence_penalty")  # the fields named as in SamplingParams
MAX_SEED = 2**64 - 1
MAX_STOP = 1024
MAX_STOPS = 4


def checked_stops(stops: list[str]) -> list[str]:
    """Stop sequences within the bounds every API shares (a pydantic validator's ValueError)."""
    if len(stops) > MAX_STOPS:
        raise ValueError(f"at most {MAX_STOPS} stop sequences")
    if any(len(x) > MAX_STOP for x in stops):  # each token rescans the reply's tail per stop
        raise ValueError(f"a stop sequence is at most {MAX_STOP} characters")
    return stops


def _vocab(info: ValidationInfo) -> Optional[int]:
    return (info.context or {}).get("vocab")


def check_ids(ids, vocab: Optional[int], what: str) -> None:
    """Token ids from a request must index the vocabulary (MLX gathers are unchecked)."""
    top = f"{vocab - 1}" if vocab else "the vocabulary size"
    for i in ids:
        if i < 0 or (vocab is not None and i >= vocab):
            raise ValueError(f"{what} {i} is not a token id (0..{top})")


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="allow")


class ToolCallFunction(_Lenient):
    name: str
    arguments: Union[str, dict] = "{}"


class ToolCall(_Lenient):
    id: Optional[str] = None
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ContentPart(_Lenient):
    type: str
    text: Optional[str] = None


class Message(_Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[ContentPart], None] = None
    tool_calls: Optional[list[ToolCall]] = None
    tool_call_id: Optional[str] = None
    name: Optional[str] = None

    @model_validator(mode="after")
    def _content_required(self):
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"a {self.role} message needs content")
        return self


class Sampling(_Lenient):
    model: Optional[str] = None
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    top_k: Optional[int] = Field(None, ge=0)
    min_p: Optional[float] = Field(None, ge=0, le=1)
    repetition_penalty: Optional[float] = Field(None, gt=0)
    frequency_penalty: Optional[float] = Field(None, ge=-2, le=2)
    presence_penalty: Optional[float] = Field(None, ge=-2, le=2)
    seed: Optional[int] = Field(None, ge=0, le=MAX_SEED)
    stop: Union[str, list[str], None] = None
    n: int = 1
    stream: bool = False
    stream_options: Optional[dict] = None
    logprobs: Optional[Union[bool, int]] = None
    logit_bias: Optional[dict[str, float]] = None
    response_format: Optional[dict] = None
    prompt_cache_key: Optional[str] = Field(None, max_length=1024)  # pins the prompt in the disk cache

    @property
    def pin_cache(self) -> bool:
        return self.prompt_cache_key is not None

    @field_validator("response_format")
    @classmethod
    def _format(cls, rf):
        if rf is None:
            return rf
        kind = rf.get("type")
        if kind not in ("text", "json_object", "json_schema"):
            raise ValueError("response_format.type must be text, json_object or json_schema")
        spec = rf.get("json_schema")
        if kind == "json_schema" and not (isinstance(spec, dict) and isinstance(spec.get("schema"), dict)):
            raise ValueError("response_format json_schema needs json_schema.schema (an object)")
        return rf

    @field_validator("logprobs")
    @classmethod
    def _logprobs(cls, lp):
        if lp is not None and not isinstance(lp, bool) and not 0 <= lp <= 20:
            raise ValueError("logprobs is true/false, or a count of alternatives from 0 to 20")
        return lp

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, bias, info: ValidationInfo):
        for key, value in (bias or {}).items():
            if not (key.isascii() and key.isdigit()):
                raise ValueError(f"logit_bias key {key!r} is not a token id")
            check_ids([int(key)], _vocab(info), "logit_bias key")
            if not -100 <= value <= 100:
                raise ValueError(f"logit_bias[{key!r}] = {value} is outside -100..100")
        return bias

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n):
        if n != 1:
            raise ValueError("only n=1 is supported")
        return n

    @field_validator("stop")
    @classmethod
    def _stops(cls, stop):
        return checked_stops([stop] if isinstance(stop, str) else (stop or []))

    def sampling(self, defaults: SamplingParams) -> SamplingParams:
        """This request's sampling over the server's ``defaults`` (the limit and constraint are
        set by ``service.prepare``)."""
        given = {name: getattr(self, name) for name in SAMPLING if getattr(self, name) is not None}
        if self.logit_bias:
            given["logit_bias"] = {int(k): float(v) for k, v in self.logit_bias.items()}
        return defaults.replace(**given, stop=self.stop or ())

    @property
    def response_schema(self) -> Optional[dict]:
        """The schema ``response_format`` holds the reply to (None for text)."""
        rf = self.response_format or {}
        if rf.get("type") == "json_object":
            return {"type": "object"}
        return rf["json_schema"]["schema"] if rf.get("type") == "json_schema" else None

    def constraint(self) -> dict:
        """``stream_generate``'s constraint for ``response_format`` (none for text). Without
        ``strict`` a schema is best effort, as at OpenAI: keywords llguidance does not
        implement are skipped instead of refused (the reply says which, and whether it
        validates)."""
        rf = self.response_format or {}
        if rf.get("type") == "json_object":
            return {"json_schema": {"type": "object"}}
        if rf.get("type") == "json_schema":
            schema = rf["json_schema"]["schema"]
            if not rf["json_schema"].get("strict"):
                schema = {**schema, "x-guidance": {**(schema.get("x-guidance") or {}), "lenient": True}}
            return {"json_schema": schema}
        return {}


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    tools: Optional[list[dict]] = None
    tool_choice: Union[str, dict, None] = None
    parallel_tool_calls: Optional[bool] = None  # False: at most one call (a forced block holds exactly one)
    top_logprobs: Optional[int] = Field(None, ge=0, le=20)

    @field_validator("tools")
    @classmethod
    def _tools(cls, tools):
        for t in tools or []:
            fn = t.get("function")
            if t.get("type") != "function" or not (isinstance(fn, dict) and isinstance(fn.get("name"), str)):
                raise ValueError("each tool is {'type': 'function', 'function': {'name': ..., ...}}")
        return tools

    @model_validator(mode="after")
    def _tool_choice(self):
        choice = self.tool_choice
        if choice in (None, "auto", "none"):
            return self
        if not self.tools:
            raise ValueError("tool_choice other than 'none' or 'auto' needs tools")
        if choice == "required":
            return self
        fn = choice.get("function") if isinstance(choice, dict) else None
        name = fn.get("name") if isinstance(fn, dict) else None
        if not (isinstance(choice, dict) and choice.get("type") == "function" and isinstance(name, str)):
            raise ValueError("tool_choice is 'none', 'auto', 'required' or "
                             "{'type': 'function', 'function': {'name': ...}}")
        if name not in {t["function"]["name"] for t in self.tools}:
            raise ValueError(f"tool_choice names {name!r}, which is not one of the tools")
        return self

    @property
    def tool_names(self) -> frozenset:
        """The offered tools' names: a bare ``[f(...)]`` reply naming only these is a call."""
        return frozenset(t["function"]["name"] for t in self.tools or [])

    def _forced_name(self) -> Optional[str]:
        return self.tool_choice["function"]["name"] if isinstance(self.tool_choice, dict) else None

    def forced_tool_call(self) -> str:
        """What the reply must start with for ``tool_choice``: appended to the prompt, so the
        model goes on to write a call ('required': any tool; named: that one)."""
        if self.tool_choice == "required" or isinstance(self.tool_choice, dict):
            return forced_tool_opening(self._forced_name())
        return ""

    @property
    def one_call(self) -> bool:
        return self.parallel_tool_calls is False

    def constraint(self) -> dict:
        """A forced call is held to the tools' call syntax and parameter schemas by a grammar
        over the rest of it, so it always parses (one call, or up to ``MAX_CALLS``); otherwise
        as ``response_format`` says."""
        if self.forced_tool_call():
            return {"grammar": tool_call_grammar(self.tools, self._forced_name(), opened=True,
                                                 max_calls=1 if self.one_call else MAX_CALLS)}
        return super().constraint()

    @property
    def limit(self) -> Optional[int]:
        return self.max_completion_tokens or self.max_tokens


MAX_PROMPTS = 256  # prompts in one request: each is a job, at most a batch of them at a time


class CompletionRequest(Sampling):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: Optional[int] = Field(None, ge=0)  # 0: score the prompt, generate nothing
    echo: bool = False
    suffix: Optional[str] = None  # accepted for compatibility; LFM2 has no infilling

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, prompt, info: ValidationInfo):
        prompts = prompt if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int) else [prompt]
        if not prompt or any(not p for p in prompts):
            raise ValueError("prompt is empty: give text or token ids to continue")
        if len(prompts) > MAX_PROMPTS:
            raise ValueError(f"at most {MAX_PROMPTS} prompts in one request")
        for p in prompts:
            if isinstance(p, list):
                check_ids(p, _vocab(info), "prompt id")
        return prompt

    @property
    def prompts(self) -> list[Union[str, list[int]]]:
        p = self.prompt
        return p if isinstance(p, list) and not isinstance(p[0], int) else [p]

    @property
    def limit(self) -> Optional[int]:
        return self.max_tokens

    @property
    def top(self) -> Optional[int]:
        """Alternatives per token (0: the token's own logprob only); None: no logprobs."""
        lp = self.logprobs
        return None if lp is None or lp is False else (0 if lp is True else int(lp))


def _text_of(content) -> str:
    if isinstance(content, str) or content is None:
        return content or ""
    parts = []
    for part in content:
        if part.type not in ("text", "input_text"):
            raise APIError(400, f"content part type {part.type!r} is not supported (text only)",
                           param="messages")
        parts.append(part.text or "")
    return "".join(parts)


def to_template_messages(req: ChatRequest, template_renders_tool_calls: bool) -> list[dict]:
    """OpenAI messages -> the dicts a chat template reads (LFM2 tool-call text where needed)."""
    out = []
    for m in req.messages:
        role = "system" if m.role == "developer" else m.role
        msg = {"role": role, "content": _text_of(m.content)}
        if m.tool_calls:
            calls = []
            for c in m.tool_calls:
                args = c.function.arguments
                if isinstance(args, str):
                    args = loads(args or "{}", f"the arguments of tool call {c.function.name}")
                if not isinstance(args, dict):
                    raise APIError(400, f"the arguments of tool call {c.function.name} must be a JSON "
                                   f"object, not {type(args).__name__}", param="messages")
                calls.append({"name": c.function.name, "arguments": args})
            if template_renders_tool_calls:
                msg["tool_calls"] = [{"type": "function", "function": c} for c in calls]
            else:
                msg["content"] = ("<|tool_call_start|>[" + ", ".join(
                    format_pythonic_call(c["name"], c["arguments"]) for c in calls)
                    + "]<|tool_call_end|>" + msg["content"])
        out.append(msg)
    return out


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def openai_tool_calls(calls: list[dict], start: int = 0) -> list[dict]:
    return [{"index": start + i, "id": f"call_{uuid.uuid4().hex[:16]}", "type": "function",
             "function": {"name": c["name"], "arguments": json.dumps(c["arguments"], ensure_ascii=False)}}
            for i, c in enumerate(calls)]


def usage(prompt_tokens: int, completion_tokens: int, cached: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached}}


def chat_chunk(cid: str, model: str, delta: dict, finish: Optional[str] = None, logprobs=None) -> dict:
    choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
    return {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [choice]}
