"""Sensitivity-driven mixed precision: the bits of each weight path under a bits-per-weight budget.

A first streaming pass over the checkpoint measures, layer by layer, what quantizing each path
alone at each candidate precision does to the layer's output on the calibration text (relative
squared error of the residual stream after the layer, which is what the rest of the network
sees): one forward per path, at a 4-bit reference, carried to the other precisions by their
weight errors' ratio (``measure_block``). The budget then goes, a bit at a time, where it buys the largest drop in that error per
bit (a greedy knapsack over the lower envelope of each path's error curve; the candidates: affine
2 to 8 bits in groups of 64, 3 and 4 bits in groups of 128). Paths are mlx-lm's quantization units: one projection of one layer, all experts of a projection together (they
share one stacked tensor, so one precision).

The embedding and the head are chosen too: as the input, by the relative error of the
embeddings (the stream's first state); as the head, by the relative error of the logits
(a tied embedding sums both). Fixed, not chosen: the router at 8-bit affine and the tensors
that are not quantized (norms, conv taps) at the weights' dtype.
"""

from __future__ import annotations

from typing import Callable, Iterable, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .quantize import ROUTER, bits_per_weight, fake_quantize, is_router, spec

AFFINE_BITS = (2, 3, 4, 5, 6, 8)
WIDE_GROUP = 128  # 3 and 4 bits in groups of 128: 3.25 and 4.25 bits per weight, between those of 64
WIDE_BITS = (3, 4)


def candidates(mode: str, group_size: int) -> list[dict]:
    """The precisions a path may get, cheapest first (a path whose width the wide group does
    not divide measures it as unusable: an infinite error)."""
    if mode == "affine":
        options = [spec(b, group_size, "affine") for b in AFFINE_BITS]
        if group_size < WIDE_GROUP:
            options += [spec(b, WIDE_GROUP, "affine") for b in WIDE_BITS]
        return sorted(options, key=bits_per_weight)
    return [spec(mode=mode)] + ([spec(mode="mxfp8")] if mode != "mxfp8" else [])


def _fits(weight: mx.array, choice: dict) -> bool:
    return weight.shape[-1] % choice["group_size"] == 0


def _weight_errors(weight: mx.array, options: list[dict]) -> list[float]:
    """``|quantized weight - weight|^2`` per option (inf where the group does not divide the width)."""
    w = weight.astype(mx.float32)
    return [float(((fake_quantize(weight, c).astype(mx.float32) - w) ** 2).sum().item()) if _fits(weight, c)
            else float("inf") for c in options]


def reference_option(weight: mx.array, options: list[dict]) -> Optional[int]:
    """The option a path's output error is measured at: its first 4-bit one, else its cheapest."""
    fits = [i for i, c in enumerate(options) if _fits(weight, c)]
    return next((i for i in fits if options[i]["bits"] == 4), fits[0] if fits else None)


def measure_block(block: nn.Module, x: mx.array, prefix: str, options: list[dict], quantized: Callable) -> dict:
    """path -> (weights, [relative output error per option]) for each quantizable, non-router
    path of ``block`` (``quantized(path, module)``: whether the fixed recipe quantizes it).

    One forward per path: the layer's output error is measured at the reference option
    (``reference_option``) and carried to the others by the ratio of their weight errors.
    Rounding error is a small perturbation that the layer passes on linearly, and an affine grid
    of b bits has the same levels as the reference's in each group, spaced ``(2^4 - 1) / (2^b -
    1)`` times as far, so its error is the reference's, scaled: the ratio is exact for a
    linear output and close for the rest (measured on the test models against one forward per
    option: within ~20% from 2 to 8 bits for the conv and FFN paths; the random models'
    attention paths move the output by ~1e-5, in the forward's own noise). The FFN's paths are
    measured on the FFN alone, from the operator's cached output."""
    h = x + block.op(block.operator_norm(x), None)
    f = block.ffn_norm(h)
    y_ref = block.feed_forward(f, residual=h)
    mx.eval(h, f, y_ref)
    denom = (y_ref.astype(mx.float32) ** 2).mean()
    out = {}
    for name, m in tree_flatten(block.leaf_modules(), is_leaf=nn.Module.is_module):
        path = prefix + name
        if is_router(path) or not quantized(path, m):
            continue
        w0 = m.weight
        wr, ref = _weight_errors(w0, options), reference_option(w0, options)
        if ref is None:
            out[path] = (w0.size, [float("inf")] * len(options))
            continue
        m.weight = fake_quantize(w0, options[ref])
        y = block.feed_forward(f, residual=h) if name.startswith("feed_forward.") else block(x)
        e = float((((y - y_ref).astype(mx.float32) ** 2).mean() / denom).item())
        m.weight = w0
        out[path] = (w0.size, [e * r / max(wr[ref], 1e-30) for r in wr])
    return out


