"""Low-rank adapters (LoRA, DoRA) wrapped around the model's matmul layers.

A wrapped layer keeps the base layer as ``linear`` (dense, quantized or stacked experts,
frozen) and adds ``lora_a`` / ``lora_b`` (DoRA: also the magnitudes ``m``): mlx-lm's names
and shapes, so an adapter's parameter paths are the base layer's path plus ``.lora_a``.

    y = linear(x) + scale * (dropout(x) @ A) @ B                 dense: A [in, r], B [r, out]
    y = linear(x, e) + scale * (x @ A[e].T) @ B[e].T             experts: A [E, r, in], B [E, out, r]

The deltas are functions of (x, A, B) (``lora_delta``, ``expert_lora``) so several adapters
share one forward: ``stacked_delta`` takes a stack of A/B (``[N, in, r]``, ``[N, r, out]``) and
an adapter index per batch row (a zero adapter in the stack stands for the base); ``lora_rows``
keeps adapters resident that way. ``adapters_off(model)``
switches every adapter off for a block (DPO's reference model is the base, no second copy).

Dimensions: B batch rows, L tokens, r rank, E experts, N adapters in a stack.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterable, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

from . import device
from .experts import QuantizedSwitchLinear, SwitchLinear

DENSE_TYPES = (nn.Linear, nn.QuantizedLinear)
EXPERT_TYPES = (SwitchLinear, QuantizedSwitchLinear)
ADAPTER_LEAVES = ("lora_a", "lora_b", "m")


def lora_delta(x: mx.array, a: mx.array, b: mx.array, scale: float) -> mx.array:
    """``scale * (x @ a) @ b`` in x's dtype: x ``[..., in]``, a ``[in, r]``, b ``[r, out]``."""
    return (scale * ((x @ a) @ b)).astype(x.dtype)


def stacked_delta(x: mx.array, a: mx.array, b: mx.array, scale: mx.array, rows: mx.array) -> mx.array:
    """Per-row adapters: x ``[B, L, in]``, a ``[N, in, r]``, b ``[N, r, out]``, scale ``[N]``,
    rows ``[B]`` (which adapter each row takes) -> ``[B, L, out]``."""
    return gathered_delta(x, a, b, rows, mx.arange(rows.size, dtype=mx.uint32), scale[rows][:, None, None])


def gathered_delta(x: mx.array, a: mx.array, b: mx.array, rows: mx.array, lhs: mx.array,
                   row_scale: mx.array) -> mx.array:
    """``stacked_delta`` with what every layer of a forward shares made once by the caller:
    ``lhs`` ``arange(B)`` (gather_mm's own default, else made anew per call), ``row_scale``
    ``[B, 1, 1]``, each row's adapter's scale."""
    f32 = device.float32_gather_mm(x.dtype)
    xs = x.astype(mx.float32) if f32 else x
    z = mx.gather_mm(xs, a.astype(xs.dtype), lhs_indices=lhs, rhs_indices=rows)  # [B, L, r]
    z = mx.gather_mm(z, b.astype(xs.dtype), lhs_indices=lhs, rhs_indices=rows)  # [B, L, out]
    return (row_scale * z).astype(x.dtype)


def expert_lora(x: mx.array, a: mx.array, b: mx.array, indices: mx.array, sorted_indices: bool) -> mx.array:
    """The unscaled per-expert delta ``(x @ a[e].T) @ b[e].T`` for the routed ``e``: x
    ``[..., 1, in]``, a ``[E, r, in]``, b ``[E, out, r]`` -> ``[..., K, 1, out]`` (float32 where
    the CPU's gather_mm needs it)."""
    if device.float32_gather_mm(x.dtype):
        x = x.astype(mx.float32)
    a, b = a.swapaxes(-1, -2).astype(x.dtype), b.swapaxes(-1, -2).astype(x.dtype)
    z = mx.gather_mm(x, a, rhs_indices=indices, sorted_indices=sorted_indices)  # [..., 1, r]
    return mx.gather_mm(z, b, rhs_indices=indices, sorted_indices=sorted_indices)  # [..., 1, out]


def dense_dims(layer: nn.Module) -> tuple[int, int]:
    """(in, out) of a dense or quantized ``[out, in]`` layer."""
    out_dims, in_dims = layer["weight"].shape
    if "scales" in layer:
        in_dims = in_dims * 32 // layer.bits
    return in_dims, out_dims


def lora_shapes(layer: nn.Module, rank: int) -> tuple[tuple, tuple]:
    """The shapes of A and B for ``layer``: dense ``[in, r]``, ``[r, out]``; experts
    ``[E, r, in]``, ``[E, out, r]``."""
    if layer["weight"].ndim == 3:
        E, out_dims, in_dims = layer["weight"].shape
        in_dims = in_dims * 32 // layer.bits if "scales" in layer else in_dims
        return (E, rank, in_dims), (E, out_dims, rank)
    in_dims, out_dims = dense_dims(layer)
    return (in_dims, rank), (rank, out_dims)


