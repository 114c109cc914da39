"""Ollama's API (``/api/...``) on the same port: apps that speak only Ollama (Open WebUI,
editor plugins, Aider's ``ollama_chat/``) can use the model.

``/api/chat`` and ``/api/generate`` map Ollama's request (``options``: ``num_predict``,
``temperature``, ``top_p``, ``top_k``, ``min_p``, ``seed``, ``stop``, ``repeat_penalty``;
``format``: ``"json"`` or a JSON schema, held by our constraints; ``tools``) onto a
``ChatRequest`` and go through the service (prepare, the reply assembler), streaming NDJSON
lines by default as Ollama does (``"stream": false``: one object). ``/api/tags``, ``/api/show``,
``/api/ps`` and ``/api/version`` describe the served models (``models``: ``model`` picks one,
``keep_alive`` says how long it stays loaded once idle; a request with no prompt only loads it).
Errors have Ollama's shape, ``{"error": "message"}``, also as the last line of a stream that
has begun.
"""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from typing import Optional

from starlette.concurrency import run_in_threadpool
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from .boundary import APIError, exception_handlers, no_reply, read_body, validate
from ..text.tokenizer import folder_chat_template
from .models import UNSET, folder_config
from .openai_api import ChatRequest, to_template_messages
from .service import Routed, Service

PREFIX = "/api"
VERSION = "0.12.0"  # the Ollama API version these routes follow
OPTIONS = {"num_predict": "max_tokens", "temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
           "min_p": "min_p", "seed": "seed", "stop": "stop", "repeat_penalty": "repetition_penalty",
           "frequency_penalty": "frequency_penalty", "presence_penalty": "presence_penalty"}


def render(e: APIError) -> tuple[int, dict]:
    return e.status, {"error": e.body()["error"]["message"]}


def app(service: Service) -> Starlette:
    api = Ollama(service)
    return Starlette(routes=[Route("/api/chat", api.chat, methods=["POST"]),
                             Route("/api/generate", api.generate, methods=["POST"]),
                             Route("/api/tags", api.tags, methods=["GET"]),
                             Route("/api/show", api.show, methods=["POST"]),
                             Route("/api/ps", api.ps, methods=["GET"]),
                             Route("/api/version", api.version, methods=["GET"])],
                     exception_handlers=exception_handlers(render))


def _now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def _messages(messages) -> list:
    """Ollama's messages -> OpenAI's (a call's arguments are an object there, a string here)."""
    if not isinstance(messages, list):
        raise APIError(400, "messages: a list of {role, content}", param="messages")
    out = []
    for m in messages:
        if not isinstance(m, dict):
            raise APIError(400, "messages: each is an object {role, content}", param="messages")
        m = {k: v for k, v in m.items() if k not in ("images", "thinking", "tool_name")}
        calls = m.get("tool_calls")
        if isinstance(calls, list):
            m["tool_calls"] = [{"id": f"call_{i}", "type": "function",
                                "function": {"name": (c.get("function") or {}).get("name", ""),
                                             "arguments": json.dumps((c.get("function") or {}).get("arguments", {}))}}
                               for i, c in enumerate(calls) if isinstance(c, dict)]
        out.append(m)
    return out


def _format(fmt):
    if fmt in (None, ""):
        return None
    if fmt == "json":
        return {"type": "json_object"}
    if isinstance(fmt, dict):
        return {"type": "json_schema", "json_schema": {"name": "format", "schema": fmt}}
    raise APIError(400, "format: 'json' or a JSON schema object", param="format")


def _loads_only(body: dict, chat: bool) -> bool:
    """A request with nothing to answer: no messages (chat), no prompt (generate)."""
    return not body.get("messages") if chat else not body.get("prompt") and not body.get("suffix")


def _expiry(due) -> str:
    """A monotonic deadline as Ollama's ``expires_at`` (None: far in the future)."""
    if due is None:
        return "2318-01-01T00:00:00Z"
    at = datetime.now(timezone.utc).timestamp() + due - time.monotonic()
    return datetime.fromtimestamp(at, timezone.utc).isoformat().replace("+00:00", "Z")


