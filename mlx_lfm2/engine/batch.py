"""Continuous batching: many sequences decode in one forward; they join and leave at any step.

* ``BatchGenerator`` (tokens only, the unit a server drives): ``insert`` a prompt with its own
  sampler, logits processors, stop ids and limit -> uid; each ``step()`` runs one forward of
  every decoding row (one token each) and then at most one prefill chunk of the oldest
  waiting prompt, so a newcomer's prefill is interleaved with the others' decode steps
  instead of stalling them. ``remove(uid)`` drops a row at any time; ``park(uid)`` takes a
  decoding row out of the forward (its reader is behind) and ``unpark(uid)`` puts it back,
  to decode on exactly as if it had never left. A row may name a resident adapter
  (``model.lora_rows``): rows on different adapters share each forward.
* ``batch_generate`` (text): many prompts to many completions, in prompt order, with stats,
  each built by the request builder (``request.build_request``) and read through its own
  ``generation.TextStream``.

Each prompt is prefilled alone into an ordinary cache, exactly as ``generate_step`` does
(chunks of ``prompt[:-1]``, then the last token), and only then joins the batched cache
(model/batch_cache.py) as a row. So padding never reaches a conv state, and a sequence
decodes the same tokens in a batch as alone. A prompt may come with a cache that already
holds its prefix (prompt reuse); a finished row hands its cache back as an ordinary one.

Decode is double-buffered as in ``generate_step``: ``step()`` queues the next forward on the
tokens it is about to return, then reads them. A row that finishes has had its last token
fed already; that forward's output for it is simply dropped.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import mlx.core as mx

from ..model import batch_cache
from ..model.cache import checkpoint
from ..model.lora_rows import select
from .decode import Picker, chunk_end, default_prefill_step, pick_rows
from .generation import Prompt, TextStream, encode_prompt
from .request import Request, build_request
from .sample import SamplingParams
from .validate import check_token_ids, vocab_rows


@dataclass
class BatchToken:
    uid: int
    token: int
    logprobs: mx.array  # [V]
    finish_reason: Optional[str]  # "stop" (a stop id), "length", or None while generating
    cache: Optional[list] = None  # on a row's last token: its own cache, ordinary (for reuse)


@dataclass
class _Seq:
    uid: int
    prompt: list[int]
    max_tokens: int
    picker: Picker  # its sampler, processors and history (prompt + generated ids)
    stop_tokens: frozenset
    cache: Optional[list]  # the ordinary cache while prefilling
    adapter: Optional[str] = None  # its resident adapter (model.lora_rows), None: the base
    pos: int = 0  # prompt tokens prefilled
    n: int = 0  # tokens returned


class BatchGenerator:
    """Token-level continuous batching over one model (see the module docstring)."""

    def __init__(self, model, max_batch: int = 8, prefill_step_size: Optional[int] = None):
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self.model, self.max_batch = model, max_batch
        self.prefill_step_size = prefill_step_size or default_prefill_step()
        self.waiting: deque[_Seq] = deque()
        self.prefilling: Optional[_Seq] = None
        self.rows: list[_Seq] = []
        self.cache: Optional[list] = None  # batched, one row per entry of self.rows
        self.y: Optional[mx.array] = None  # [B] sampled, not yet returned: the next forward's input
        self.logprobs: Optional[mx.array] = None  # [B, V]
        self.parked: dict = {}  # uid -> (_Seq holding its ordinary cache, its next y [1], logprobs [1, V])
        self._next_uid = 0

    def insert(self, prompt: Sequence[int], *, max_tokens: int = 256, sampler=None, logits_processors=(),
               stop_tokens=(), cache: Optional[list] = None, adapter: Optional[str] = None) -> int:
        """Queue a prompt (ids; with ``cache``, the ids that follow what it holds) -> uid.
        ``adapter``: a resident adapter's name (``model.lora_rows``; the row decodes with it in
        the same forward as rows on other adapters), None for the base."""
        prompt = check_token_ids(prompt, vocab_rows(self.model), "prompt token id")
        if not prompt:
            raise ValueError("prompt is empty: nothing to continue from")
        if max_tokens < 1:
            raise ValueError("max_tokens must be >= 1")
        select(self.model, [adapter])  # a name that is not loaded fails here, not mid-batch
        uid, self._next_uid = self._next_uid, self._next_uid + 1
        picker = Picker(sampler, list(logits_processors), mx.array(prompt, dtype=mx.uint32))
        self.waiting.append(_Seq(uid, prompt, max_tokens, picker, frozenset(stop_tokens),
                                 cache if cache is not None else self.model.make_cache(), adapter))
        return uid

    def add(self, request: Request, cache: Optional[list] = None, adapter: Optional[str] = None) -> int:
        """Queue a built request (``request.build_request``) -> uid."""
        return self.insert(request.ids, max_tokens=request.max_tokens, sampler=request.sampler,
                           logits_processors=request.processors, stop_tokens=request.stop_tokens, cache=cache,
                           adapter=adapter)

    def remove(self, uid: int) -> Optional[list]:
        """Stop ``uid`` wherever it is; a decoding row returns its cache (ordinary), else None."""
        if uid in self.parked:
            return self.parked.pop(uid)[0].cache
        for i, s in enumerate(self.rows):
            if s.uid == uid:
                cache = batch_cache.extract(self.cache, i)
                self._keep([j for j in range(len(self.rows)) if j != i])
                return cache
        if self.prefilling is not None and self.prefilling.uid == uid:
            self.prefilling = None  # its cache may be mid-chunk: not reusable
        self.waiting = deque(s for s in self.waiting if s.uid != uid)
        return None

    def park(self, uid: int) -> bool:
        """Take decoding row ``uid`` out of the forward until ``unpark``; the others go on.
        It keeps its cache (ordinary) and the token already sampled for it. False: not decoding."""
        for i, s in enumerate(self.rows):
            if s.uid == uid:
                s.cache = batch_cache.extract(self.cache, i)
                self.parked[uid] = (s, self.y[i : i + 1], self.logprobs[i : i + 1])
                self._keep([j for j in range(len(self.rows)) if j != i])
                return True
        return False

    def unpark(self, uid: int) -> None:
        """Row ``uid`` rejoins the forward where it left off."""
        s, y, logprobs = self.parked.pop(uid)
        self._join(s, y, logprobs)

    def _join(self, s: _Seq, y: mx.array, logprobs: mx.array) -> None:
        if self.cache is None:
            self.cache = batch_cache.make_batch_cache(s.cache)
        batch_cache.join(self.cache, s.cache)
        self.rows.append(s)
        self.y = y if self.y is None else mx.concatenate([self.y, y])
        self.logprobs = logprobs if self.logprobs is None else mx.concatenate([self.logprobs, logprobs])
        mx.async_eval(self.y, self.logprobs)
        s.cache = None

    @property
    def status(self) -> dict:
        return {"decoding": len(self.rows), "prefilling": int(self.prefilling is not None),
                "waiting": len(self.waiting), "parked": len(self.parked), "max_batch": self.max_batch}

    def __len__(self) -> int:
        return len(self.rows) + (self.prefilling is not None) + len(self.waiting) + len(self.parked)

    def step(self) -> list[BatchToken]:
        """One token for every decoding row (in join order), then one prefill chunk."""
        out = []
        if self.rows:
            y, logprobs = self.y, self.logprobs
            select(self.model, [s.adapter for s in self.rows])
            logits = self.model(y[:, None], cache=self.cache)[:, -1, :]
            self.y, self.logprobs = pick_rows([s.picker for s in self.rows], logits)
            mx.async_eval(self.y, self.logprobs)
            keep = []
            for i, (s, t) in enumerate(zip(self.rows, y.tolist())):
                s.n += 1
                finish = "stop" if t in s.stop_tokens else "length" if s.n >= s.max_tokens else None
                out.append(BatchToken(s.uid, t, logprobs[i], finish))
                if finish is None:
                    keep.append(i)
                else:
                    out[-1].cache = batch_cache.extract(self.cache, i)
            if len(keep) < len(self.rows):
                self._keep(keep)
        self._prefill()
        return out

    def _keep(self, keep: list[int]) -> None:
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            self.cache = self.y = self.logprobs = None
            return
        batch_cache.leave(self.cache, keep)
        rows = mx.array(keep)
        self.y, self.logprobs = self.y[rows], self.logprobs[rows]

    def _prefill(self) -> None:
        if self.prefilling is None:
            if not self.waiting or len(self.rows) + len(self.parked) >= self.max_batch:
                return
            self.prefilling = self.waiting.popleft()
        s = self.prefilling
        select(self.model, [s.adapter])
        body = len(s.prompt) - 1
        if s.pos < body:
            end = chunk_end(s.cache[0].offset if s.cache else 0, s.pos, body, self.prefill_step_size)
            self.model(mx.array(s.prompt[s.pos : end], dtype=mx.uint32)[None], cache=s.cache)
            mx.eval([c.state for c in s.cache])
            checkpoint(s.cache)  # as ``prefill`` does: a later prompt sharing this prefix rewinds here
            s.pos = end
            if s.pos < body:
                return  # the next chunk waits for the next step
        logits = self.model(mx.array(s.prompt[-1:], dtype=mx.uint32)[None], cache=s.cache)[:, -1, :]
        y, logprobs = s.picker.pick(logits)
        self._join(s, y, logprobs)
        self.prefilling = None


@dataclass
class BatchResponse:
    texts: list[str]  # in prompt order
    finish_reasons: list[str]
    stats: list[dict]  # per prompt: prompt_tokens, generation_tokens, ttft_s, generation_tps
    generation_tokens: int  # all prompts together
    generation_tps: float  # all prompts' tokens over the whole run's wall time
    peak_memory: float  # GB


def batch_generate(model, tokenizer, prompts: Sequence[Prompt], max_tokens: Union[int, Sequence[int]] = 256, *,
                   max_batch: Optional[int] = None, sampling: Optional[SamplingParams] = None,
                   prefill_step_size: Optional[int] = None, tools=None, verbose: bool = False,
                   adapters: Optional[Sequence[Optional[str]]] = None, **settings) -> BatchResponse:
    """Complete every prompt (text, ids or chat messages), decoding them together in batches
    of up to ``max_batch`` (default: all). ``sampling`` / ``settings``: as for
    ``stream_generate``, the same for every prompt (each prompt gets its own sampler: a
    ``seed`` gives each the same draws as alone). Greedy when ``temperature`` is left out.
    ``adapters``: per prompt, a resident adapter's name or None (the base)."""
    params = (sampling or SamplingParams()).replace(**settings)
    ids = [encode_prompt(tokenizer, p, tools) for p in prompts]
    limits = [max_tokens] * len(ids) if isinstance(max_tokens, int) else list(max_tokens)
    if len(limits) != len(ids):
        raise ValueError(f"{len(limits)} max_tokens for {len(ids)} prompts")
    adapters = list(adapters) if adapters is not None else [None] * len(ids)
    if len(adapters) != len(ids):
        raise ValueError(f"{len(adapters)} adapters for {len(ids)} prompts")
    requests = [build_request(model, tokenizer, p, params.replace(max_tokens=n)) for p, n in zip(ids, limits)]
    gen = BatchGenerator(model, max_batch or max(1, len(ids)), prefill_step_size)
    streams, by_uid = [], {}
    mx.reset_peak_memory()
    tic = time.perf_counter()
    for req, adapter in zip(requests, adapters):
        stream = TextStream(tokenizer, params.stop, len(req.ids))
        streams.append(stream)
        if req.max_tokens == 0:
            stream.end("length")
        else:
            by_uid[gen.add(req, adapter=adapter)] = stream
    while by_uid:
        for t in gen.step():
            stream = by_uid[t.uid]
            for r in stream.feed(t.token, t.logprobs, t.finish_reason):
                if r.finish_reason:
                    if t.finish_reason is None:
                        gen.remove(t.uid)  # a stop string ended it
                    del by_uid[t.uid]
    wall = time.perf_counter() - tic
    total = sum(s.n for s in streams)
    stats = [{"prompt_tokens": s.prompt_tokens, "generation_tokens": s.n, "ttft_s": s.ttft,
              "generation_tps": s.generation_tps} for s in streams]
    out = BatchResponse([s.text for s in streams], [s.finish_reason for s in streams], stats, total,
                        total / max(wall, 1e-9), mx.get_peak_memory() / 1e9)
    if verbose:
        print(f"{len(streams)} prompts, {total} tokens, {out.generation_tps:.1f} tok/s together, "
              f"peak memory {out.peak_memory:.2f} GB")
    return out
