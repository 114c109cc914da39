"""Per-layer caches, owned by the caller (``model.make_cache()``), and how they rewind.

Two kinds, one per layer:

* ``KVCache`` (attention layers): keys and values ``[B, H_kv, T, D]`` in a buffer grown in
  steps of ``step`` positions, so decode writes in place instead of concatenating.
  ``trim(n)`` drops the last ``n`` positions (any ``n <= offset``).
* ``ConvCache`` (short-convolution layers): the last ``K - 1`` inputs of the causal
  depthwise convolution (the gated ``B * x`` values), ``[B, K - 1, D]``. That is the
  whole recurrent state: a position older than ``K - 1`` steps never matters again.

Rewinding (the contract speculative decoding and prompt reuse rely on). After
``trim(n)`` a cache is *exactly* what a fresh prefill of its first ``offset - n`` tokens
would have built, so the next forward pass gives the same numbers. A KV cache can go back
anywhere. A conv cache can go back to an offset it can rebuild the state for:

* anywhere in its recent window: each forward call's conv inputs and the state before
  that call are kept (references to arrays the forward pass made anyway, no copy) for
  the last ``ConvCache.window`` tokens, so the state at any of those offsets is the last
  ``K - 1`` inputs before it;
* any offset where ``checkpoint()`` saved the state (``prefill`` checkpoints the end of
  every chunk, ``PromptCache`` the end of each turn), and every multiple of
  ``ConvCache.block`` (256) a forward call passes: ``(K - 1) * D`` numbers per layer each,
  copied out of the call's arrays so a checkpoint never keeps a whole chunk alive. Block
  boundaries are what the disk prompt cache stores (``engine/disk_cache.py``), and they
  bound what an edit costs: at most the tokens after it plus one block.

``can_rewind(cache, n)`` says whether every layer can go back ``n`` tokens,
``reachable(cache, target)`` is the largest offset ``<= target`` that all can reach, and
``rewind(cache, n)`` does it. Both kinds track ``offset`` (tokens seen; attention reads it as
the RoPE position, and asks a KV cache for its mask with ``make_mask(L)``) and expose
``state`` / ``from_state`` for saving (``engine/cache_files.py`` writes and validates the
files; a loaded conv cache can go back to the checkpoints saved with it).
"""

from __future__ import annotations

from typing import Optional

import mlx.core as mx


class KVCache:
    step = 256
    shared = False  # keys/values view a larger buffer (a batch's row: batch_cache.extract)

    def __init__(self):
        self.keys: Optional[mx.array] = None
        self.values: Optional[mx.array] = None
        self.offset = 0

    def make_mask(self, L: int):
        """The attention mask for ``L`` new queries (what ``scaled_dot_product_attention``
        takes): "causal" aligns them with the last ``L`` keys; one query sees every key."""
        return "causal" if L > 1 else None

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        """Append ``keys``/``values`` ``[B, H_kv, L, D]``; return all cached so far."""
        prev, L = self.offset, keys.shape[2]
        if self.keys is None or prev + L > self.keys.shape[2]:
            B, H, _, D = keys.shape
            n_steps = (self.step + L - 1) // self.step
            grow_k = mx.zeros((B, H, n_steps * self.step, D), keys.dtype)
            grow_v = mx.zeros((B, H, n_steps * self.step, values.shape[3]), values.dtype)
            if self.keys is None:
                self.keys, self.values = grow_k, grow_v
            else:
                self.keys = mx.concatenate([self.keys[..., :prev, :], grow_k], axis=2)
                self.values = mx.concatenate([self.values[..., :prev, :], grow_v], axis=2)
        self.offset += L
        self.keys[..., prev : self.offset, :] = keys
        self.values[..., prev : self.offset, :] = values
        return self.keys[..., : self.offset, :], self.values[..., : self.offset, :]

    def reachable(self, target: int) -> int:
        return min(target, self.offset)

    def can_trim(self, n: int) -> bool:
        return 0 <= n <= self.offset

    def trim(self, n: int) -> int:
        n = min(self.offset, n)
        self.offset -= n
        return n

    def copy(self) -> "KVCache":
        c = KVCache()
        if self.keys is not None:
            c.keys, c.values = self.state
            c.offset = self.offset
        return c

    @property
    def state(self):
        if self.keys is None:
            return ()
        return self.keys[..., : self.offset, :], self.values[..., : self.offset, :]

    @classmethod
    def from_state(cls, state, offset: int) -> "KVCache":
        c = cls()
        if state:
            c.keys, c.values = state
            c.offset = offset
        return c

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes


