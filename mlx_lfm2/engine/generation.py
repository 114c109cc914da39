"""Generation in two layers.

* ``generate_step`` (tokens only): chunked prefill, then a decode loop that builds step
  n+1's graph before waiting on step n (``mx.async_eval``), so the device never idles on
  Python. It knows nothing of text; it stops at ``max_tokens`` or when ``stop_event`` is set.
* ``stream_generate`` / ``generate`` (text): prompts as text, ids or chat messages, the
  streaming detokenizer, stop ids and stop strings (never shown), and stats.

The caller may pass a cache that already holds a prefix (see ``session.PromptCache``):
only the new tokens are prefilled, and ``cache[0].offset`` always says how many tokens the
cache has consumed.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence, Union

import mlx.core as mx

from ..model import device
from ..model.pipeline import PipelineModel
from ..text.constraints import make_constraint
from ..model.cache import checkpoint
from .sample import make_logits_processors, make_sampler
from .validate import TokenIdError, check_token_ids, vocab_rows  # noqa: F401 (TokenIdError: for importers)

Prompt = Union[str, Sequence[int], Sequence[dict]]


class PromptTooLongError(ValueError):
    """The prompt (plus what the cache already holds) exceeds the model's context."""


# Recommended sampling from the model cards, keyed by the MoE shape that identifies them.
MODEL_CARD_DEFAULTS = {
    (64, 4): dict(temperature=0.1, top_k=50, repetition_penalty=1.05),  # LFM2-24B-A2B
    (32, 4): dict(temperature=0.3, min_p=0.15, repetition_penalty=1.05),  # LFM2-8B-A1B
}
FALLBACK_DEFAULTS = dict(temperature=0.3, min_p=0.15, repetition_penalty=1.05)


def default_sampling(model) -> dict:
    a = model.args
    return dict(MODEL_CARD_DEFAULTS.get((a.num_experts, a.num_experts_per_tok), FALLBACK_DEFAULTS))


def context_length(model) -> int:
    return model.args.max_position_embeddings


def default_prefill_step() -> int:
    """Prompt tokens per prefill chunk: 128 on the CPU, 2048 on GPUs (see ``device.prefill_step``)."""
    return device.prefill_step()


def prefill(model, tokens: mx.array, cache: list, step_size: Optional[int] = None) -> None:
    """Run ``tokens`` ``[L]`` through the model into ``cache``, ``step_size`` at a time."""
    step_size = step_size or default_prefill_step()
    for start in range(0, tokens.size, step_size):
        model(tokens[None, start : start + step_size], cache=cache)
        mx.eval([c.state for c in cache])
        checkpoint(cache)  # a later prompt that shares this prefix can rewind to here