def dequantized(layer: nn.Module) -> mx.array:
    """A layer's float weight (``[out, in]`` or ``[E, out, in]``)."""
    if "scales" not in layer:
        return layer["weight"]
    return mx.dequantize(layer["weight"], layer["scales"], layer.get("biases"), group_size=layer.group_size,
                         bits=layer.bits, mode=layer.mode)


class _Adapter(nn.Module):
    """What every adapter layer shares: the base as ``linear``, an on/off switch, dropout."""

    def __init__(self, base: nn.Module, rank: int, scale: float, dropout: float):
        super().__init__()
        self.linear = base
        self.scale, self.rank = scale, rank
        self.dropout = nn.Dropout(p=dropout)
        self.active = True  # False: the layer computes as its base (``adapters_off``)


class LoRALinear(_Adapter):
    def __init__(self, base: nn.Module, rank: int = 8, scale: float = 20.0, dropout: float = 0.0):
        super().__init__(base, rank, scale, dropout)
        in_dims, out_dims = dense_dims(base)
        bound = 1 / math.sqrt(in_dims)
        self.lora_a = mx.random.uniform(-bound, bound, (in_dims, rank))
        self.lora_b = mx.zeros((rank, out_dims))

    def __call__(self, x: mx.array) -> mx.array:
        y = self.linear(x)
        if not self.active:
            return y
        return y + lora_delta(self.dropout(x), self.lora_a, self.lora_b, self.scale)

    def delta_weight(self) -> mx.array:
        """``[out, in]``: what the adapter adds to the base weight."""
        return self.scale * self.lora_b.T @ self.lora_a.T

    def fused_weight(self) -> mx.array:
        w = dequantized(self.linear)
        return w + self.delta_weight().astype(w.dtype)


class DoRALinear(LoRALinear):
    """LoRA with learned row magnitudes: ``y = m / |W + dW|_row * (x @ (W + dW).T) + bias``
    (the norm is a constant for the gradient, as in the DoRA paper and mlx-lm)."""

    def __init__(self, base: nn.Module, rank: int = 8, scale: float = 20.0, dropout: float = 0.0):
        super().__init__(base, rank, scale, dropout)
        self.m = mx.linalg.norm(dequantized(base).astype(mx.float32), axis=1)

    def __call__(self, x: mx.array) -> mx.array:
        if not self.active:
            return self.linear(x)
        w = dequantized(self.linear)
        y = x @ w.T + lora_delta(self.dropout(x), self.lora_a, self.lora_b, self.scale)
        denom = mx.stop_gradient(mx.linalg.norm(w + self.delta_weight().astype(w.dtype), axis=1))
        y = (self.m / denom).astype(x.dtype) * y
        return y + self.linear["bias"] if "bias" in self.linear else y

    def fused_weight(self) -> mx.array:
        w = super().fused_weight()
        return (self.m / mx.linalg.norm(w.astype(mx.float32), axis=1))[:, None].astype(w.dtype) * w


class LoRASwitchLinear(_Adapter):
    """LoRA on stacked experts: each expert its own A/B, chosen by the same routing indices."""

    def __init__(self, base: nn.Module, rank: int = 8, scale: float = 20.0, dropout: float = 0.0):
        super().__init__(base, rank, scale, dropout)
        a_shape, b_shape = lora_shapes(base, rank)
        bound = 1 / math.sqrt(a_shape[-1])
        self.lora_a = mx.random.uniform(-bound, bound, a_shape)
        self.lora_b = mx.zeros(b_shape)

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        y = self.linear(x, indices, sorted_indices=sorted_indices)
        if not self.active:
            return y
        z = expert_lora(self.dropout(x), self.lora_a, self.lora_b, indices, sorted_indices)
        return y + (self.scale * z).astype(y.dtype)

    def delta_weight(self) -> mx.array:
        """``[E, out, in]``."""
        return self.scale * self.lora_b @ self.lora_a

    def fused_weight(self) -> mx.array:
        w = dequantized(self.linear)
        return w + self.delta_weight().astype(w.dtype)


ADAPTER_TYPES = (LoRALinear, LoRASwitchLinear)


def adaptable(module: nn.Module) -> bool:
    return isinstance(module, DENSE_TYPES + EXPERT_TYPES)


def default_keys(model: nn.Module) -> list[str]:
    """Every matmul layer inside a block, as paths relative to the block (mlx-lm's default:
    attention, conv projections, FFN, router and experts)."""
    return sorted(set().union(*adaptable_modules(model)[0]))


