"""Quantized matmuls split across CPU streams.

MLX's CPU backend runs each op on one thread, but ops on different streams run at the
same time. On the CPU, a large quantized matmul is therefore cut into one slice of output
rows per core, each on its own stream, and the slices concatenated (1.8x on two cores for
a 1536x2048 4-bit mat-vec). On a GPU every function here is the plain single op.

The layers subclass MLX's so ``nn.quantize`` and checkpoints see the same parameters.
"""

from __future__ import annotations

import os
from typing import Callable

import mlx.core as mx
import mlx.nn as nn

MIN_WEIGHTS = 1 << 17  # below this a split costs more than it saves
_streams: list = []


def cpu_streams() -> list:
    """One CPU stream per core (at most 8; ``MLX_LFM2_CPU_STREAMS`` overrides), [] off the CPU."""
    if mx.default_device().type != mx.cpu:
        return []
    if not _streams:
        n = int(os.environ.get("MLX_LFM2_CPU_STREAMS", min(os.cpu_count() or 1, 8)))
        _streams.extend([mx.default_stream(mx.cpu)] + [mx.new_stream(mx.cpu) for _ in range(n - 1)])
    return _streams if len(_streams) > 1 else []


def split(part: Callable[[int, int], mx.array], n: int, work: int, axis: int = -1) -> mx.array:
    """``part(lo, hi)`` over ``[0, n)`` in one slice per CPU stream, concatenated on ``axis``."""
    streams = cpu_streams()
    if not streams or work < MIN_WEIGHTS or n < 2 * len(streams):
        return part(0, n)
    k = len(streams)
    bounds = [n * i // k for i in range(k + 1)]
    outs = []
    for s, lo, hi in zip(streams, bounds, bounds[1:]):
        with mx.stream(s):
            outs.append(part(lo, hi))
    return mx.concatenate(outs, axis=axis)


def quantized_matmul(layer, x: mx.array) -> mx.array:
    """``x @ W.T`` for a quantized layer's ``[rows, in]`` weight, rows split across streams."""
    w, s, b = layer["weight"], layer["scales"], layer.get("biases")

    def part(lo, hi):
        return mx.quantized_matmul(x, w[lo:hi], s[lo:hi], None if b is None else b[lo:hi], transpose=True,
                                   group_size=layer.group_size, bits=layer.bits, mode=layer.mode)

    return split(part, w.shape[0], w.shape[0] * s.shape[1] * layer.group_size)


class QuantizedLinear(nn.QuantizedLinear):
    def __call__(self, x: mx.array) -> mx.array:
        y = quantized_matmul(self, x)
        return y + self["bias"] if "bias" in self else y


class Linear(nn.Linear):
    def to_quantized(self, group_size=None, bits=None, mode="affine", quantize_input=False):
        if quantize_input:
            return super().to_quantized(group_size, bits, mode, quantize_input)
        return QuantizedLinear.from_linear(self, group_size, bits, mode)


class QuantizedEmbedding(nn.QuantizedEmbedding):
    def as_linear(self, x: mx.array) -> mx.array:
        return quantized_matmul(self, x)


class Embedding(nn.Embedding):
    def to_quantized(self, group_size=None, bits=None, mode="affine", quantize_input=False):
        if quantize_input:
            raise ValueError("quantized input is not supported for embeddings")
        return QuantizedEmbedding.from_embedding(self, group_size, bits, mode)
