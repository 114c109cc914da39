"""The token loop's two units, written once: ``prefill`` and the step.

Everything here is token ids and arrays; the text layer (``generation.TextStream``) knows
nothing of caches, and this module nothing of text.

* ``prefill``: a prompt into a cache in chunks, checkpointing each chunk's end (a later
  prompt that shares the prefix rewinds there).
* ``Picker``: one sequence's way of choosing its next token: logits processors over its
  history, normalized to log-probabilities, then the sampler (greedy when it has none); the
  log-probabilities it reports are the model's own, before the processors.
  ``pick`` is the step; ``pick_rows`` is the same for a batch, row by row, so a sequence picks
  the same tokens in a batch as alone; speculative decoding scores its drafts with ``score``.
* ``generate_step``: the plain decode loop, which queues step n+1's graph
  (``mx.async_eval``) before waiting on step n, so the device never idles on Python.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Iterator, Optional

import mlx.core as mx

from ..model import device
from ..model.cache import checkpoint
from .validate import check_token_ids, vocab_rows


def default_prefill_step() -> int:
    """Prompt tokens per prefill chunk: 128 on the CPU, 2048 on GPUs (see ``device.prefill_step``)."""
    return device.prefill_step()


def chunk_end(offset: int, start: int, end: int, step_size: int) -> int:
    """Where the prefill chunk from ``start`` ends, for a cache at ``offset``: at the next
    multiple of ``step_size`` in absolute positions, so a prompt is cut into the same chunks
    whatever prefix a cache held (a seeded reply is then the same hit or miss)."""
    return min(start + step_size - offset % step_size, end)


def prefill(model, tokens: mx.array, cache: list, step_size: Optional[int] = None) -> None:
    """Run ``tokens`` ``[L]`` through the model into ``cache``, in chunks of ``step_size`` on
    the absolute grid (``chunk_end``)."""
    step_size = step_size or default_prefill_step()
    start = 0
    while start < tokens.size:
        end = chunk_end(cache[0].offset if cache else 0, start, tokens.size, step_size)
        model(tokens[None, start:end], cache=cache)
        mx.eval([c.state for c in cache])
        checkpoint(cache)  # a later prompt that shares this prefix can rewind to here
        start = end


def normalize(logits: mx.array) -> mx.array:
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


@dataclass
class Picker:
    """How one sequence picks its tokens: ``processors`` see ``history`` (prompt + generated
    ids, kept only when there are processors), then ``sampler`` (None: argmax)."""

    sampler: Optional[object] = None
    processors: list = field(default_factory=list)
    history: Optional[mx.array] = None  # [T] uint32

    @property
    def trivial(self) -> bool:
        """Greedy with no processors: a batch of such rows picks with one argmax."""
        return self.sampler is None and not self.processors

    def score(self, logits: mx.array, history: Optional[mx.array] = None) -> mx.array:
        """Processed log-probabilities ``[1, V]`` of the row after ``history`` (default: ours)."""
        history = self.history if history is None else history
        for proc in self.processors:
            logits = proc(history, logits)
        return normalize(logits)

    def pick(self, logits: mx.array) -> tuple[mx.array, mx.array]:
        """The step: ``(token [1], logprobs [1, V])`` for ``logits`` ``[1, V]``; the token joins
        the history. The token is drawn from the processed distribution (penalties, bias,
        constraints, then the sampler's temperature); the logprobs returned, the ones reported,
        are the model's own (vLLM's default), which a grammar or a penalty does not change."""
        own = normalize(logits)
        logprobs = self.score(logits) if self.processors else own
        y = self.sampler(logprobs) if self.sampler is not None else mx.argmax(logprobs, axis=-1)
        if self.processors:
            self.history = mx.concatenate([self.history, y.astype(self.history.dtype)])
        return y, own


def pick_rows(pickers: list[Picker], logits: mx.array) -> tuple[mx.array, mx.array]:
    """Each row of ``logits`` ``[B, V]`` picked by its own picker -> ``(tokens [B], logprobs [B, V])``."""
    if all(p.trivial for p in pickers):
        logprobs = normalize(logits)
        return mx.argmax(logprobs, axis=-1), logprobs
    picked = [p.pick(logits[i : i + 1]) for i, p in enumerate(pickers)]
    return mx.concatenate([y for y, _ in picked]), mx.concatenate([lp for _, lp in picked])


def generate_step(prompt: mx.array, model, cache: list, *, max_tokens: int = 256, sampler=None,
                  logits_processors=(), prefill_step_size: Optional[int] = None,
                  stop_event: Optional[threading.Event] = None) -> Iterator[tuple[int, mx.array]]:
    """Yield ``(token, logprobs [V])`` for up to ``max_tokens`` new tokens after ``prompt`` ``[L]``.

    ``prompt`` must hold at least one token; everything before its last token is prefilled in
    chunks. ``logits_processors`` see the prompt and generated ids as history.
    """
    if prompt.size == 0:
        raise ValueError("prompt is empty: nothing to continue from")
    check_token_ids(prompt.tolist(), vocab_rows(model), "prompt token id")
    # Under mlx.launch every rank runs this loop; rank 0's prompt, tokens and stop decisions
    # are shared so the ranks stay in step (see model.pipeline); a stop_event then ends it a token
    # or two later than in one process (the flag travels with a token).
    shared = getattr(model, "shares_tokens", False)  # a pipeline stage (stand-in models lack it)
    if shared:
        prompt = model.share_prompt(prompt)
    picker = Picker(sampler, list(logits_processors), prompt)

    def stopped() -> bool:
        return stop_event is not None and stop_event.is_set()

    def step(tokens: mx.array):
        y, logprobs = picker.pick(model(tokens[None], cache=cache)[:, -1, :])
        stop = None
        if shared:
            y, stop = model.share_token(y, stopped())
            if picker.processors:  # the shared token replaces ours in the history
                picker.history = mx.concatenate([picker.history[:-1], y.astype(picker.history.dtype)])
        mx.async_eval(y, logprobs)
        return y, logprobs[0], stop

    prefill(model, prompt[:-1], cache, prefill_step_size)
    if max_tokens <= 0:
        return
    y, logprobs, stop = step(prompt[-1:])
    last_stop = None  # the shared stop flag of the token yielded last (already evaluated)
    for n in range(max_tokens):
        if (last_stop is not None and last_stop.item()) if shared else stopped():
            return
        if n + 1 < max_tokens:
            next_y, next_logprobs, next_stop = step(y)  # feeds y into the cache
        yield y.item(), logprobs
        last_stop = stop
        if n + 1 < max_tokens:
            y, logprobs, stop = next_y, next_logprobs, next_stop
