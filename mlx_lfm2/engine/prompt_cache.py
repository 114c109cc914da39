"""Prompt reuse: ``PromptCache`` (one cache and the text it consumed) and ``PromptCacheStore``
(an LRU of them), used by ``session.Chat`` and the server's scheduler.

``PromptCache`` pairs a model cache with the exact prompt text it has consumed. A new
prompt that extends that text costs only its suffix; one that does not (a regenerated
reply, an edited or dropped message) rewinds the cache to the longest common prefix it
can reach (``cache.py``: anywhere in the last few tokens, or a checkpoint such as the end
of a prompt or of a turn) and prefills the rest. Matching on rendered text rather than
token ids keeps this exact even when a sampled reply is not tokenized the way its
re-rendered text would be.

``PromptCacheStore`` keeps up to ``entries`` of them, keyed by ``(namespace, text)``:

* ``take(text, namespace)``: a copy of the entry sharing the longest prefix with ``text``
  (copies are cheap: MLX arrays are immutable), or a fresh cache; ``PromptCache.new_tokens``
  then extends or rewinds it. The caller owns the copy: one that fails midway is dropped.
* ``keep(pc, namespace)``: after generation, store a cache whose tokens are all consumed;
  the least recently used entry beyond ``entries`` goes.
* seeded requests (``grid``): a reply drawn with a seed must not depend on whether its prompt
  was cached, and a row's numbers depend on the shape of the forward that computed it (a
  prefill chunk, a decode step). So ``chunked`` records how many leading tokens were computed
  by whole prefill chunks on the absolute grid (``decode.prefill``: chunk ends at multiples of
  the prefill step), and a seeded request reuses only such a prefix, cut at a grid point:
  it then prefills exactly the chunks a cold run would, and its logits are bit for bit a cold
  run's. Unseeded requests reuse as much as they can.
* ``namespace``: what else the cache depends on besides the text (an adapter, say): entries
  of another namespace are never reused. "" is the base model.
* ``lower``: an optional slower tier under the memory (a disk cache, ``disk_cache.DiskTier``),
  any object with ``lookup(namespace, text, longer_than) -> PromptCache | None`` (its entry
  sharing the longest prefix with ``text``, if longer than the ``longer_than`` characters
  memory shares: a tier reads nothing that would not beat it) and ``store(namespace, pc)``
  (called for each kept entry).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Optional, Protocol

import mlx.core as mx

from ..model.cache import ConvCache, KVCache, checkpoint, copy_cache, reachable, rewind
from ..text.tokenizer import plain_spans
from .decode import default_prefill_step, prefill


class PromptCache:
    """A model cache, the token ids it has consumed, and the prompt text they spell."""

    def __init__(self, model, cache=None, text: str = "", tokens=(), draft_model=None, draft_cache=None,
                 chunked: int = 0):
        self.model, self.draft_model = model, draft_model
        self.cache = cache if cache is not None else model.make_cache()
        self.text, self.tokens = text, list(tokens)
        self.chunked = chunked  # leading tokens computed by whole prefill chunks on the grid (module docstring)
        # A draft model's cache (speculative decoding) holds what ``cache`` holds.
        self.draft_cache = draft_cache
        if draft_model is not None and (draft_cache is None or draft_cache[0].offset != self.offset):
            self.draft_cache = draft_model.make_cache()
            if self.tokens:
                prefill(draft_model, mx.array(self.tokens, dtype=mx.uint32), self.draft_cache)

    @property
    def offset(self) -> int:
        return self.cache[0].offset if self.cache else 0

    def copy(self) -> "PromptCache":
        draft = copy_cache(self.draft_cache) if self.draft_cache is not None else None
        return PromptCache(self.model, copy_cache(self.cache), self.text, self.tokens, self.draft_model, draft,
                           self.chunked)

    @property
    def _caches(self) -> list:
        return self.cache + (self.draft_cache or [])

    def reusable(self, tokenizer, prompt_text: str, at_most: Optional[int] = None, grid: Optional[int] = None) -> int:
        """How many cached tokens ``prompt_text`` could reuse (what ``new_tokens`` keeps), at
        most ``at_most``; ``grid`` (a seeded request): a multiple of it, within ``chunked``.

        A shared prefix must agree on the untrusted-content spans too: the same characters
        typed by a user and written by the template are different tokens.
        """
        if self.offset != len(self.tokens) or not self.tokens or (at_most is not None and at_most <= 0):
            return 0
        cap = len(self.tokens) if at_most is None else min(at_most, len(self.tokens))
        if grid:
            cap = min(cap, self.chunked)

        def down(n: int) -> int:  # the nearest offset <= n every layer reaches (on the grid, if one)
            n = reachable(self._caches, n - n % grid if grid else n)
            while grid and n % grid:
                n = reachable(self._caches, n - n % grid)
            return n

        def same(n: int) -> bool:  # the first n characters: same text, same untrusted spans
            return prompt_text.startswith(self.text[:n]) and plain_spans(prompt_text[:n]) == plain_spans(self.text[:n])

        if cap == len(self.tokens) and len(prompt_text) > len(self.text) and same(len(self.text)):
            return len(self.tokens)

        def fits(p: int) -> bool:
            prefix = tokenizer.decode(self.tokens[:p])
            return len(prefix) < len(prompt_text) and self.text.startswith(prefix) and same(len(prefix))

        # The longest token prefix that spells a proper prefix of the prompt (binary search),
        # then the nearest offset below it that every layer can rewind to.
        lo, hi = 0, cap
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
        p = down(lo)
        while p > 0 and not fits(p):  # a split multi-byte character: step back
            p = down(p - 1)
        return p

    def new_tokens(self, tokenizer, prompt_text: str, ids: Optional[list[int]] = None,
                   at_most: Optional[int] = None, grid: Optional[int] = None) -> list[int]:
        """Ids of the part of ``prompt_text`` not yet in the cache: the cache is extended,
        rewound to the longest common prefix it can reach (keeping at most ``at_most``
        tokens), or reset. ``ids``: the whole
        prompt's ids, if already known (their tail is used when the kept tokens start them,
        so the prompt is fed as a cold run would feed it). ``grid``: see ``reusable``."""
        self.trim(tokenizer, prompt_text, at_most, grid)
        if ids is not None and list(ids[: len(self.tokens)]) == self.tokens:
            return list(ids[len(self.tokens):])
        return tokenizer.encode(prompt_text[len(self.text):], add_special_tokens=False)

    def trim(self, tokenizer, prompt_text: str, at_most: Optional[int] = None, grid: Optional[int] = None) -> None:
        """Keep only what ``prompt_text`` can reuse (at most ``at_most`` tokens): rewind to the
        longest common prefix the cache can reach, or reset."""
        keep = self.reusable(tokenizer, prompt_text, at_most, grid)
        self.chunked = min(self.chunked, keep)
        if keep == 0:
            self.cache, self.text, self.tokens = self.model.make_cache(), "", []
            if self.draft_model is not None:
                self.draft_cache = self.draft_model.make_cache()
        elif keep < len(self.tokens):
            rewind(self.cache, self.offset - keep)
            if self.draft_cache is not None:
                rewind(self.draft_cache, self.draft_cache[0].offset - keep)
            self.tokens = self.tokens[:keep]
            self.text = prompt_text[: len(tokenizer.decode(self.tokens))]  # keeps the spans

    def commit(self, tokenizer, prompt_text: str, prompt_ids: list[int], generated: list[int]) -> None:
        """After generation: record what the cache consumed (the prompt, and most of the reply)."""
        held, step = len(self.tokens), default_prefill_step()
        if held <= self.chunked and held % step == 0:  # the prompt's prefill started on the grid
            self.chunked = held + (len(prompt_ids) - 1) // step * step  # its whole chunks
        else:
            self.chunked = min(self.chunked, held - held % step)
        fed = (list(prompt_ids) + list(generated))[: self.offset - len(self.tokens)]
        self.tokens += fed
        self.text = prompt_text + tokenizer.decode(fed[len(prompt_ids):])
        checkpoint(self._caches)  # the end of this turn: where a later edit can come back to


def shared_chars(a: str, b: str) -> int:
    """The length of the common prefix of ``a`` and ``b``, at C speed (a prompt is ~100k
    characters; ``os.path.commonprefix`` compares them one by one in Python)."""
    a, b = str(a), str(b)
    if b.startswith(a):
        return len(a)
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:  # the longest equal prefix, by halving
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if a[:mid] == b[:mid] else (lo, mid - 1)
    return lo


class CacheTier(Protocol):
    """A tier under ``PromptCacheStore`` (see the module docstring)."""

    def lookup(self, namespace: str, text: str, longer_than: int = 0,
               ids: Optional[list] = None) -> Optional[PromptCache]: ...

    def store(self, namespace: str, pc: PromptCache) -> Optional[list]: ...


def entry_bytes(pc: PromptCache) -> int:
    """What a kept entry holds: its KV buffers, conv states, checkpoints and recent conv inputs
    (its draft model's too)."""
    total = 0
    for c in pc._caches:
        if isinstance(c, KVCache):
            total += c.nbytes
        else:
            arrays = [c.conv_state, *c.checkpoints.values(), *(a for _, b, x in c.recent for a in (b, x))]
            total += sum(a.nbytes for a in arrays if a is not None)
    return total


def _owned(cache: list) -> None:
    """Each layer that views a larger buffer (``shared``: a row taken out of a batch,
    model/batch_cache.py ``extract``, would keep the whole batch's buffer alive) copied out of
    it; a cache holding its own buffer is kept as it is."""
    for c in cache or []:
        if not getattr(c, "shared", False):
            continue
        if isinstance(c, KVCache) and c.keys is not None:
            c.keys, c.values = mx.contiguous(c.keys[..., : c.offset, :]), mx.contiguous(c.values[..., : c.offset, :])
        elif isinstance(c, ConvCache) and c.conv_state is not None:
            c.conv_state = mx.contiguous(c.conv_state)  # a row of [B, K-1, D]: copied out (MLX copies a view)
        c.shared = False
    mx.eval([c.state for c in cache or []])


class PromptCacheStore:
    """An LRU of ``PromptCache`` keyed by ``(namespace, text)`` (see the module docstring).

    ``nbytes`` is what its entries hold (``entry_bytes``): the server counts it in its memory
    budget and drops entries (``shrink``, least recently used first) to make room for requests
    and models. ``shrink`` may be called from any thread (a lock guards the entries)."""

    def __init__(self, model, entries: int = 8, draft_model=None, lower: Optional[CacheTier] = None):
        self.model, self.entries, self.draft_model, self.lower = model, entries, draft_model, lower
        self._entries: OrderedDict[tuple[str, str], PromptCache] = OrderedDict()
        self._bytes: dict[tuple[str, str], int] = {}
        self.nbytes = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def fresh(self) -> PromptCache:
        return PromptCache(self.model, draft_model=self.draft_model)

    def lookup(self, text: str, namespace: str = "", ids: Optional[list] = None) -> tuple[Optional[PromptCache], int]:
        """The entry sharing the longest prefix with ``text`` (not a copy) and that prefix's
        length in characters; (None, 0) when none shares any."""
        best, shared = None, 0
        with self._lock:
            items = list(self._entries.items())
        for (ns, key), pc in items:
            n = shared_chars(key, text) if ns == namespace else 0
            if n > shared:
                best, shared = pc, n
        if self.lower is not None:
            below = self.lower.lookup(namespace, text, shared, ids=ids)
            n = shared_chars(below.text, text) if below is not None else 0
            if n > shared:
                best, shared = below, n
        return best, shared

    def take(self, text: str, namespace: str = "", ids: Optional[list] = None) -> PromptCache:
        """A copy of the best entry for ``text`` (see ``lookup``), or a fresh cache
        (``ids``: ``text``'s ids, when known: a lower tier need not encode it again)."""
        best, _ = self.lookup(text, namespace, ids)
        if best is None:
            return self.fresh()
        key = (namespace, str(best.text))
        with self._lock:
            if self._entries.get(key) is best:
                self._entries.move_to_end(key)
        return best.copy()

    def keep(self, pc: PromptCache, namespace: str = "") -> list:
        """Store ``pc`` if it is whole (every token it holds consumed and recorded); returns
        the token ranges ``(start, end)`` the lower tier wrote for it (new disk blocks)."""
        if pc.offset != len(pc.tokens) or not pc.text:
            return []
        _owned(pc.cache)
        _owned(pc.draft_cache)
        key = (namespace, str(pc.text))
        with self._lock:
            self._drop(key)
            self._entries[key], self._bytes[key] = pc, entry_bytes(pc)
            self.nbytes += self._bytes[key]
            while len(self._entries) > self.entries:
                self._drop(next(iter(self._entries)))
        return (self.lower.store(namespace, pc) or []) if self.lower is not None else []

    def _drop(self, key) -> None:
        if self._entries.pop(key, None) is not None:
            self.nbytes -= self._bytes.pop(key)

    def shrink(self, to: int) -> int:
        """Drop the least recently used entries until at most ``to`` bytes are kept -> bytes freed
        (their prefixes stay in the lower tier, if any)."""
        with self._lock:
            before = self.nbytes
            while self._entries and self.nbytes > to:
                self._drop(next(iter(self._entries)))
            return before - self.nbytes

    def latest(self) -> Optional[PromptCache]:
        """The entry kept or taken last, if any."""
        with self._lock:
            return next(reversed(self._entries.values()), None)

    def latest_namespace(self) -> str:
        """The namespace ``latest()`` is filed under ("" when the store is empty)."""
        with self._lock:
            return next(reversed(self._entries), ("", ""))[0]

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes.clear()
            self.nbytes = 0