class Ollama(Routed):
    def __init__(self, service: Service):
        self.service = service

    def _request(self, body: dict, messages: list) -> ChatRequest:
        options = body.get("options") or {}
        if not isinstance(options, dict):
            raise APIError(400, "options: an object", param="options")
        mapped = {OPTIONS[k]: v for k, v in options.items() if k in OPTIONS and v is not None}
        if isinstance(mapped.get("max_tokens"), int) and mapped["max_tokens"] < 0:  # -1, -2: the server's limit
            mapped.pop("max_tokens")
        chat = {"messages": messages or _messages(body.get("messages")), "tools": body.get("tools") or None,
                "response_format": _format(body.get("format")), **mapped}
        return validate(ChatRequest, {k: v for k, v in chat.items() if v is not None}, self.scheduler.vocab)

    async def chat(self, request: Request):
        return await self._serve(request, chat=True)

    async def generate(self, request: Request):
        return await self._serve(request, chat=False)

    async def _serve(self, request: Request, chat: bool):
        sv = self.service
        sv.authorize(request)
        body = await read_body(request, sv.body_timeout)
        s, adapter = await sv.route(body.get("model"), body.get("keep_alive", UNSET))
        item = self._chat_item if chat else self._generate_item
        if _loads_only(body, chat):  # Ollama's way to load (or, keep_alive 0, unload) a model
            return JSONResponse({**item(adapter or s.model_id, "", []), "done": True,
                                 "done_reason": "unload" if body.get("keep_alive") == 0 else "load"})
        if chat:
            req = await run_in_threadpool(self._request, body, [])
        else:
            if not isinstance(body.get("prompt", ""), str):
                raise APIError(400, "prompt: a string", param="prompt")
            system = [{"role": "system", "content": body["system"]}] if body.get("system") else []
            user = [{"role": "user", "content": body.get("prompt", "")}]
            req = await run_in_threadpool(self._request, body, system + user)
        tools = req.tool_names if req.tools else frozenset()
        if chat or not body.get("raw"):
            prompt = await sv.render(to_template_messages(req, self.scheduler.template_renders_tool_calls),
                                     req.tools if tools else None)
        else:
            prompt = body.get("prompt", "")
        started = time.perf_counter_ns()
        name = body.get("model")
        job = await sv.prepare(req, prompt, model=name if isinstance(name, str) else None)
        shape = lambda text, calls: item(job.model, text, calls)  # noqa: E731
        if body.get("stream", True):
            return StreamingResponse(self._lines(job, tools, shape, started), media_type="application/x-ndjson")
        reply = await sv.whole(request, job, "", tools)
        return JSONResponse({**shape(reply.text, reply.calls), **self._final(job, reply.last, started)})

    def _chat_item(self, model: str, text: str, calls: list) -> dict:
        message = {"role": "assistant", "content": text}
        if calls:
            message["tool_calls"] = [{"function": {"name": c["name"], "arguments": c["arguments"]}} for c in calls]
        return {"model": model, "created_at": _now(), "message": message}

    def _generate_item(self, model: str, text: str, calls: list) -> dict:
        return {"model": model, "created_at": _now(), "response": text}

    def _final(self, job, last, started: int) -> dict:
        total = time.perf_counter_ns() - started
        timing = getattr(job, "timing", None)
        first = int((timing.first - timing.submitted) * 1e9) if timing and timing.first else 0
        return {"done": True, "done_reason": "length" if last.finish_reason == "length" else "stop",
                "total_duration": total, "load_duration": 0, "prompt_eval_count": job.prompt_tokens,
                "prompt_eval_duration": first, "eval_count": last.generation_tokens,
                "eval_duration": max(0, total - first)}

    async def _lines(self, job, tools, shape, started: int):
        last = None
        try:
            async for p in self.service.pieces(job, "", tools):
                last = p.response
                if p.text or p.calls:
                    yield json.dumps({**shape(p.text, p.calls), "done": False}) + "\n"
            if last is None:
                raise no_reply(self.scheduler)
            yield json.dumps({**shape("", []), **self._final(job, last, started)}) + "\n"
        except APIError as e:
            yield json.dumps(render(e)[1]) + "\n"

    # The served models --------------------------------------------------------------------

    def _entry(self, e, name: Optional[str] = None) -> dict:
        """``/api/tags``' item for registry entry ``e`` (loaded or not), or for ``name``, an
        adapter on it."""
        config = vars(e.scheduler.model.args) if e.scheduler is not None else folder_config(e.path)
        kind = config.get("model_type", "lfm2")
        details = {"format": "mlx", "family": kind, "families": [kind], "parameter_size": "",
                   "quantization_level": "Q4" if config.get("quantization") else "F16"}
        name = name or e.name
        return {"name": name, "model": name, "modified_at": _now(), "size": e.size, "digest": "", "details": details}

    def _entries(self, entries) -> list[dict]:
        """Each entry's item, then one per adapter resident on it."""
        items = [(e, self._entry(e)) for e in entries]
        for e in entries:
            if e.scheduler is not None and e.scheduler.adapters is not None:
                items += [(e, self._entry(e, n)) for n in e.scheduler.adapters.loaded]
        return items

    async def tags(self, request: Request):
        self.service.authorize(request)
        return JSONResponse({"models": [item for _, item in self._entries(list(self.service.models.entries.values()))]})

    async def ps(self, request: Request):
        self.service.authorize(request)
        return JSONResponse({"models": [{**item, "expires_at": _expiry(e.expires), "size_vram": e.size}
                                        for e, item in self._entries(self.service.models.loaded())]})

    async def show(self, request: Request):
        """The model's details, template and context from its folder's files: a model not
        loaded stays unloaded (apps call this for every listed model)."""
        self.service.authorize(request)
        body = await read_body(request, self.service.body_timeout)
        name = body.get("model") or body.get("name")
        if name is not None and not isinstance(name, str):
            raise APIError(400, "model: a string", param="model")
        e, _ = self.service.resolve(name)
        s = e.scheduler
        if s is not None:
            config, template, context = vars(s.model.args), s.tokenizer.chat_template, s.max_context
        else:
            config, template = await run_in_threadpool(lambda: (folder_config(e.path),
                                                                 folder_chat_template(e.path) if e.path else None))
            limits = (config.get("max_position_embeddings"), self.service.models.max_context)  # as Scheduler's
            context = min((n for n in limits if isinstance(n, int) and n > 0), default=0)
        kind = config.get("model_type", "lfm2")
        info = {"general.architecture": kind, "context_length": context, f"{kind}.context_length": context,
                f"{kind}.embedding_length": config.get("hidden_size"), f"{kind}.block_count": config.get("num_hidden_layers")}
        return JSONResponse({"modelfile": "", "parameters": "", "template": template or "",
                             "details": self._entry(e)["details"], "capabilities": ["completion", "tools"],
                             "model_info": {k: v for k, v in info.items() if v is not None}})

    async def version(self, request: Request):
        return JSONResponse({"version": VERSION})
