"""Speculative decoding: draft a few tokens cheaply, check them in one forward pass.

Each round drafts ``k`` tokens after the last one ``y`` (with a small draft model and its
own cache, or by prompt lookup: the tokens that followed the latest earlier occurrence of
the last n-gram), runs ``[y, d1..dk]`` through the target in one call, keeps the longest
prefix the target agrees with plus one token of its own, and rewinds both caches to that
prefix (``cache.py``'s contract makes the rewind exact, conv layers included). A round
therefore emits between 1 and ``k + 1`` tokens for one target pass.

* Greedy: a draft token is kept when it equals the target's argmax, so the output is the
  plain greedy output token for token.
* Sampling: the standard rule (Leviathan et al. / Chen et al.): keep ``d`` with probability
  ``min(1, p(d) / q(d))``, else draw from ``norm(max(p - q, 0))``; after ``k`` kept tokens draw
  a bonus token from ``p``. The output follows the target's distribution exactly; prompt
  lookup's draft distribution ``q`` is a point mass.
* Logits processors see, for position ``i`` of the block, the history plus ``d1..di``.
* Adaptive: ``k`` grows by one after a fully accepted round and falls to ``accepted + 1``
  after a rejection. Speculation only pays where a pass over ``k + 1`` tokens costs little
  more than one over a single token (GPUs; MLX's CPU quantized matmul costs grow with the
  rows), so the loop times both: when speculative rounds deliver tokens slower than the
  plain loop, or keep getting nothing accepted, or a lookup finds no n-gram, it falls back to
  the plain pipelined decode loop (``mx.async_eval``) for 8, 16, ... 256 tokens, and at least
  20 times the failed round's cost in plain steps, so a draft that never agrees costs <~5%.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Iterator, Optional, Protocol

import mlx.core as mx

from ..model.cache import ConvCache, can_rewind, rewind
from .decode import Picker, normalize, prefill
from .sample import make_sampler

MAX_DRAFT = ConvCache.window - 1  # a block of k + 1 tokens must fit the conv rewind window
MEASURE_SPEED = True  # back off when speculation is slower than plain decoding (timing-based)


def accept_drafts(p_logprobs: mx.array, drafts: list[int], q_logprobs: Optional[mx.array],
                  key: Optional[mx.array] = None) -> tuple[int, int]:
    """The speculative sampling rule for one block.

    ``p_logprobs`` ``[k + 1, V]``: the target's sampling distribution at each position;
    ``q_logprobs`` ``[k, V]``: the draft's (None: a point mass on each draft token).
    Returns (number of draft tokens kept, the token that follows them)."""
    k = len(drafts)
    k1, k2 = mx.random.split(key) if key is not None else (None, None)
    p = mx.exp(p_logprobs)
    idx = mx.array(drafts, dtype=mx.int32)[:, None]
    pd = mx.take_along_axis(p[:k], idx, axis=-1)[:, 0]
    qd = mx.take_along_axis(mx.exp(q_logprobs), idx, axis=-1)[:, 0] if q_logprobs is not None else 1.0
    u = mx.random.uniform(shape=(k,), key=k1)
    kept = (u * qd < pd).tolist() if k else []
    a = kept.index(False) if False in kept else k
    if a == k:
        row = p_logprobs[k]
    else:
        q = mx.exp(q_logprobs[a]) if q_logprobs is not None else (mx.arange(p.shape[-1]) == drafts[a])
        resid = mx.maximum(p[a] - q, 0)
        row = mx.where(resid.sum() > 0, mx.log(resid), p_logprobs[a])  # sum 0 only by rounding
    return a, mx.random.categorical(row, key=k2).item()


class Drafter(Protocol):
    """Where draft tokens come from (``PromptLookup``, ``DraftModel``). ``hist`` is the
    generation's history (prompt + emitted ids); the target cache holds all of it but the
    newest token."""

    def ready(self, hist: list[int]) -> bool:
        """Whether ``propose`` would offer anything now (checked while decoding plainly)."""

    def catch_up(self, hist: list[int]) -> None:
        """See what was decoded without drafting, before a round (outside its timing)."""

    def propose(self, hist: list[int], k: int, process, dist, keys) -> tuple[list[mx.array], Optional[mx.array]]:
        """Up to ``k`` drafts after ``hist`` (lazy ``[1]`` arrays) and their distributions
        ``[k, V]`` (None: point masses). ``process(logits, extra)``: the target's logits
        processors for the row after ``hist + extra``; ``dist``: the sampling distribution."""

    def kept(self, hist_len: int, k: int, a: int) -> None:
        """After a round of ``k`` drafts of which ``a`` were kept."""

    def sync(self, hist: list[int], n: int) -> None:
        """At the end: hold ``hist[:n]``, as the target's cache does."""