def generate_step(prompt: mx.array, model, cache: list, *, max_tokens: int = 256, sampler=None,
                  logits_processors=(), prefill_step_size: Optional[int] = None,
                  stop_event: Optional[threading.Event] = None) -> Iterator[tuple[int, mx.array]]:
    """Yield ``(token, logprobs [V])`` for up to ``max_tokens`` new tokens after ``prompt`` ``[L]``;
    ``logprobs`` are the model's own (before ``logits_processors``, which shape only the sampling).

    ``prompt`` must hold at least one token; everything before its last token is prefilled in
    chunks. ``logits_processors`` see the prompt and generated ids as history.
    """
    sampler = sampler or make_sampler(0.0)
    if prompt.size == 0:
        raise ValueError("prompt is empty: nothing to continue from")
    check_token_ids(prompt.tolist(), vocab_rows(model), "prompt token id")
    # Under mlx.launch every rank runs this loop; rank 0's prompt, tokens and stop decisions
    # are shared so the ranks stay in step (see model.pipeline); a stop_event then ends it a token
    # or two later than in one process (the flag travels with a token).
    shared = isinstance(model, PipelineModel)
    if shared:
        prompt = model.share_prompt(prompt)
    history = prompt

    def stopped() -> bool:
        return stop_event is not None and stop_event.is_set()

    def step(tokens: mx.array):
        nonlocal history
        logits = model(tokens[None], cache=cache)[:, -1, :]
        # Reported: the model's own distribution; sampled: the processed one (penalties, bias).
        own = logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        if logits_processors:
            for proc in logits_processors:
                logits = proc(history, logits)
            logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        y, stop = sampler(logprobs), None
        if shared:
            y, stop = model.share_token(y, stopped())
        if logits_processors:
            history = mx.concatenate([history, y.astype(history.dtype)])
        return y, own[0], stop

    prefill(model, prompt[:-1], cache, prefill_step_size)
    if max_tokens <= 0:
        return
    y, logprobs, stop = step(prompt[-1:])
    mx.async_eval(y, logprobs)
    last_stop = None  # the shared stop flag of the token yielded last (already evaluated)
    for n in range(max_tokens):
        if (last_stop is not None and last_stop.item()) if shared else stopped():
            return
        if n + 1 < max_tokens:
            next_y, next_logprobs, next_stop = step(y)  # feeds y into the cache
            mx.async_eval(next_y, next_logprobs)
        yield y.item(), logprobs
        last_stop = stop
        if n + 1 < max_tokens:
            y, logprobs, stop = next_y, next_logprobs, next_stop


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


def encode_prompt(tokenizer, prompt: Prompt, tools=None) -> list[int]:
    if isinstance(prompt, str):
        return tokenizer.encode(prompt)
    prompt = list(prompt)
    if prompt and isinstance(prompt[0], dict):
        return tokenizer.apply_chat_template(prompt, tools=tools, add_generation_prompt=True, tokenize=True)
    return prompt  # ids: checked by the caller (check_token_ids)