def wrap(module: nn.Module, rank: int, scale: float, dropout: float, dora: bool,
         expert_rank: Optional[int] = None) -> nn.Module:
    if isinstance(module, EXPERT_TYPES):
        if dora:
            raise ValueError("DoRA is not available for experts: use --fine-tune-type lora, or leave the experts "
                             "(feed_forward.switch_mlp.*) out of lora_parameters.keys")
        return LoRASwitchLinear(module, expert_rank or rank, scale, dropout)
    if isinstance(module, DENSE_TYPES):
        return (DoRALinear if dora else LoRALinear)(module, rank, scale, dropout)
    raise ValueError(f"cannot put a LoRA on a {type(module).__name__}")


def apply_lora(model: nn.Module, num_layers: int, rank: int = 8, scale: float = 20.0, dropout: float = 0.0,
               keys: Optional[Iterable[str]] = None, dora: bool = False, expert_rank: Optional[int] = None) -> int:
    """Wrap ``keys`` (paths relative to a block; default ``default_keys``) in the last
    ``num_layers`` blocks (-1: all) with LoRA/DoRA layers, mlx-lm's way; paths outside the
    blocks (``lm_head``) are matched from the model's root. Returns the number of layers
    wrapped. Freezes nothing: the caller decides what trains (``trainable_adapters``)."""
    if any("qkv_proj" in k or "w13" in k for k, _ in model.named_modules()):
        raise ValueError("the model is in a fused runtime layout; load it without fusing to add adapters")
    blocks, top = adaptable_modules(model)
    chosen = select_targets(blocks, top, num_layers, keys)
    for i, block in enumerate(model.layers):
        found = [(k, wrap(m, rank, scale, dropout, dora, expert_rank)) for k, m in chosen.get(i, {}).items()]
        if found:
            block.update_modules(tree_unflatten(found))
    found = [(k, wrap(m, rank, scale, dropout, dora, expert_rank)) for k, m in chosen.get(None, {}).items()]
    if found:
        model.update_modules(tree_unflatten(found))
    return sum(len(v) for v in chosen.values())


def adaptable_modules(model: nn.Module) -> tuple[list[dict], dict]:
    """The layers an adapter can wrap: per block ``{path inside the block: module}``, and
    those outside the blocks ``{path from the root: module}`` (``lm_head``)."""
    blocks = [{k: m for k, m in block.named_modules() if adaptable(m)} for block in model.layers]
    top = {k: m for k, m in model.named_modules() if adaptable(m) and ".layers." not in f".{k}"}
    return blocks, top


def select_targets(blocks: list[dict], top: dict, num_layers: int, keys: Optional[Iterable[str]] = None) -> dict:
    """mlx-lm's rule: ``keys`` (default: every adaptable path of a block) in the last
    ``num_layers`` blocks (-1: all), and the keys outside the blocks matched from the root ->
    ``{block index: {path: module}}``, the root's under ``None``."""
    keys = set(sorted(set().union(*blocks)) if keys is None else keys)
    first = 0 if num_layers < 0 else len(blocks) - min(num_layers, len(blocks))
    chosen = {i: {k: m for k, m in blocks[i].items() if k in keys} for i in range(first, len(blocks))}
    chosen[None] = {k: m for k, m in top.items() if k in keys}
    return {i: v for i, v in chosen.items() if v}


def trainable_adapters(model: nn.Module) -> None:
    """Freeze everything but the adapters' own arrays (the bases stay frozen)."""
    model.freeze()
    for _, m in model.named_modules():
        if isinstance(m, ADAPTER_TYPES):
            m.unfreeze(keys=[k for k in ADAPTER_LEAVES if k in m], recurse=False)


def adapter_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(k, m) for k, m in model.named_modules() if isinstance(m, ADAPTER_TYPES)]


@contextmanager
def adapters_off(model: nn.Module):
    """Every adapter switched off inside the block: the model computes as its base."""
    layers = [m for _, m in adapter_layers(model)]
    before = [m.active for m in layers]
    for m in layers:
        m.active = False
    try:
        yield model
    finally:
        for m, a in zip(layers, before):
            m.active = a


def merge(model: nn.Module) -> int:
    """Replace every adapter layer by a float layer holding base weight + delta (quantize it
    again with ``nn.quantize`` if wanted). Returns how many were merged."""
    merged = []
    for k, m in adapter_layers(model):
        w = m.fused_weight()
        if isinstance(m, LoRASwitchLinear):
            new = SwitchLinear(w.shape[2], w.shape[1], w.shape[0])
        else:
            new = nn.Linear(w.shape[1], w.shape[0], bias="bias" in m.linear)
        new.weight = w
        if "bias" in m.linear:
            new.bias = m.linear["bias"]
        merged.append((k, new))
    if merged:
        model.update_modules(tree_unflatten(merged))
    return len(merged)
