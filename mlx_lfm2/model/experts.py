"""Stacked experts driven by gather matmuls (``mx.gather_mm`` / ``mx.gather_qmm``).

Every expert's weight lives in one ``[E, out, in]`` array (quantized: packed ``uint32``
plus scales/biases), so routing is an index, not a Python loop. For long inputs the
(token, expert) pairs are sorted by expert first, so each expert's weights are read once
as a contiguous run (``sorted_indices=True``); a single decode token skips the sort.
Device-specific variants (CPU decode copying the chosen experts first; a fused gate+up
matmul on GPUs, swapped in by ``layers.specialize``) are chosen in ``device``.

Dimensions: N tokens (flattened), K experts per token, E experts, D in, F out.
"""

from __future__ import annotations

import math
from functools import lru_cache

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from . import device

SORT_THRESHOLD = 64  # (token, expert) pairs above which sorting pays for itself


@mx.compile
def swiglu(gate: mx.array, up: mx.array) -> mx.array:
    return nn.silu(gate) * up


@lru_cache(maxsize=32)
def _lhs_indices(x_batch: tuple, idx_shape: tuple) -> mx.array:
    """Which row of x each (token, expert) pair reads. Given as a constant, because without
    it gather_(q)mm builds this arange (plus a reshape and a broadcast) on every call."""
    rows = np.arange(math.prod(x_batch), dtype=np.uint32).reshape(x_batch)
    return mx.array(np.broadcast_to(rows, np.broadcast_shapes(x_batch, idx_shape)))


def lhs_indices(x: mx.array, indices: mx.array):
    """``_lhs_indices`` for unsorted calls with few pairs (decode); None (MLX's default) else."""
    return _lhs_indices(x.shape[:-2], indices.shape) if indices.size <= SORT_THRESHOLD else None


class SwitchLinear(nn.Module):
    def __init__(self, input_dims: int, output_dims: int, num_experts: int):
        super().__init__()
        scale = math.sqrt(1 / input_dims)
        self.weight = mx.random.uniform(-scale, scale, (num_experts, output_dims, input_dims))

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        w = self["weight"].swapaxes(-1, -2)
        if device.float32_gather_mm(x.dtype):
            y = mx.gather_mm(x.astype(mx.float32), w.astype(mx.float32), rhs_indices=indices,
                             sorted_indices=sorted_indices)
            return y.astype(x.dtype)
        lhs = None if sorted_indices else lhs_indices(x, indices)
        return mx.gather_mm(x, w, lhs, indices, sorted_indices=sorted_indices)

    def to_quantized(self, group_size: int = 64, bits: int = 4, mode: str = "affine", **_):
        return QuantizedSwitchLinear(self.weight, group_size, bits, mode)


class QuantizedSwitchLinear(nn.Module):
    """A SwitchLinear whose ``[E, out, in]`` weight is quantized per group along ``in``."""

    def __init__(self, weight: mx.array, group_size: int, bits: int, mode: str = "affine"):
        super().__init__()
        self.group_size, self.bits, self.mode = group_size, bits, mode
        self.weight, self.scales, *b = mx.quantize(weight, group_size, bits, mode=mode)
        if b:
            self.biases = b[0]
        self.freeze()

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        """x ``[..., K|1, 1, D]``, indices ``[..., K]`` -> ``[..., K, 1, F]``; on the CPU the
        K (token, expert) pairs are shared out across streams (see ``device``)."""
        K = indices.shape[-1]
        E, F, _ = self["weight"].shape
        x_per_pair = x.shape[-3] == K
        take_first = not sorted_indices and device.take_experts_first(indices.size, E)
        w, s, b = self["weight"], self["scales"], self.get("biases")
        if not take_first and x.dtype == mx.float32 and self.mode == "affine" and s.dtype != mx.float32:
            # The kernel would copy all E experts' scales to float32 once per stream; do it
            # once here and share the copy.
            s, b = s.astype(x.dtype), None if b is None else b.astype(x.dtype)

        def part(lo, hi):
            whole = (lo, hi) == (0, K)
            idx, pw, ps, pb = indices if whole else indices[..., lo:hi], w, s, b
            if take_first:
                flat = idx.flatten()
                pw, ps, pb = w[flat], s[flat], None if b is None else b[flat]
                idx = mx.arange(flat.size).reshape(idx.shape)
            px = x[..., lo:hi, :, :] if x_per_pair and not whole else x
            lhs = None if sorted_indices or take_first else lhs_indices(px, idx)
            return mx.gather_qmm(
                px, pw, ps, pb, lhs_indices=lhs, rhs_indices=idx, transpose=True, group_size=self.group_size,
                bits=self.bits, mode=self.mode, sorted_indices=sorted_indices,
            )

        return device.split(part, K, K * F * self["scales"].shape[-1] * self.group_size, axis=-3)


class SwitchGLU(nn.Module):
    """``E`` SwiGLU experts: ``w2[e](silu(w1[e] x) * w3[e] x)`` for the chosen ``e``."""

    def __init__(self, dims: int, hidden: int, num_experts: int):
        super().__init__()
        self.w1 = SwitchLinear(dims, hidden, num_experts)
        self.w3 = SwitchLinear(dims, hidden, num_experts)
        self.w2 = SwitchLinear(hidden, dims, num_experts)

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        """x ``[..., D]``, indices ``[..., K]`` -> ``[..., K, D]``."""
        lead, K = indices.shape[:-1], indices.shape[-1]
        x = mx.expand_dims(x, (-2, -3))  # [..., 1, 1, D]
        do_sort = indices.size >= SORT_THRESHOLD
        idx = indices
        if do_sort:
            flat = indices.flatten()  # [N*K]
            order = mx.argsort(flat)
            inv_order = mx.argsort(order)
            x = x.flatten(0, -3)[order // K]  # [N*K, 1, D], grouped by expert
            idx = flat[order]
        y = self.w2(self.glu(x, idx, do_sort), idx, do_sort)  # [..., 1, D]
        if do_sort:
            y = y[inv_order].reshape(*lead, K, 1, -1)
        return y.squeeze(-2)

    def glu(self, x: mx.array, indices: mx.array, sorted_indices: bool) -> mx.array:
        return swiglu(self.w1(x, indices, sorted_indices), self.w3(x, indices, sorted_indices))