def _held_back(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters could still begin a stop string."""
    n = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                n = max(n, k)
                break
    return n


def stream_generate(model, tokenizer, prompt: Prompt, max_tokens: int = 256, *,
                    temperature: Optional[float] = None, top_p: float = 1.0, top_k: int = 0,
                    min_p: float = 0.0, repetition_penalty: Optional[float] = None,
                    repetition_context_size: int = 64, logit_bias: Optional[dict] = None,
                    frequency_penalty: float = 0.0, presence_penalty: float = 0.0,
                    seed: Optional[int] = None, stop: Union[str, Sequence[str], None] = None,
                    cache: Optional[list] = None, stop_event: Optional[threading.Event] = None,
                    prefill_step_size: Optional[int] = None, tools=None, json_schema=None,
                    regex: Optional[str] = None, grammar: Optional[str] = None, draft_model=None,
                    draft_cache: Optional[list] = None, num_draft_tokens: Optional[int] = None,
                    prompt_lookup: bool = False) -> Iterator[GenerationResponse]:
    """Stream a completion of ``prompt``; the last response carries ``finish_reason``.

    Sampling arguments left as None use greedy decoding (``temperature=0``) and no penalty;
    front ends pass the model card defaults (``default_sampling``). ``json_schema`` (a dict),
    ``regex`` or ``grammar`` (llguidance Lark) constrain the reply, which ends ("stop") when
    the value closes; an invalid one raises ``ConstraintError`` (see ``text.constraints``).
    ``draft_model`` (an LFM2 sharing the tokenizer, with ``draft_cache`` holding what ``cache``
    holds) or ``prompt_lookup=True`` turn on speculative decoding (``speculative.py``): same
    greedy output, same sampling distribution, fewer target passes where verifying is cheap.
    Constrained replies and pipeline-parallel models decode plainly.
    """
    rows = vocab_rows(model)
    ids = check_token_ids(encode_prompt(tokenizer, prompt, tools), rows, "prompt token id")
    check_token_ids(tokenizer.eos_token_ids, rows, "stop token id")
    cache = model.make_cache() if cache is None else cache
    held = cache[0].offset if cache else 0
    if held + len(ids) + 1 > context_length(model):
        raise PromptTooLongError(
            f"prompt of {len(ids)} tokens (+{held} cached) does not fit the model's context of "
            f"{context_length(model)} tokens: shorten it or start a new conversation"
        )
    max_tokens = max(0, min(max_tokens, context_length(model) - held - len(ids)))
    stops = [stop] if isinstance(stop, str) else [s for s in (stop or []) if s]
    sampler = make_sampler(temperature or 0.0, top_p, top_k, min_p, seed)
    processors = make_logits_processors(repetition_penalty, repetition_context_size, logit_bias,
                                        frequency_penalty, presence_penalty, prompt_tokens=len(ids),
                                        vocab_size=rows)
    constraint = make_constraint(tokenizer, json_schema=json_schema, regex=regex, grammar=grammar,
                                 prompt_tokens=len(ids), max_tokens=max_tokens)
    if constraint is not None:
        processors.append(constraint)  # last: it masks what the others produced
    detok = tokenizer.detokenizer()
    eos = tokenizer.eos_token_ids

    mx.reset_peak_memory()
    tic = time.perf_counter()
    prompt_tps = gen_tps = 0.0
    text, shown, n, stop_token, stop_string = "", 0, 0, None, None
    spec = {}
    speculate = (draft_model is not None or prompt_lookup) and constraint is None \
        and not isinstance(model, PipelineModel)
    if speculate:
        from .sample import make_distribution
        from .speculative import speculative_generate_step

        stepper = speculative_generate_step(
            mx.array(ids, dtype=mx.uint32), model, cache, draft_model=draft_model, draft_cache=draft_cache,
            prompt_lookup=prompt_lookup, num_draft_tokens=num_draft_tokens, max_tokens=max_tokens,
            sampler=sampler, distribution=make_distribution(temperature or 0.0, top_p, top_k, min_p),
            logits_processors=processors, seed=seed, prefill_step_size=prefill_step_size,
            stop_event=stop_event, stats=spec)
    else:
        stepper = ((t, lp, False) for t, lp in generate_step(
            mx.array(ids, dtype=mx.uint32), model, cache, max_tokens=max_tokens, sampler=sampler,
            logits_processors=processors, prefill_step_size=prefill_step_size, stop_event=stop_event))

    def response(segment, token, logprobs, reason, stop_string=None, from_draft=False):
        return GenerationResponse(segment, token, logprobs, reason, len(ids), n, prompt_tps, gen_tps,
                                  mx.get_peak_memory() / 1e9, stop_string, from_draft, spec.get("drafted", 0),
                                  spec.get("accepted", 0))

    for token, logprobs, from_draft in stepper:
        if n == 0:
            prompt_tps = len(ids) / (time.perf_counter() - tic)
            tic = time.perf_counter()
        n += 1
        gen_tps = (n - 1) / max(time.perf_counter() - tic, 1e-9)
        if token in eos:
            finish, stop_token = "stop", token
            text += detok.finalize()
            break
        text += detok.add_token(token)
        # A stop string can only begin in the unshown tail: any earlier start was held back.
        hits = [(i, s) for i, s in ((text.find(s, shown), s) for s in stops) if i >= 0]
        if hits:
            cut, stop_string = min(hits)
            text, finish = text[:cut], "stop"
            break
        visible = len(text) - _held_back(text, stops)
        yield response(text[shown:visible], token, logprobs, None, from_draft=from_draft)
        shown = max(shown, visible)
    else:
        finish = "cancelled" if stop_event is not None and stop_event.is_set() else "length"
        text += detok.finalize()
    stepper.close()
    yield response(text[shown:], stop_token, None, finish, stop_string)


def generate(model, tokenizer, prompt: Prompt, max_tokens: int = 256, verbose: bool = False, **kwargs) -> str:
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
