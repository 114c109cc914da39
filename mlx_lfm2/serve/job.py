"""A request as the worker carries it (``Job``), and what the worker sends back on it.

The front end (``serve.service``) builds a job from a checked request and submits it to the
``Scheduler``; the worker ``emit``s into the job's bounded outbox (``serve.outbox``), in order:
each token's response with its logprob entry (``logprob_entry``), or an ``APIError``
(``refused``: the request's fault, before its first token; ``failed``: ours), then ``DONE``.
"""

from __future__ import annotations

import asyncio
import math
import threading
from dataclasses import dataclass, field
from typing import Optional

from ..engine.request import PromptTooLongError
from ..engine.sample import SamplingParams
from .boundary import APIError
from .outbox import Outbox

DONE = object()  # a job's last item
IMPOSSIBLE = -9999.0  # the logprob OpenAI reports for a token that cannot be sampled


@dataclass
class Job:
    prompt_text: str
    params: SamplingParams
    top_logprobs: Optional[int]  # None: no logprobs
    loop: asyncio.AbstractEventLoop
    ids: Optional[list] = None  # prompt_text's ids, when the front end tokenized it already
    exact_ids: bool = False  # ids are the prompt as sent (token ids): the model sees exactly them
    constraint: Optional[object] = None  # params' constraint, compiled by the front end
    out: Outbox = field(default_factory=Outbox)
    stop: threading.Event = field(default_factory=threading.Event)
    prompt_tokens: int = 0
    cached_tokens: int = 0
    cache_written: int = 0  # prompt tokens this job's new disk-cache blocks hold
    started: bool = False  # a token was generated
    schema_warnings: list = field(default_factory=list)  # what a lenient schema's constraint skips
    score_ids: Optional[list] = None  # score these prompt ids first (completions' echo with logprobs)
    scores: list = field(default_factory=list)  # their ``engine.score.TokenScore``s, before the first token
    pin: bool = False  # keep this prompt in the disk cache after unpinned ones
    timing: Optional[object] = None  # serve.metrics.JobTiming: its tokens' times, when observed
    adapter: Optional[str] = None  # a resident adapter's name (None: the base)
    model: str = ""  # the name the request asked for, as its reply reports it
    memory: Optional[object] = None  # engine.memory.Row: its place in the batch's memory (serve.admission)

    def emit(self, item) -> None:
        if self.timing is not None and isinstance(item, tuple) and item[0].token is not None:
            self.timing.token(item[0].text)
        self.out.put(item, self.loop)


def failed(e: Exception) -> APIError:
    return APIError(500, f"generation failed: {type(e).__name__}: {e}", type_="server_error")


def refused(e: ValueError) -> APIError:
    """The request's fault, found by the engine before its first token: a 400."""
    if isinstance(e, PromptTooLongError):
        return APIError(400, str(e), param="messages", code="context_length_exceeded")
    return APIError(400, str(e), code="invalid_value")


def logprob_entry(tokenizer, token: int, logprobs, top: int) -> dict:
    """One ``logprobs.content`` item: the chosen token, its logprob and the top alternatives
    (computed on the worker, which holds the arrays)."""
    import mlx.core as mx

    def item(t, lp):
        text = tokenizer.decode([t])
        # A masked token (a grammar, a -inf bias) has logprob -inf, which JSON cannot carry:
        # OpenAI reports such tokens as -9999.0.
        lp = lp if math.isfinite(lp) else IMPOSSIBLE
        return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}

    entry = item(token, logprobs[token].item())
    entry["top_logprobs"] = []
    if top:
        ids = mx.argpartition(-logprobs, kth=top - 1)[:top]
        vals = logprobs[ids]
        order = mx.argsort(-vals)
        entry["top_logprobs"] = [item(int(t), float(v)) for t, v in zip(ids[order].tolist(), vals[order].tolist())]
    return entry