def allocate(errors: dict, options: list[dict], budget_bits: float, dtype_bits: int = 16) -> dict:
    """path -> option: each path starts at the cheapest; upgrades go, best error drop per extra
    bit first, while the chosen paths' bits stay within ``budget_bits``."""
    cost = [bits_per_weight(c, dtype_bits) for c in options]
    level = {p: 0 for p in errors}
    spent = sum(n * cost[0] for n, _ in errors.values())
    if spent > budget_bits:
        raise ValueError(f"{spent - budget_bits:.0f} bits over budget with every path at {options[0]}")
    while True:
        best = None
        for p, (n, errs) in errors.items():
            i = level[p]
            for j in range(i + 1, len(options)):
                extra = n * (cost[j] - cost[i])
                gain = (errs[i] - errs[j]) / extra if errs[j] < float("inf") else 0.0
                if spent + extra <= budget_bits and gain > 0 and (best is None or gain > best[0]):
                    best = (gain, p, j, extra)
        if best is None:
            break
        _, p, j, extra = best
        level[p], spent = j, spent + extra
    return {p: dict(options[i]) for p, i in level.items()}


def plan(blocks: Iterable, x: mx.array, options: list[dict], target_bpw: float, total_params: int,
         ends: Callable, quantized: Callable, dtype_bits: int = 16, carried: Optional[mx.array] = None
         ) -> tuple[dict, dict]:
    """Measure every layer (``blocks`` yields ``(prefix, unquantized block)`` in order; ``x`` the
    calibration embeddings) and, by ``ends(final hidden states, carried)``, the embedding and head
    (path -> (weights, errors)); then spend ``target_bpw`` over the whole model. ``carried``: other
    hidden states taken through the same layers (e.g. from a perturbed embedding). Returns the
    plan (path -> choice) and the measured errors (path -> list)."""
    errors, router_params = {}, 0
    for prefix, block in blocks:
        errors.update(measure_block(block, x, prefix, options, quantized))
        router_params += sum(m.weight.size for n, m in tree_flatten(block.leaf_modules(), is_leaf=nn.Module.is_module)
                             if is_router(prefix + n))
        x, carried = block(x), None if carried is None else block(carried)
        mx.eval(x, carried)
        del block
    errors.update(ends(x, carried))
    chosen = sum(n for n, _ in errors.values())
    fixed = (total_params - chosen - router_params) * dtype_bits + router_params * bits_per_weight(ROUTER, dtype_bits)
    budget = target_bpw * total_params - fixed
    lowest = (fixed + sum(n for n, _ in errors.values()) * bits_per_weight(options[0], dtype_bits)) / total_params
    if lowest > target_bpw:
        raise ValueError(f"--target-bpw {target_bpw} is below the {lowest:.2f} bits per weight this model needs "
                         f"at the least ({options[0]['bits']}-bit {options[0]['mode']} everywhere it may be, the "
                         "router at 8 bits): raise it")
    result = allocate(errors, options, budget, dtype_bits)
    return result, {p: e for p, (_, e) in errors.items()}
