"""``POST /v1/completions`` as eval harnesses use it (lm-evaluation-harness, OpenAI's old API).

* ``prompt`` is a string, a list of strings, a list of token ids or a list of id lists: one
  choice per prompt, ``index`` in the prompts' order. Ids are fed as given (never
  re-tokenized), so a harness scores exactly the tokens it sent.
* ``echo``: the text starts with the prompt, and with ``logprobs`` the prompt's own tokens
  come first in ``tokens`` / ``token_logprobs`` / ``top_logprobs`` / ``text_offset`` (the
  first token has no context: null, as OpenAI did). ``max_tokens: 0`` scores without
  generating.
* ``logprobs: N`` (0..20): each token's logprob and the ``N`` likeliest alternatives, from
  the model's own distribution (before penalties, bias and temperature).
* Streaming ends with a usage chunk when ``stream_options.include_usage`` is set.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Optional, Union

from pydantic import Field, ValidationInfo, field_validator

from .openai_api import APIError, Sampling, check_ids, new_id, usage

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
                check_ids(p, (info.context or {}).get("vocab"), "prompt id")
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


def token_strings(tokenizer, ids: list[int]) -> list[str]:
    return [tokenizer.decode([i]) for i in ids]


def _top(chosen: str, logprob: float, alternatives) -> dict:
    """A position's ``top_logprobs``: the alternatives and the chosen token (as vLLM
    answers, so ``logprobs: 0`` still names the token, and the likeliest is always there)."""
    return {**dict(alternatives), chosen: logprob}


def logprobs_block(tokenizer, prompt_ids: Optional[list[int]], scores, generated: list[dict]) -> dict:
    """OpenAI's completions ``logprobs``: the prompt's tokens (with ``echo``; ``scores`` from
    ``engine.score.score_prompt``) then the generated ones (chat-shaped entries)."""
    tokens, lps, tops = [], [], []
    if prompt_ids is not None:
        strings = token_strings(tokenizer, prompt_ids)
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


def body(cid: str, model_id: str, choices: list[dict]) -> dict:
    return {"id": cid, "object": "text_completion", "created": int(time.time()), "model": model_id,
            "choices": choices}


def choice(index: int, text: str, finish: Optional[str], logprobs: Optional[dict] = None) -> dict:
    return {"index": index, "text": text, "finish_reason": finish, "logprobs": logprobs}


def stream_usage(cid: str, model_id: str, prompt_tokens: int, completion_tokens: int, cached: int) -> str:
    return json.dumps({**body(cid, model_id, []), "usage": usage(prompt_tokens, completion_tokens, cached)})


def one_stream_prompt(req: CompletionRequest) -> None:
    if len(req.prompts) > 1:
        raise APIError(400, "stream takes one prompt (a list of prompts is answered whole)", param="prompt")
    if req.echo and req.top is not None:
        raise APIError(400, "echo with logprobs is answered whole: set stream to false", param="echo")


def routes(engine, check_auth, body_timeout: float, constrained, prepare, results, on_worker) -> list:
    """``/v1/completions`` over the server's own layer; ``on_worker(fn)`` runs ``fn`` on the
    thread that owns the model (scoring a prompt is a forward like any other)."""
    from sse_starlette.sse import EventSourceResponse
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from ..engine.score import score_prompt
    from .boundary import no_reply, read_body, sse_events, validate, watch

    tok = engine.tokenizer

    def text_and_ids(prompt) -> tuple[str, list[int]]:
        if isinstance(prompt, str):
            return prompt, tok.encode(prompt, add_special_tokens=False)
        return tok.decode(prompt), list(prompt)

    async def one(request, req: CompletionRequest, index: int, prompt, constraint) -> tuple[dict, dict]:
        """The choice for one prompt, and its usage counts."""
        text, ids = text_and_ids(prompt)
        scores = None
        if req.echo and req.top is not None:
            scores = await on_worker(lambda: score_prompt(engine.model, ids, req.top))
        job = prepare(req, text, req.top, constraint)
        out, entries, last = (text if req.echo else ""), [], None
        async with watch(request, job):
            async for r, entry in results(job):
                out += r.text
                last = r
                if entry:
                    entries.append(entry)
        if last is None:
            raise no_reply(engine)
        lps = None
        if req.top is not None:
            lps = logprobs_block(tok, ids if req.echo else None, scores or [], entries)
        counts = {"prompt": job.prompt_tokens, "generated": last.generation_tokens, "cached": job.cached_tokens}
        return choice(index, out, _finish(last.finish_reason), lps), counts

    async def completions(request: Request):
        check_auth(request)
        req = validate(CompletionRequest, await read_body(request, body_timeout), engine.vocab)
        constraint = await constrained(req)
        cid, model_id = new_id("cmpl"), engine.model_id
        if req.stream:
            one_stream_prompt(req)
            text, ids = text_and_ids(req.prompts[0])
            job = prepare(req, text, req.top, constraint)
            return EventSourceResponse(sse_events(_stream(job, req, cid, model_id, text)), ping=15)
        choices, counts = [], []
        for start in range(0, len(req.prompts), engine.batch.max_batch):  # a batch in flight at a time
            done = await asyncio.gather(*(one(request, req, i, p, constraint) for i, p in
                                          enumerate(req.prompts[start: start + engine.batch.max_batch], start)))
            choices += [c for c, _ in done]
            counts += [n for _, n in done]
        out = body(cid, model_id, choices)
        out["usage"] = usage(sum(n["prompt"] for n in counts), sum(n["generated"] for n in counts),
                             sum(n["cached"] for n in counts))
        return JSONResponse(out)

    async def _stream(job, req, cid, model_id, text):
        last = None
        if req.echo:
            yield json.dumps(body(cid, model_id, [choice(0, text, None)]))
        async for r, entry in results(job):
            last = r
            lps = logprobs_block(tok, None, [], [entry]) if entry else None
            if r.text or lps:
                yield json.dumps(body(cid, model_id, [choice(0, r.text, None, lps)]))
        if last is None:
            raise no_reply(engine)
        yield json.dumps(body(cid, model_id, [choice(0, "", _finish(last.finish_reason))]))
        if (req.stream_options or {}).get("include_usage"):
            yield stream_usage(cid, model_id, job.prompt_tokens, last.generation_tokens, job.cached_tokens)
        yield "[DONE]"

    return [Route("/v1/completions", completions, methods=["POST"])]


def _finish(reason: Optional[str]) -> Optional[str]:
    return {"cancelled": "stop"}.get(reason, reason)
