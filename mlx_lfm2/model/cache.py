"""Per-layer caches, owned by the caller (``model.make_cache()``).

Two kinds, one per layer:

* ``KVCache`` (attention layers): keys and values ``[B, H_kv, T, D]`` in a buffer grown in
  steps of ``step`` positions, so decode writes in place instead of concatenating.
  ``trim(n)`` drops the last ``n`` positions.
* ``ConvCache`` (short-convolution layers): the last ``L - 1`` inputs of the causal
  depthwise convolution (the gated ``B * x`` values), ``[B, L - 1, D]``. That is the
  whole recurrent state: a position older than ``L - 1`` steps never matters again,
  which is also why it cannot be rewound. To go back, keep a ``copy()`` from before.

Both track ``offset`` (tokens seen) and expose ``state`` / ``from_state`` for saving.
"""

from __future__ import annotations

from typing import Optional

import mlx.core as mx


class KVCache:
    step = 256

    def __init__(self):
        self.keys: Optional[mx.array] = None
        self.values: Optional[mx.array] = None
        self.offset = 0

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
    def __init__(self):
        self.conv_state: Optional[mx.array] = None  # [B, L - 1, D]
        self.offset = 0

    def copy(self) -> "ConvCache":
        c = ConvCache()
        c.conv_state, c.offset = self.conv_state, self.offset  # arrays are immutable
        return c

    def trim(self, n: int) -> int:
        return 0  # see the module docstring: keep a copy() instead

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


def save_cache(path: str, cache: Cache, metadata: Optional[dict] = None) -> None:
    """Write a cache to a safetensors file (``metadata`` values must be strings)."""
    arrays, meta = {}, dict(metadata or {})
    for i, c in enumerate(cache):
        meta[f"layer.{i}"] = f"{type(c).__name__}:{c.offset}"
        for j, a in enumerate(c.state):
            arrays[f"{i}.{j}"] = a
    mx.save_safetensors(path, arrays, metadata=meta)


def load_cache(path: str) -> tuple[Cache, dict]:
    arrays, meta = mx.load(path, format="safetensors", return_metadata=True)
    cache, i = [], 0
    kinds = {"KVCache": KVCache, "ConvCache": ConvCache}
    while f"layer.{i}" in meta:
        kind, offset = meta.pop(f"layer.{i}").split(":")
        state = [arrays[k] for k in (f"{i}.0", f"{i}.1") if k in arrays]
        cache.append(kinds[kind].from_state(state, int(offset)))
        i += 1
    return cache, meta