class PromptLookup:
    """Drafts the tokens that followed the most recent earlier occurrence of the longest
    suffix n-gram (``max_ngram`` down to ``min_ngram`` tokens) of the prompt and output."""

    def __init__(self, max_ngram: int = 3, min_ngram: int = 2):
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self.index: dict[tuple, int] = {}  # n-gram -> where its latest continuation starts
        self.indexed = 0  # n-grams ending before this position are in the index

    def _lookup(self, hist: list[int], k: int) -> list[int]:
        for end in range(self.indexed, len(hist) - 1):  # never the suffix itself
            for n in range(self.min_ngram, self.max_ngram + 1):
                if end + 1 >= n:
                    self.index[tuple(hist[end + 1 - n : end + 1])] = end + 1
        self.indexed = max(self.indexed, len(hist) - 1)
        for n in range(self.max_ngram, self.min_ngram - 1, -1):
            start = self.index.get(tuple(hist[-n:])) if len(hist) >= n else None
            if start is not None:
                # Copy what followed; past the end of the history, the match repeats with
                # period len(hist) - start (a loop continues as a loop).
                out = []
                for i in range(k):
                    j = start + i
                    out.append(hist[j] if j < len(hist) else out[j - len(hist)])
                return out
        return []

    def ready(self, hist: list[int]) -> bool:
        return bool(self._lookup(hist, 1))

    def propose(self, hist, k, process, dist, keys):
        return [mx.array([t]) for t in self._lookup(hist, k)], None

    def catch_up(self, hist: list[int]) -> None:
        pass

    def kept(self, hist_len: int, k: int, a: int) -> None:
        pass

    def sync(self, hist: list[int], n: int) -> None:
        pass


class DraftModel:
    """A small model with its own cache that holds ``hist[:fed]`` of this generation."""

    def __init__(self, model, cache, prefill_step_size=None):
        self.model, self.cache, self.fed, self.step = model, cache, 0, prefill_step_size

    def ready(self, hist) -> bool:
        return True

    def catch_up(self, hist: list[int]) -> None:
        """Prefill what the draft has not seen (tokens decoded without it), all but the last."""
        if len(hist) - 1 > self.fed:
            prefill(self.model, mx.array(hist[self.fed : -1], dtype=mx.uint32), self.cache, self.step)
            self.fed = len(hist) - 1

    def propose(self, hist, k, process, dist, keys):
        """``k`` draft tokens after ``hist`` (lazy ``[1]`` arrays) and their distributions."""
        self.catch_up(hist)
        logits = self.model(mx.array(hist[self.fed:], dtype=mx.uint32)[None], cache=self.cache)[0, -1:]
        self.fed = len(hist)
        drafts, qs = [], []
        for i in range(k):
            lp = process(logits, drafts)
            if dist is None:
                d = mx.argmax(lp, axis=-1)
            else:
                q = dist(lp)
                d = mx.random.categorical(q, key=next(keys))
                qs.append(q)
            drafts.append(d.astype(mx.uint32))
            if i + 1 < k:
                logits = self.model(d[None].astype(mx.uint32), cache=self.cache)[0, -1:]
        return drafts, (mx.concatenate(qs) if qs else None)

    def kept(self, hist_len: int, k: int, a: int) -> None:
        """After a block of ``k`` drafts of which ``a`` were kept (``hist_len``: history before it)."""
        fed = self.fed + k - 1  # y and d1..d(k-1) went in
        keep = hist_len + min(a, k - 1)
        rewind(self.cache, fed - keep)
        self.fed = keep

    def sync(self, hist: list[int], n: int) -> None:
        """Leave the draft cache holding ``hist[:n]``, as the target's does."""
        if self.fed > n and can_rewind(self.cache, self.fed - n):
            rewind(self.cache, self.fed - n)
            self.fed = n
        elif self.fed < n:
            prefill(self.model, mx.array(hist[self.fed : n], dtype=mx.uint32), self.cache, self.step)
            self.fed = n


def _keys(seed: Optional[int]):
    key = mx.random.key(seed) if seed is not None else None
    while True:
        if key is None:
            yield None
        else:
            key, sub = mx.random.split(key)
            yield sub


