"""GPTQ: round-to-nearest's error, column by column, compensated in the columns not yet rounded.

For a linear layer with inputs ``X`` (calibration activations) the output error of a quantized
weight ``Q`` is ``|(W - Q) X|^2 = tr((W - Q) H (W - Q)^T)`` with ``H = X^T X``. GPTQ rounds
one input column at a time and moves that column's rounding error, weighted by the inverse
Hessian, onto the columns after it (Frantar et al. 2022, arXiv:2210.17323), so the rounded
weights together reproduce ``W X`` far better than each rounded alone. The grid of each group
(scale, bias) is the one MLX's affine quantization gives the group's columns when the group is
reached, rounded to the stored dtype, and the levels are packed as ``mx.quantize`` packs them,
so the folder is an ordinary affine-quantized MLX folder.

Mixture of experts: each expert gets the Hessian of its own tokens (w1/w3: the normed inputs
routed to it; w2: its hidden activations), from the router's choices topped up, for an expert
with few tokens, with the tokens that score it highest (``awq.expert_pairs``), so every expert is
fitted on real activations of its kind. Experts are processed a few at a time, so the largest
transient is a few experts' float32 weights and Hessians.

Dimensions: E experts (1 for a plain linear), O outputs, D inputs, g group size, N tokens.
"""

from __future__ import annotations

from typing import Callable

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from ..model.blocks import Block, SparseMoE
from ..model.experts import swiglu
from .awq import expert_pairs
from .quantize import is_router

DAMP = 0.01  # of the mean Hessian diagonal, added to the diagonal (GPTQ's default)
EXPERT_CHUNK = 8
PRIOR = 1.0  # the all-token Hessian's weight in an expert's, in input widths of tokens
F32 = mx.float32


def pack(levels: np.ndarray, bits: int) -> mx.array:
    """Levels [..., D] (integers < 2**bits) as MLX packs them: a little-endian bit stream in uint32."""
    lv = levels.astype(np.uint32)
    bitplanes = ((lv[..., None] >> np.arange(bits, dtype=np.uint32)) & 1).astype(np.uint8)
    stream = np.packbits(bitplanes.reshape(*lv.shape[:-1], -1), axis=-1, bitorder="little")
    return mx.array(np.ascontiguousarray(stream).view(np.uint32))


def _inverse_factor(H: np.ndarray) -> mx.array:
    """The upper Cholesky factor ``U`` of ``H^-1`` (``H^-1 = U^T U``), per expert [E, D, D];
    dead inputs (never active) get a unit diagonal, and the damping grows until it factors.
    (MLX's LAPACK calls, not numpy's: numpy's threaded BLAS stalls on a loaded CPU.)"""
    H = H.astype(np.float32)
    idx = np.arange(H.shape[-1])
    diag = H[:, idx, idx].copy()
    H[:, idx, idx] += (diag <= 0)
    mean = np.maximum(diag.mean(-1), 1e-8)[:, None]
    for damp in (DAMP, 0.1, 1.0):
        Hd = H.copy()
        Hd[:, idx, idx] += damp * mean
        with mx.stream(mx.cpu):
            L = mx.linalg.cholesky(mx.array(Hd))
            U = mx.linalg.cholesky(mx.linalg.cholesky_inv(L), upper=True)
        if not mx.isnan(U).any().item():
            return U
    raise ValueError("the calibration Hessian could not be factored: give more calibration text")


def _group_grid(wg: np.ndarray, choice: dict, dtype) -> tuple[mx.array, mx.array]:
    """MLX's scales and biases [E, O, 1] of one group ``wg`` [E, O, g], in the stored dtype."""
    _, s, b = mx.quantize(mx.array(wg).astype(dtype), group_size=choice["group_size"], bits=choice["bits"])
    return s, b


def quantize_weight(W: mx.array, H: np.ndarray, choice: dict, dtype) -> tuple[mx.array, mx.array, mx.array]:
    """GPTQ of ``W`` [E, O, D] with Hessians ``H`` [E, D, D]: (packed weight, scales, biases)."""
    if choice.get("mode", "affine") != "affine":
        raise ValueError(f"GPTQ quantizes affine grids, not {choice['mode']}")
    g, bits = choice["group_size"], choice["bits"]
    n_levels = 2 ** bits - 1
    U_mx = _inverse_factor(H)
    U = np.array(U_mx)
    E, O, D = W.shape
    Wt = np.array(W.astype(F32)).transpose(0, 2, 1).copy()  # [E, D, O]: a column is a contiguous row
    Wt *= (np.einsum("eii->ei", H) > 0)[:, :, None]  # dead inputs carry nothing
    levels = np.empty((E, D, O), np.uint8)
    scales, biases = [], []
    for i in range(0, D, g):
        j = i + g
        s, b = _group_grid(Wt[:, i:j].transpose(0, 2, 1), choice, dtype)
        scales.append(s)
        biases.append(b)
        sf, bf = np.array(s.astype(F32))[..., 0][:, None], np.array(b.astype(F32))[..., 0][:, None]  # [E, 1, O]
        sf = np.where(sf == 0, 1.0, sf)
        err = np.empty((E, g, O), np.float32)
        for k in range(i, j):
            w = Wt[:, k:k + 1]  # [E, 1, O]
            lv = np.clip(np.rint((w - bf) / sf), 0, n_levels)
            levels[:, k] = lv[:, 0]
            e = (w - (lv * sf + bf)) / U[:, k, k][:, None, None]
            Wt[:, k:j] -= U[:, k, k:j][:, :, None] * e
            err[:, k - i] = e[:, 0]
        if j < D:
            Wt[:, j:] -= np.array(U_mx[:, i:j, j:].swapaxes(1, 2) @ mx.array(err))
    packed = pack(levels.transpose(0, 2, 1), bits)
    return packed, mx.concatenate(scales, -1), mx.concatenate(biases, -1)


