"""What a quantized weight is: MLX's modes, per-path choices, their cost in bits.

A choice is mlx-lm's per-path dict ``{"group_size", "bits", "mode"}``, recorded in config.json
under ``quantization`` for every path that differs from the folder's default, so mlx-lm,
LM Studio and our loader rebuild the same modules. MLX 0.32 offers four modes:

=========  ==============  ===========  ============================================
mode       bits            group sizes  per group
=========  ==============  ===========  ============================================
affine     2, 3, 4, 5, 6, 8  32, 64, 128  a scale and a bias in the weights' dtype
mxfp4      4 (e2m1)        32           one 8-bit power-of-two scale
nvfp4      4 (e2m1)        16           one 8-bit e4m3 scale
mxfp8      8 (e4m3)        32           one 8-bit power-of-two scale
=========  ==============  ===========  ============================================

The MoE router (``feed_forward.gate``) is never below 8-bit affine: it picks the experts, it
is tiny, and an error there sends tokens to the wrong experts.
"""

from __future__ import annotations

from typing import Callable, Optional

import mlx.core as mx
import mlx.nn as nn

MODES = {  # mode -> (allowed bits, allowed group sizes, default (bits, group size))
    "affine": ((2, 3, 4, 5, 6, 8), (32, 64, 128), (4, 64)),
    "mxfp4": ((4,), (32,), (4, 32)),
    "nvfp4": ((4,), (16,), (4, 16)),
    "mxfp8": ((8,), (32,), (8, 32)),
}
ROUTER = {"group_size": 64, "bits": 8, "mode": "affine"}
RECIPES = {
    "uniform": None,  # every quantizable weight at the chosen bits
    "mixed_6": 6,  # experts at the chosen bits, attention/conv/dense FFN/embeddings at 6-bit affine
    "mixed_8": 8,  # ... at 8 bits
}


def spec(bits: Optional[int] = None, group_size: Optional[int] = None, mode: str = "affine") -> dict:
    """A checked choice; missing bits/group size take the mode's defaults."""
    if mode not in MODES:
        raise ValueError(f"unknown quantization mode {mode!r}; choose from {', '.join(MODES)}")
    allowed_bits, allowed_groups, (default_bits, default_group) = MODES[mode]
    bits, group_size = bits or default_bits, group_size or default_group
    if bits not in allowed_bits:
        raise ValueError(f"{mode} quantization takes bits {'/'.join(map(str, allowed_bits))}, not {bits}")
    if group_size not in allowed_groups:
        raise ValueError(f"{mode} quantization takes group size {'/'.join(map(str, allowed_groups))}, "
                         f"not {group_size}")
    return {"group_size": group_size, "bits": bits, "mode": mode}


def bits_per_weight(choice: dict, dtype_bits: int = 16) -> float:
    """Stored bits per weight element, scales (and affine biases) included."""
    per_group = 2 * dtype_bits if choice.get("mode", "affine") == "affine" else 8
    return choice["bits"] + per_group / choice["group_size"]


def is_router(path: str) -> bool:
    return path.endswith("feed_forward.gate")


def quantizable(path: str, module: nn.Module, group_size: int) -> bool:
    return hasattr(module, "to_quantized") and module.weight.shape[-1] % group_size == 0


def recipe_predicate(default: dict, recipe: str = "uniform") -> Callable:
    """Our-path -> False | choice dict: the fixed recipes (no calibration)."""
    if recipe not in RECIPES:
        raise ValueError(f"unknown quant recipe {recipe!r}; choose from {sorted(RECIPES)}")
    rest_bits = RECIPES[recipe]
    rest_group = default["group_size"] if default["mode"] == "affine" else 64
    rest = None if rest_bits is None else {"group_size": rest_group, "bits": rest_bits, "mode": "affine"}

    def predicate(path: str, module: nn.Module):
        if is_router(path) and hasattr(module, "to_quantized"):
            return dict(ROUTER)
        if not quantizable(path, module, default["group_size"]):
            return False
        if rest is not None and ".experts." not in path:
            return dict(rest)
        return dict(default)

    return predicate


def plan_predicate(plan: dict, fallback: Callable) -> Callable:
    """Choices from a plan (path -> choice, from calibration); other paths as ``fallback``."""

    def predicate(path: str, module: nn.Module):
        if path in plan and hasattr(module, "to_quantized"):
            return dict(plan[path])
        return fallback(path, module)

    return predicate


def fake_quantize(w: mx.array, choice: dict) -> mx.array:
    """``w`` quantized and dequantized (same dtype): what the quantized layer computes with."""
    kw = dict(group_size=choice["group_size"], bits=choice["bits"], mode=choice.get("mode", "affine"))
    q, scales, *biases = mx.quantize(w, **kw)
    return mx.dequantize(q, scales, biases[0] if biases else None, **kw).astype(w.dtype)