def verify(model, cache: list, y: int, drafts: list, q: Optional[mx.array], process, distribution, key
           ) -> tuple[int, list[int], mx.array]:
    """One verify round: ``[y, d1..dk]`` through the target in one call, the drafts kept by the
    rule (greedy: equal to the argmax; sampling: ``accept_drafts``), the cache rewound to
    what was kept. Returns (kept, the tokens to emit: kept drafts + one of the target's,
    the model's own log-probs ``[k + 1, V]`` to report; the processed ones only decide)."""
    k = len(drafts)
    block = mx.concatenate([mx.array([y], dtype=mx.uint32), *drafts])
    logits = model(block[None], cache=cache)[0]  # [k + 1, V]
    rows = mx.concatenate([process(logits[i : i + 1], drafts[:i]) for i in range(k + 1)])
    draft_ids = block[1:].tolist()
    if distribution is None:
        target = mx.argmax(rows, axis=-1).tolist()
        a = 0
        while a < k and draft_ids[a] == target[a]:
            a += 1
        last = target[a]
    else:
        a, last = accept_drafts(distribution(rows), draft_ids, q, key)
    rewind(cache, k - a)
    return a, draft_ids[:a] + [last], normalize(logits)


class Pace:
    """When to speculate, and how far (see the module docstring: adaptive ``k``, back-off).

    Seconds per token of recent plain steps and speculative rounds are compared by their
    minimum, which a busy machine's stalls do not move."""

    def __init__(self, k_max: int, measure: bool):
        self.k, self.measure, self.misses, self.cooldown = k_max, measure, 0, 0
        self.plain_left = 4 if measure else 0  # a few plain tokens first, to know their speed
        self.speed = {"plain": deque(maxlen=16), "spec": deque(maxlen=4)}

    def plain_token(self, seconds: Optional[float]) -> None:
        self.plain_left -= 1
        if seconds is not None:
            self.speed["plain"].append(seconds)

    def after_round(self, k_now: int, a: int, seconds: float) -> None:
        """Grow after a full block, shrink to what was kept, back off after misses or when
        the plain loop is faster."""
        self.speed["spec"].append(seconds / (a + 1))
        self.k = min(self.k + 1, MAX_DRAFT) if a == k_now else max(1, min(self.k, a + 1))
        self.misses = 0 if a else self.misses + 1
        plain = self.speed["plain"]
        slower = self.measure and plain and min(self.speed["spec"]) > min(plain)
        if self.misses >= 2 or slower:
            # Long enough that the next probe, if it fails like this one, costs < 5%.
            pay = int(20 * seconds / min(plain)) if plain else 0
            self.cooldown = min(max(8, 2 * self.cooldown, pay), 256)
            self.plain_left, self.misses = self.cooldown, 1  # after it, one more miss backs off again
        elif a:
            self.cooldown = 0


def speculative_generate_step(prompt: mx.array, model, cache: list, *, draft_model=None,
                              draft_cache: Optional[list] = None, prompt_lookup: bool = False,
                              num_draft_tokens: Optional[int] = None, max_tokens: int = 256,
                              sampler=None, distribution=None, logits_processors=(), seed=None,
                              prefill_step_size: Optional[int] = None,
                              stop_event: Optional[threading.Event] = None,
                              stats: Optional[dict] = None) -> Iterator[tuple[int, mx.array, bool]]:
    """Like ``generate_step`` but yields ``(token, logprobs [V], from_draft)``.

    ``distribution``: ``sample.make_distribution(...)`` for the same settings as ``sampler``
    (None: greedy). ``draft_cache``: the draft model's cache, holding what ``cache`` holds
    (None: a fresh one, which then sees only ``prompt``); it is left holding what ``cache``
    holds. ``stats`` gets ``drafted`` and ``accepted`` counts.
    """
    if prompt.size == 0:
        raise ValueError("prompt is empty: nothing to continue from")
    if (draft_model is None) == (not prompt_lookup):
        raise ValueError("pass either draft_model or prompt_lookup=True")
    k_max = num_draft_tokens or (3 if draft_model is not None else 8)
    if not 1 <= k_max <= MAX_DRAFT:
        raise ValueError(f"num_draft_tokens must be between 1 and {MAX_DRAFT}")
    if draft_model is not None and draft_model.args.vocab_size != model.args.vocab_size:
        raise ValueError(f"the draft model's vocabulary ({draft_model.args.vocab_size}) differs from the "
                         f"target's ({model.args.vocab_size}): use a draft with the same tokenizer")
    stats = stats if stats is not None else {}
    stats.update(drafted=0, accepted=0)
    if draft_model is not None:
        own = draft_cache is None
        drafter = DraftModel(draft_model, draft_model.make_cache() if own else draft_cache, prefill_step_size)
    else:
        own, drafter = True, PromptLookup()
    run = _Run(model, cache, prompt.tolist(), drafter, Picker(sampler or make_sampler(0.0), list(logits_processors)),
               distribution, _keys(seed), Pace(k_max, MEASURE_SPEED), stats)
    start = cache[0].offset
    prefill(model, prompt[:-1], cache, prefill_step_size)
    try:
        yield from run.tokens(max_tokens, stop_event)
    finally:
        # Leave the caches holding at most the history handed out, as generate_step does.
        held = cache[0].offset - start
        if held > len(run.hist) and can_rewind(cache, held - len(run.hist)):
            rewind(cache, held - len(run.hist))
        if not own:
            drafter.sync(run.hist, cache[0].offset - start)


