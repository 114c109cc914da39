"""The text layer: what a token stream becomes for a reader.

``TextStream`` turns one sequence's tokens into text: the streaming detokenizer (multi-byte
characters never split), stop ids and stop strings (never shown; a possible stop's start is
held back until it cannot be one; found in linear time by ``stops.StopMatcher``), and the stats (time to first token, tokens per second).
It is the one text layer under ``stream_generate``, ``batch_generate``, speculative decoding
and the server. The token loops below it (``decode``, ``speculative``, ``batch``) know
nothing of text.

* ``stream_generate`` / ``generate``: prompts as text, ids or chat messages, through the one
  request builder (``request.build_request``) into the plain or speculative loop, as text.

The caller may pass a cache that already holds a prefix (see ``prompt_cache.PromptCache``):
only the new tokens are prefilled, and ``cache[0].offset`` always says how many tokens the
cache has consumed.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence, Union

import mlx.core as mx

from .decode import generate_step
from .request import Request, build_request
from .sample import SamplingParams
from .stops import StopMatcher
from .speculative import speculative_generate_step

Prompt = Union[str, Sequence[int], Sequence[dict]]


# Recommended sampling from the model cards, keyed by the MoE shape that identifies them.
MODEL_CARD_DEFAULTS = {
    (64, 4): dict(temperature=0.1, top_k=50, repetition_penalty=1.05),  # LFM2-24B-A2B
    (32, 4): dict(temperature=0.3, min_p=0.15, repetition_penalty=1.05),  # LFM2-8B-A1B
}
FALLBACK_DEFAULTS = dict(temperature=0.3, min_p=0.15, repetition_penalty=1.05)


def default_sampling(model) -> dict:
    a = model.args
    return dict(MODEL_CARD_DEFAULTS.get((a.num_experts, a.num_experts_per_tok), FALLBACK_DEFAULTS))


@dataclass
class GenerationResponse:
    text: str  # the new text since the last response
    token: Optional[int]  # the token just generated; on the last response, the stop token if any
    logprobs: Optional[mx.array]
    finish_reason: Optional[str]  # "stop", "length", "cancelled", or None while generating
    prompt_tokens: int  # tokens prefilled for this call (not those reused from a cache)
    generation_tokens: int
    prompt_tps: float
    generation_tps: float
    peak_memory: float  # GB
    stop_sequence: Optional[str] = None  # on the last response: the stop string that ended it, if one did
    from_draft: bool = False  # speculative decoding: a draft token the target accepted
    draft_tokens: int = 0  # speculative decoding: drafted tokens verified so far...
    accepted_tokens: int = 0  # ...and how many of them the target kept

    @property
    def acceptance(self) -> Optional[float]:
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else None


@dataclass
class TextStream:
    """One sequence's text over its tokens (see the module docstring). ``feed`` each token,
    ``end`` when generation stops without one; ``spec``: speculative counts (drafted, accepted)."""

    tokenizer: object
    stops: Union[str, Sequence[str], None]
    prompt_tokens: int
    spec: dict = field(default_factory=dict)
    start: float = field(default_factory=time.perf_counter)
    shown: int = 0  # characters returned so far
    n: int = 0
    first: Optional[float] = None  # when the first token arrived
    last: Optional[float] = None  # when the latest one did
    finish_reason: Optional[str] = None

    def __post_init__(self):
        self.detok = self.tokenizer.detokenizer()
        self.eos = set(self.tokenizer.eos_token_ids)
        self.stops = [self.stops] if isinstance(self.stops, str) else [s for s in (self.stops or []) if s]
        self.matcher = StopMatcher(self.stops)
        self._shown: list[str] = []  # the text returned, in pieces (no copy of all of it per token)
        self.tail = ""  # the text not yet returned: a possible stop's start, held back

    @property
    def text(self) -> str:
        """All the text so far (a stop string and what followed it cut off)."""
        return "".join(self._shown) + self.tail

    @property
    def ttft(self) -> Optional[float]:
        return None if self.first is None else self.first - self.start

    @property
    def generation_tps(self) -> float:
        return (self.n - 1) / max(self.last - self.first, 1e-9) if self.first else 0.0

    def _response(self, segment, token, logprobs, reason, stop_sequence=None, from_draft=False) -> GenerationResponse:
        prompt_tps = self.prompt_tokens / max(self.ttft, 1e-9) if self.first else 0.0
        if reason:
            self.finish_reason = reason
        return GenerationResponse(segment, token, logprobs, reason, self.prompt_tokens, self.n, prompt_tps,
                                  self.generation_tps, mx.get_peak_memory() / 1e9, stop_sequence, from_draft,
                                  self.spec.get("drafted", 0), self.spec.get("accepted", 0))

    def feed(self, token: int, logprobs, finish: Optional[str] = None,
             from_draft: bool = False) -> list[GenerationResponse]:
        """The responses for one generated token (the last one carries ``finish_reason``).
        ``finish``: what the token loop says ("stop": a stop id, "length": its last token)."""
        self.last = time.perf_counter()
        self.first = self.first or self.last
        self.n += 1
        if token in self.eos or finish == "stop":
            self.tail += self.detok.finalize()
            return [self._response(self.tail, token, None, "stop")]
        new = self.detok.add_token(token)
        hit = self.matcher.feed(new)
        self.tail += new  # at most the longest stop's length before ``new``
        # A stop string can only begin in the unshown tail: any earlier start was held back.
        if hit:
            self.tail = self.tail[: hit[0] - self.shown]
            return [self._response(self.tail, None, None, "stop", hit[1])]
        visible = len(self.tail) - self.matcher.held
        segment, self.tail = self.tail[:visible], self.tail[visible:]
        self._shown.append(segment)
        self.shown += visible
        out = [self._response(segment, token, logprobs, None, from_draft=from_draft)]
        if finish == "length":
            out.append(self.end("length"))
        return out

    def end(self, reason: str) -> GenerationResponse:
        """The last response when generation ends without a token (length, cancelled)."""
        self.tail += self.detok.finalize()
        r = self._response(self.tail, None, None, reason)
        self._shown.append(self.tail)
        self.shown, self.tail = self.shown + len(self.tail), ""
        return r


def encode_prompt(tokenizer, prompt: Prompt, tools=None) -> list[int]:
    if isinstance(prompt, str):
        return tokenizer.encode(prompt)
    prompt = list(prompt)
    if prompt and isinstance(prompt[0], dict):
        return tokenizer.apply_chat_template(prompt, tools=tools, add_generation_prompt=True, tokenize=True)
    return prompt  # ids: checked by the request builder


def stream_generate(model, tokenizer, prompt: Prompt, max_tokens: Optional[int] = None, *,
                    sampling: Optional[SamplingParams] = None, cache: Optional[list] = None,
                    stop_event: Optional[threading.Event] = None, prefill_step_size: Optional[int] = None,
                    tools=None, draft_model=None, draft_cache: Optional[list] = None,
                    num_draft_tokens: Optional[int] = None, prompt_lookup: bool = False,
                    **settings) -> Iterator[GenerationResponse]:
    """Stream a completion of ``prompt``; the last response carries ``finish_reason``.

    ``sampling`` (a ``SamplingParams``) says how to sample, how long and when to stop;
    ``max_tokens`` and ``settings`` (its fields by name: ``temperature=0.7, stop=["\\n"]``)
    change it for this call. Left out, decoding is greedy with no penalty; front ends pass
    the model card defaults (``default_sampling``). A constraint (``json_schema``, ``regex``,
    ``grammar``) ends the reply ("stop") when the value closes; an invalid one raises
    ``ConstraintError`` (see ``text.constraints``).
    ``draft_model`` (an LFM2 sharing the tokenizer, with ``draft_cache`` holding what ``cache``
    holds) or ``prompt_lookup=True`` turn on speculative decoding (``speculative.py``): same
    greedy output, same sampling distribution, fewer target passes where verifying is cheap.
    Constrained replies and pipeline-parallel models decode plainly.
    """
    params = (sampling or SamplingParams()).replace(
        **settings, **({} if max_tokens is None else {"max_tokens": max_tokens}))
    cache = model.make_cache() if cache is None else cache
    held = cache[0].offset if cache else 0
    request = build_request(model, tokenizer, encode_prompt(tokenizer, prompt, tools), params, held)
    yield from stream_request(model, tokenizer, request, cache, stop_event=stop_event,
                              prefill_step_size=prefill_step_size, draft_model=draft_model, draft_cache=draft_cache,
                              num_draft_tokens=num_draft_tokens, prompt_lookup=prompt_lookup)


def stream_request(model, tokenizer, request: Request, cache: list, *, stop_event: Optional[threading.Event] = None,
                   prefill_step_size: Optional[int] = None, draft_model=None, draft_cache: Optional[list] = None,
                   num_draft_tokens: Optional[int] = None, prompt_lookup: bool = False) -> Iterator[GenerationResponse]:
    """``stream_generate`` for a request already built (``request.build_request``) against ``cache``."""
    prompt = mx.array(request.ids, dtype=mx.uint32)
    spec = {}
    speculate = (draft_model is not None or prompt_lookup) and request.constraint is None \
        and not getattr(model, "shares_tokens", False)
    if speculate:
        stepper = speculative_generate_step(
            prompt, model, cache, draft_model=draft_model, draft_cache=draft_cache, prompt_lookup=prompt_lookup,
            num_draft_tokens=num_draft_tokens, max_tokens=request.max_tokens, sampler=request.sampler,
            distribution=request.params.distribution(), logits_processors=request.processors,
            seed=request.params.seed, prefill_step_size=prefill_step_size, stop_event=stop_event, stats=spec)
    else:
        stepper = ((t, lp, False) for t, lp in generate_step(
            prompt, model, cache, max_tokens=request.max_tokens, sampler=request.sampler,
            logits_processors=request.processors, prefill_step_size=prefill_step_size, stop_event=stop_event))
    mx.reset_peak_memory()
    text = TextStream(tokenizer, request.params.stop, len(request.ids), spec)
    for token, logprobs, from_draft in stepper:
        out = text.feed(token, logprobs, None, from_draft)
        if out[-1].finish_reason:
            break
        yield from out
    else:
        out = [text.end("cancelled" if stop_event is not None and stop_event.is_set() else "length")]
    stepper.close()
    yield from out


def generate(model, tokenizer, prompt: Prompt, max_tokens: Optional[int] = None, verbose: bool = False,
             **kwargs) -> str:
    """The whole completion as a string (``stream_generate``'s arguments)."""
    out = []
    for r in stream_generate(model, tokenizer, prompt, max_tokens, **kwargs):
        out.append(r.text)
        if verbose:
            print(r.text, end="", flush=True)
    if verbose:
        print(f"\nprompt: {r.prompt_tokens} tokens, {r.prompt_tps:.1f} tok/s | "
              f"generation: {r.generation_tokens} tokens, {r.generation_tps:.1f} tok/s | "
              f"peak memory {r.peak_memory:.2f} GB")
    return "".join(out)
