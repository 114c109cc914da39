"""Batches: examples cut into rows (padded, or packed several to a row) and the model's
forward over a packed row that keeps its documents apart.

Packing puts documents side by side in one row so no compute is spent on padding. To give
each document exactly the loss it has alone, two things must not leak across a boundary:

* attention: a block-diagonal causal mask (``PackedMask``, which the attention layers read
  as they read a batch cache's mask); RoPE is relative, so a document's scores do not
  depend on where in the row it starts;
* the short convolution: its kernel reads the K-1 previous conv inputs, which at a
  document start must be zeros, as they are for a fresh sequence (``SegmentedConv``).

Dimensions: B rows, T positions per row, K conv kernel.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional

import mlx.core as mx
import numpy as np

from ..model.batch_cache import BatchKVCache
from ..model.blocks import DepthwiseConv


@dataclass
class Batch:
    inputs: mx.array  # [B, T] token ids
    targets: mx.array  # [B, T] the next token at each position
    weights: mx.array  # [B, T] 1.0 where the target is trained
    positions: Optional[mx.array] = None  # [B, T] position inside its document (packed rows)
    segments: Optional[mx.array] = None  # [B, T] document number inside the row (packed rows)

    @property
    def tokens(self) -> int:
        return int(self.inputs.size)


def epoch_rows(examples: list, batch_size: int, max_len: int, pack: bool, seed: int, epoch: int) -> list:
    """This epoch's batches: lists of ``batch_size`` rows, a row being a list of examples.

    The order depends only on (seed, epoch), so a resumed run sees the batches an
    uninterrupted one would. Unpacked: sorted by length, cut into batches, batches shuffled
    (little padding, as mlx-lm); packed: documents shuffled, then packed first-fit in order.
    """
    rng = np.random.default_rng([seed, epoch])
    if not pack:
        order = sorted(range(len(examples)), key=lambda i: len(examples[i]))
        batches = [[[examples[j]] for j in order[i:i + batch_size]]
                   for i in range(0, len(order) - batch_size + 1, batch_size)]
        return [batches[i] for i in rng.permutation(len(batches))]
    rows, room = [], []
    for i in rng.permutation(len(examples)):
        e = examples[i]
        for r, left in enumerate(room):
            if len(e) <= left:
                rows[r].append(e)
                room[r] -= len(e)
                break
        else:
            rows.append([e])
            room.append(max_len - len(e))
    # Every row trains each epoch: the last batch is topped up with the epoch's first rows.
    wrapped = rows + rows[: (-len(rows)) % batch_size] if len(rows) >= batch_size else (rows * batch_size)[:batch_size]
    return [wrapped[i:i + batch_size] for i in range(0, len(wrapped), batch_size)] if rows else []


def collate(rows: list, pad_id: int = 0, pad_to: int = 32) -> Batch:
    """Rows of examples -> one ``Batch`` (T rounded up to a multiple of ``pad_to``)."""
    lengths = [sum(len(e) for e in row) for row in rows]
    T = max(pad_to * -(-(max(lengths) - 1) // pad_to), 1)
    tokens = np.full((len(rows), T + 1), pad_id, np.int32)
    weights = np.zeros((len(rows), T + 1), np.float32)
    pos = np.zeros((len(rows), T + 1), np.int32)
    seg = np.zeros((len(rows), T + 1), np.int32)
    packed = any(len(row) > 1 for row in rows)
    for b, row in enumerate(rows):
        at = 0
        for d, e in enumerate(row):
            n = len(e)
            tokens[b, at:at + n], weights[b, at:at + n] = e.tokens, e.weights
            pos[b, at:at + n], seg[b, at:at + n] = np.arange(n), d
            at += n
        pos[b, at:], seg[b, at:] = np.arange(T + 1 - at), len(row)  # padding: one more segment
    batch = Batch(mx.array(tokens[:, :-1]), mx.array(tokens[:, 1:]), mx.array(weights[:, 1:]))
    if packed:
        batch.positions, batch.segments = mx.array(pos[:, :-1]), mx.array(seg[:, :-1])
    return batch


class PackedMask(BatchKVCache):
    """What an attention layer sees of a packed row: no stored keys, a block-diagonal causal mask."""

    def __init__(self, mask: mx.array):
        super().__init__()
        self.mask = mask  # [B, 1, T, T]

    @property
    def offset(self) -> int:
        return 0

    def make_mask(self, L: int) -> mx.array:
        return self.mask

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        return keys, values


class SegmentedConv(DepthwiseConv):
    """A ``DepthwiseConv`` whose taps stop at document starts (``_positions`` ``[B, T]``, set by
    ``packed`` as a plain attribute, so it never becomes a parameter)."""

    def __call__(self, x: mx.array, state: Optional[mx.array]):
        B, L, D = x.shape
        K = self.weight.shape[1]
        w = self.weight[:, :, 0].T  # [K, D]
        window = mx.concatenate([mx.zeros((B, K - 1, D), dtype=x.dtype), x], axis=1)  # [B, L+K-1, D]
        y = window[:, K - 1:] * w[K - 1]
        for k in range(K - 1):  # tap k reads x[t - (K-1-k)]: only inside the same document
            inside = (self._positions >= K - 1 - k)[..., None].astype(x.dtype)
            y = y + window[:, k:k + L] * inside * w[k]
        if "bias" in self:
            y = y + self.bias
        return y, window[:, -(K - 1):]


@contextmanager
def packed(model, batch: Batch):
    """The per-layer "caches" for a forward over ``batch`` (None when it is not packed)."""
    if batch.segments is None:
        yield None
        return
    seg, T = batch.segments, batch.segments.shape[1]
    causal = mx.arange(T)[None, :] <= mx.arange(T)[:, None]
    mask = ((seg[:, :, None] == seg[:, None, :]) & causal)[:, None]  # [B, 1, T, T]
    convs = [layer.conv.conv for layer in model.layers if not layer.is_attention]
    for c in convs:
        c.__class__ = SegmentedConv
        object.__setattr__(c, "_positions", batch.positions)
    try:
        yield [PackedMask(mask) if layer.is_attention else None for layer in model.layers]
    finally:
        for c in convs:
            c.__class__ = DepthwiseConv
            object.__delattr__(c, "_positions")


def segment_state(block):
    """What ``packed`` set on a block's conv (None outside ``packed`` or for attention): a
    checkpointed block is recomputed in the backward pass, after ``packed`` has exited, and
    must see the same document boundaries (``segments_applied``)."""
    conv = getattr(getattr(block, "conv", None), "conv", None)
    return (conv, conv._positions) if isinstance(conv, SegmentedConv) else None


@contextmanager
def segments_applied(state):
    """Re-apply ``segment_state``'s boundaries for one call (nothing when still set)."""
    if state is None or isinstance(state[0], SegmentedConv):
        yield
        return
    conv, positions = state
    conv.__class__ = SegmentedConv
    object.__setattr__(conv, "_positions", positions)
    try:
        yield
    finally:
        conv.__class__ = DepthwiseConv
        object.__delattr__(conv, "_positions")
