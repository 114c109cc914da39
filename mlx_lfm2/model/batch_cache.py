"""Batched caches for continuous batching: one row per sequence; rows join and leave.

A sequence is prefilled alone into an ordinary cache (``model.make_cache()``, see cache.py),
so no padding ever enters a conv state or a RoPE position; its cache then joins the batch
as a new row (``join``). A finished row leaves (``leave``) without touching the others, and
can be taken back out as an ordinary cache (``extract``) for prompt reuse.

* ``BatchKVCache`` (attention layers): keys and values ``[B, H_kv, T, Dh]``. Every row's
  positions end at the shared write index ``idx``; row b's first ``left_padding[b]`` slots
  are unused, and ``make_mask`` hides them. Row b has seen ``idx - left_padding[b]`` tokens,
  which ``offset`` gives as an array ``[B]``: RoPE takes it as per-row positions.
* ``BatchConvCache`` (conv layers): ``conv_state`` ``[B, K-1, D]``; rows are independent.

Both keep per-row token counts on the host (lists / numpy), so bookkeeping never waits on
the device.
"""

from __future__ import annotations

from typing import Optional

import mlx.core as mx
import numpy as np

from .cache import ConvCache, KVCache


class BatchKVCache:
    step = 256

    def __init__(self):
        self.keys: Optional[mx.array] = None  # [B, H_kv, capacity, Dh]
        self.values: Optional[mx.array] = None
        self.idx = 0
        self.left_padding: list[int] = []

    @property
    def offset(self) -> mx.array:
        """Tokens seen per row ``[B]`` (the next token's RoPE position)."""
        return mx.array([self.idx - p for p in self.left_padding])

    @property
    def lengths(self) -> list[int]:
        return [self.idx - p for p in self.left_padding]

    def make_mask(self, L: int) -> mx.array:
        """Boolean mask ``[B, 1, L, T]`` for ``L`` new queries (call before ``update_and_fetch``):
        causal, and blind to each row's left padding."""
        T = self.idx + L
        keys = mx.arange(T)
        queries = mx.arange(self.idx, T)[:, None]  # [L, 1]
        causal = keys[None, :] <= queries  # [L, T]
        pad = keys[None, :] >= mx.array(self.left_padding)[:, None]  # [B, T]
        return (causal[None] & pad[:, None, :])[:, None]

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        """Append ``[B, H_kv, L, Dh]`` at ``idx`` for every row; return all positions so far."""
        prev, L = self.idx, keys.shape[2]
        if prev + L > self.keys.shape[2]:
            self._resize(prev + L)
        self.idx += L
        self.keys[..., prev : self.idx, :] = keys
        self.values[..., prev : self.idx, :] = values
        return self.keys[..., : self.idx, :], self.values[..., : self.idx, :]

    def _resize(self, need: int) -> None:
        cap = -(-need // self.step) * self.step
        def grow(a):
            B, H, _, D = a.shape
            return mx.concatenate([a[..., : self.idx, :], mx.zeros((B, H, cap - self.idx, D), a.dtype)], axis=2)
        self.keys, self.values = grow(self.keys), grow(self.values)

    def join(self, single: KVCache) -> None:
        """Add a row holding ``single``'s positions (an ordinary one-sequence cache)."""
        k, v = single.state  # [1, H_kv, n, Dh]
        n = k.shape[2]
        assert n > 0, "a sequence joins after at least one token"
        new_idx = max(self.idx, n)
        cap = max(-(-new_idx // self.step) * self.step, new_idx + 1)

        def place(a, used):  # a[..., :used, :] right-aligned at new_idx, zeros around
            B, H, _, D = a.shape
            return mx.concatenate([mx.zeros((B, H, new_idx - used, D), a.dtype), a[..., :used, :],
                                   mx.zeros((B, H, cap - new_idx, D), a.dtype)], axis=2)

        if self.keys is None:
            self.keys, self.values = place(k, n), place(v, n)
        else:
            self.keys = mx.concatenate([place(self.keys, self.idx), place(k, n)])
            self.values = mx.concatenate([place(self.values, self.idx), place(v, n)])
        shift = new_idx - self.idx
        self.left_padding = [p + shift for p in self.left_padding] + [new_idx - n]
        self.idx = new_idx

    def leave(self, keep: list[int]) -> None:
        """Keep only the rows ``keep`` (in that order); drop padding no row needs any more."""
        self.left_padding = [self.left_padding[i] for i in keep]
        if not keep:
            self.__init__()
            return
        trim = min(self.left_padding)
        rows = mx.array(keep)
        self.keys, self.values = self.keys[rows, :, trim:], self.values[rows, :, trim:]
        self.left_padding = [p - trim for p in self.left_padding]
        self.idx -= trim

    def extract(self, i: int) -> KVCache:
        """Row ``i`` as an ordinary cache."""
        p = self.left_padding[i]
        c = KVCache.from_state((self.keys[i : i + 1, :, p : self.idx], self.values[i : i + 1, :, p : self.idx]),
                               self.idx - p)
        c.shared = True  # a view: it keeps the whole batch's buffer alive
        return c

    @property
    def state(self):
        return () if self.keys is None else (self.keys, self.values)

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes


class BatchConvCache:
    def __init__(self):
        self.conv_state: Optional[mx.array] = None  # [B, K-1, D]
        self.offset = np.zeros(0, dtype=np.int64)  # host-side: ShortConv's `offset += L` stays free
        self.checkpoints: list[dict] = []  # per row: its ConvCache checkpoints from before it joined

    @property
    def lengths(self) -> list[int]:
        return self.offset.tolist()

    def update(self, inputs: mx.array, new_state: mx.array) -> None:
        """A forward call (``ShortConv``): the new state; batched rows are not rewound."""
        self.conv_state = new_state
        self.offset += inputs.shape[1]

    def join(self, single: ConvCache) -> None:
        assert single.conv_state is not None, "a sequence joins after at least one token"
        s = single.conv_state
        self.conv_state = s if self.conv_state is None else mx.concatenate([self.conv_state, s])
        self.offset = np.append(self.offset, single.offset)
        self.checkpoints.append(dict(single.checkpoints))  # where its prefill can be rewound to

    def leave(self, keep: list[int]) -> None:
        self.offset = self.offset[keep]
        self.conv_state = self.conv_state[mx.array(keep)] if keep else None
        self.checkpoints = [self.checkpoints[i] for i in keep]

    def extract(self, i: int) -> ConvCache:
        c = ConvCache.from_state((self.conv_state[i : i + 1],), int(self.offset[i]))
        c.shared = True  # a view of the batch's state buffer, as KVCache's rows are
        c.checkpoints = dict(self.checkpoints[i])
        return c

    @property
    def state(self):
        return () if self.conv_state is None else (self.conv_state,)

    @property
    def nbytes(self) -> int:
        return 0 if self.conv_state is None else self.conv_state.nbytes


def make_batch_cache(single: list) -> list:
    """An empty batched cache with the layout of the one-sequence cache ``single``."""
    return [BatchKVCache() if isinstance(c, KVCache) else BatchConvCache() for c in single]


def join(batch: list, single: list) -> None:
    for b, c in zip(batch, single):
        b.join(c)


def leave(batch: list, keep: list[int]) -> None:
    for b in batch:
        b.leave(keep)


def extract(batch: list, i: int) -> list:
    return [b.extract(i) for b in batch]