class _Catcher(nn.Module):
    """Wraps a linear: sums ``x^T x`` of its inputs while computing as it did."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module
        self.H = None

    def __call__(self, x, *args, **kwargs):
        xf = x.reshape(-1, x.shape[-1]).astype(F32)
        h = xf.T @ xf
        self.H = h if self.H is None else self.H + h
        return self.module(x, *args, **kwargs)


def _linear_hessians(block: Block, x: mx.array, names: list[str]) -> dict:
    """path -> H [D, D] of each plain linear in ``names``, from one pass of ``x`` [B, L, D]."""
    leaves = dict(tree_flatten(block.leaf_modules(), is_leaf=nn.Module.is_module))
    catchers = [(n, _Catcher(leaves[n])) for n in names]
    block.update_modules(tree_unflatten(catchers))
    try:
        mx.eval(block(x))
        return {n: np.array(c.H)[None] for n, c in catchers}
    finally:
        block.update_modules(tree_unflatten([(n, c.module) for n, c in catchers]))


def _expert_hessians(moe: SparseMoE, f: mx.array, min_tokens: int):
    """Per chunk of experts: (first expert, H of w1/w3 [C, D, D], H of w2 [C, F, F]).

    An expert's own (token, expert) pairs rarely number more than its input width, too few to
    pin down a Hessian, so each is shrunk towards the expert's Hessian over every calibration
    token, weighted as ``PRIOR`` times the input width in tokens: an expert that sees many
    tokens is fitted on its own, one that sees few mostly on the text at large."""
    tok, exp, _ = expert_pairs(moe, f, min_tokens)
    ex = moe.experts
    E, F, D = ex.w1.weight.shape
    N = f.shape[0]
    shared = f.T @ f  # [D, D]
    for lo in range(0, E, EXPERT_CHUNK):
        h13, h2 = [], []
        for e in range(lo, min(E, lo + EXPERT_CHUNK)):
            w1, w3 = ex.w1.weight[e].astype(F32).T, ex.w3.weight[e].astype(F32).T
            fe = f[mx.array(tok[exp == e])]  # [n_e, D]
            he, ha = swiglu(fe @ w1, fe @ w3), swiglu(f @ w1, f @ w3)  # [n_e, F], [N, F]
            h13.append(fe.T @ fe + (PRIOR * D / N) * shared)
            h2.append(he.T @ he + (PRIOR * F / N) * (ha.T @ ha))
            mx.eval(h13[-1], h2[-1])
        yield lo, np.stack([np.array(h) for h in h13]), np.stack([np.array(h) for h in h2])


def quantize_block(block: Block, x: mx.array, choice: Callable, min_tokens: int = 16) -> dict:
    """GPTQ of every quantized weight of ``block`` (unquantized, AWQ scales already folded)
    from its input ``x`` [B, L, D]: path -> (weight, scales, biases) for ``install``. The
    router and paths not quantized, or not affine, are left to plain quantization."""
    x = x.astype(F32)
    dtype = block.operator_norm.weight.dtype
    out = {}

    def wanted(path, m):
        c = choice(path, m)
        return c if isinstance(c, dict) and c.get("mode", "affine") == "affine" and not is_router(path) else None

    leaves = dict(tree_flatten(block.leaf_modules(), is_leaf=nn.Module.is_module))
    plain = [n for n, m in leaves.items() if isinstance(m, nn.Linear) and wanted(n, m)]
    for n, H in _linear_hessians(block, x, plain).items():
        out[n] = quantize_weight(leaves[n].weight[None], H, wanted(n, leaves[n]), dtype)
        out[n] = tuple(a[0] for a in out[n])
    ffn = block.feed_forward
    if isinstance(ffn, SparseMoE):
        h = x + block.op(block.operator_norm(x), None)
        f = block.ffn_norm(h).reshape(-1, x.shape[-1])
        base = "feed_forward.experts."
        todo = {n: wanted(base + n, getattr(ffn.experts, n)) for n in ("w1", "w3", "w2")}
        parts = {n: [] for n in todo if todo[n]}
        for lo, H13, H2 in _expert_hessians(ffn, f, min_tokens):
            for n in parts:
                w = getattr(ffn.experts, n).weight[lo:lo + H13.shape[0]]
                parts[n].append(quantize_weight(w, H2 if n == "w2" else H13, todo[n], dtype))
                mx.eval(parts[n][-1])
        for n, chunks in parts.items():
            out[base + n] = tuple(mx.concatenate(list(a), 0) for a in zip(*chunks))
    return out


def install(block: nn.Module, results: dict) -> None:
    """Put ``quantize_block``'s weights into the quantized ``block`` (its layers' grids match)."""
    leaves = dict(tree_flatten(block.leaf_modules(), is_leaf=nn.Module.is_module))
    for path, (w, s, b) in results.items():
        m = leaves[path]
        if m.weight.shape != w.shape or m.scales.shape != s.shape:
            raise AssertionError(f"{path}: GPTQ made {w.shape}/{s.shape}, the layer holds "
                                 f"{m.weight.shape}/{m.scales.shape}")
        m.weight, m.scales, m.biases = w, s.astype(m.scales.dtype), b.astype(m.biases.dtype)
    mx.eval(block.parameters())