class _Run:
    """One speculative generation: the history, and the loop alternating verify rounds with
    stretches of the plain pipelined loop."""

    def __init__(self, model, cache, hist, drafter: Drafter, picker: Picker, distribution, keys, pace: Pace,
                 stats: dict):
        self.model, self.cache, self.hist, self.drafter, self.picker = model, cache, hist, drafter, picker
        self.distribution, self.keys, self.pace, self.stats = distribution, keys, pace, stats

    def process(self, logits: mx.array, extra: list) -> mx.array:
        """Processed log-probs ``[1, V]`` of the row that follows ``hist + extra``."""
        h = None
        if self.picker.processors:
            h = mx.array(self.hist, dtype=mx.uint32)
            if extra:
                h = mx.concatenate([h, *[e.astype(mx.uint32) for e in extra]])
        return self.picker.score(logits, h)

    def tokens(self, max_tokens: int, stop_event) -> Iterator[tuple[int, mx.array, bool]]:
        n, pace = 0, self.pace
        while n < max_tokens:
            if stop_event is not None and stop_event.is_set():
                return
            drafts, q = [], None
            if pace.plain_left <= 0:
                self.drafter.catch_up(self.hist)  # outside the timed round: a one-off, not a per-round cost
            round_start = time.perf_counter()
            if pace.plain_left <= 0 and max_tokens - n > 1:
                drafts, q = self.drafter.propose(self.hist, min(pace.k, max_tokens - n - 1), self.process,
                                                 self.distribution, self.keys)
            if not drafts:  # the plain loop, until the drafter has something to offer again
                for out in self.plain(max_tokens - n, stop_event):
                    n += 1
                    yield out
                if stop_event is not None and stop_event.is_set():
                    return
                continue
            a, emitted, rows = verify(self.model, self.cache, self.hist[-1], drafts, q, self.process,
                                      self.distribution, next(self.keys))
            self.drafter.kept(len(self.hist), len(drafts), a)
            self.stats["drafted"] += len(drafts)
            self.stats["accepted"] += a
            for i, t in enumerate(emitted):
                n += 1
                self.hist.append(t)
                yield t, rows[i], i < a
            pace.after_round(len(drafts), a, time.perf_counter() - round_start)

    def plain(self, left: int, stop_event) -> Iterator[tuple[int, mx.array, bool]]:
        """Plain pipelined steps (``mx.async_eval``) after the newest token, at most ``left``,
        until the pace allows a draft and the drafter has one."""

        def step(tok: mx.array, extra: list):  # sampled from the processed, reported: the model's own
            logits = self.model(tok[None], cache=self.cache)[:, -1, :]
            return self.picker.sampler(self.process(logits, extra)).astype(mx.uint32), normalize(logits)

        tok, lp = step(mx.array([self.hist[-1]], dtype=mx.uint32), [])
        mx.async_eval(tok, lp)
        mark, n = None, 0
        while True:
            nxt = step(tok, [tok]) if n + 1 < left else None
            if nxt is not None:
                mx.async_eval(*nxt)
            t = tok.item()
            n += 1
            self.hist.append(t)
            yield t, lp[0], False
            now = time.perf_counter()
            self.pace.plain_token(None if mark is None else now - mark)  # steady state only
            mark = now
            if nxt is None or (stop_event is not None and stop_event.is_set()):
                return
            tok, lp = nxt
            if self.pace.plain_left <= 0 and self.drafter.ready(self.hist):
                break
        # ``tok`` came from the step that fed the newest token: it is the next one.
        t = tok.item()
        self.hist.append(t)
        yield t, lp[0], False