class ConvCache:
    window = 16  # tokens of recent conv inputs kept for exact rewinds (>= draft length + 1)
    block = 256  # the state at every multiple of this offset is kept (see the module docstring)
    max_checkpoints = 1024
    shared = False  # conv_state views a larger buffer (a batch's row: batch_cache.extract)

    def __init__(self):
        self.conv_state: Optional[mx.array] = None  # [B, K - 1, D]; None: zeros (no input yet)
        self.offset = 0
        # (start offset, state before, conv inputs [B, L, D]) of the last calls, oldest first
        self.recent: list[tuple[int, Optional[mx.array], mx.array]] = []
        self.checkpoints: dict[int, Optional[mx.array]] = {}  # offset -> state there

    def update(self, inputs: mx.array, new_state: mx.array) -> None:
        """Record a forward call: its conv ``inputs`` ``[B, L, D]`` and the state after it."""
        L, W = inputs.shape[1], self.window
        before = self.conv_state
        start = self.offset
        self._checkpoint_blocks(before, inputs, new_state)
        if L > W:  # keep only the tail a rewind can reach
            K1 = new_state.shape[1]
            pad = before if before is not None else mx.zeros((inputs.shape[0], K1, inputs.shape[2]), inputs.dtype)
            before = mx.concatenate([pad, inputs[:, : L - W]], axis=1)[:, -K1:]
            inputs, start = inputs[:, L - W :], start + L - W
        self.recent.append((start, before, inputs))
        while len(self.recent) > 1 and self.offset + L - self.recent[1][0] >= W:
            self.recent.pop(0)
        self.conv_state = new_state
        self.offset += L

    def _checkpoint_blocks(self, before, inputs: mx.array, new_state: mx.array) -> None:
        """Keep the state at each block boundary in ``(offset, offset + L]``."""
        start, L, K1 = self.offset, inputs.shape[1], new_state.shape[1]
        for o in range((start // self.block + 1) * self.block, start + L + 1, self.block):
            j = o - start  # tokens of this call before the boundary
            if j == L:
                state = new_state
            elif j >= K1:
                state = inputs[:, j - K1 : j]
            else:
                pad = before if before is not None else mx.zeros((inputs.shape[0], K1, inputs.shape[2]), inputs.dtype)
                state = mx.concatenate([pad[:, j:], inputs[:, :j]], axis=1)
            self._keep(o, state)

    def _keep(self, offset: int, state: Optional[mx.array]) -> None:
        # A slice is a view of its whole chunk: a copy keeps only (K - 1) * D numbers alive, once
        # evaluated (unevaluated, it would hold its inputs, the chunk's arrays, as long as it is kept).
        kept = None if state is None else mx.contiguous(state)
        if kept is not None:
            mx.async_eval(kept)
        self.checkpoints[offset] = kept
        while len(self.checkpoints) > self.max_checkpoints:
            self.checkpoints.pop(min(self.checkpoints))  # the oldest prefix matters least

    def checkpoint(self) -> None:
        """Remember the state at the current offset, so a later ``trim`` can come back here."""
        self._keep(self.offset, self.conv_state)

    def reachable(self, target: int) -> int:
        """The largest offset ``<= target`` whose state this cache can rebuild."""
        target = min(target, self.offset)
        lo = self.recent[0][0] if self.recent else self.offset
        if target >= lo:
            return target
        return max([o for o in self.checkpoints if o <= target] + [0])  # 0: the empty state

    def can_trim(self, n: int) -> bool:
        return 0 <= n <= self.offset and self.reachable(self.offset - n) == self.offset - n

    def trim(self, n: int) -> int:
        if n <= 0:
            return 0
        if not self.can_trim(n):
            raise ValueError(f"this conv cache cannot rewind {n} tokens (see cache.py's contract)")
        target, K1 = self.offset - n, self.conv_state.shape[1]
        if self.recent and target >= self.recent[0][0]:
            while self.recent[-1][0] > target:
                self.recent.pop()
            start, before, inputs = self.recent.pop()
            kept = inputs[:, : target - start]
            if kept.shape[1] == 0:
                self.conv_state = before
            else:
                pad = before if before is not None else mx.zeros((kept.shape[0], K1, kept.shape[2]), kept.dtype)
                self.conv_state = mx.concatenate([pad, kept], axis=1)[:, -K1:]
                self.recent.append((start, before, kept))
        else:
            self.conv_state, self.recent = self.checkpoints.get(target), []  # target 0: None
        self.checkpoints = {o: s for o, s in self.checkpoints.items() if o <= target}
        self.offset = target
        return n

    def copy(self) -> "ConvCache":
        c = ConvCache()
        c.conv_state, c.offset = self.conv_state, self.offset  # arrays are immutable
        c.recent, c.checkpoints = list(self.recent), dict(self.checkpoints)
        return c

    @property
    def state(self):
        return () if self.conv_state is None else (self.conv_state,)

    @classmethod
    def from_state(cls, state, offset: int) -> "ConvCache":
        c = cls()
        if state:
            (c.conv_state,) = state
            c.offset = offset
        return c

    @property
    def nbytes(self) -> int:
        return 0 if self.conv_state is None else self.conv_state.nbytes


Cache = list  # one KVCache or ConvCache per layer


def copy_cache(cache: Cache) -> Cache:
    return [c.copy() for c in cache]


def checkpoint(cache: Cache) -> None:
    """Let every conv layer come back to the current offset later (KV layers always can)."""
    for c in cache:
        if isinstance(c, ConvCache):
            c.checkpoint()


def reachable(cache: Cache, target: int) -> int:
    """The largest offset ``<= target`` that every layer can rewind to."""
    while True:
        point = min(c.reachable(target) for c in cache)
        if point == target:
            return point
        target = point  # a layer could not reach target: try the next candidate down


def can_rewind(cache: Cache, n: int) -> bool:
    return bool(cache) and all(c.can_trim(n) for c in cache)


def rewind(cache: Cache, n: int) -> None:
    """Drop the last ``n`` tokens from every layer (check ``can_rewind`` first)."""
    if n and not can_rewind(cache, n):
        raise ValueError(f"the cache cannot rewind {n} tokens")
    for c in cache:
        c.trim(n)
