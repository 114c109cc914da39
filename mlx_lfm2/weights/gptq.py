"""GPTQ: round-to-nearest's error, column by column, compensated in the columns not yet rounded.

For a linear layer with inputs ``X`` (calibration activations) the output error of a quantized
weight ``Q`` is ``|(W - Q) X|^2 = tr((W - Q) H (W - Q)^T)`` with ``H = X^T X``. GPTQ rounds
one input column at a time and moves that column's rounding error, weighted by the inverse
Hessian, onto the columns after it (Frantar et al. 2022, arXiv:2210.17323), so the rounded
weights together reproduce ``W X`` far better than each rounded alone. The grid of each group
(scale, bias) is the one MLX's affine quantization gives the group's columns when the group is
reached, rounded to the stored dtype, and the levels are packed as ``mx.quantize`` packs them,
so the folder is an ordinary affine-quantized MLX folder.

Calibration text is scarce beside a layer's width (the bundled sample is ~2k tokens; a dense
down projection takes 11776 inputs), and a Hessian from too few tokens makes GPTQ fit that
text's noise: worse than plain rounding on any other text. So the Hessian is shrunk towards its
diagonal (plain rounding) as far as its tokens fall short of its width (``shrink``), and GPTQ is
kept, per weight and per expert, only where the version fitted on half the calibration text
beats round-to-nearest on the other half (``quantize_weight``); the card counts how many kept it.

Mixture of experts: each expert gets the Hessian of its own tokens (w1/w3: the normed inputs
routed to it; w2: its hidden activations), from the router's choices topped up, for an expert
with few tokens, with the tokens that score it highest (``awq.expert_pairs``), so every expert is
fitted on real activations of its kind. Experts are processed a few at a time, so the largest
transient is a few experts' float32 weights and Hessians.

Dimensions: E experts (1 for a plain linear), O outputs, D inputs, g group size, N tokens.
"""

from __future__ import annotations

from typing import Callable, Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from ..model import device
from ..model.blocks import Block, SparseMoE
from ..model.experts import swiglu
from .awq import expert_pairs
from .quantize import is_router

DAMP = 0.01  # of the mean Hessian diagonal, added to the diagonal (GPTQ's default)
EXPERT_CHUNK = 4  # experts whose float32 weights and Hessians are held at once
PRIOR = 1.0  # the all-token Hessian's weight in an expert's, in input widths of tokens
F32 = mx.float32


def pack(levels: np.ndarray, bits: int) -> mx.array:
    """Levels [..., D] (integers < 2**bits) as MLX packs them: a little-endian bit stream in uint32."""
    lv = levels.astype(np.uint32)
    bitplanes = ((lv[..., None] >> np.arange(bits, dtype=np.uint32)) & 1).astype(np.uint8)
    stream = np.packbits(bitplanes.reshape(*lv.shape[:-1], -1), axis=-1, bitorder="little")
    return mx.array(np.ascontiguousarray(stream).view(np.uint32))


def _inverse_factor(H: np.ndarray) -> np.ndarray:
    """The upper Cholesky factor ``U`` of ``H^-1`` (``H^-1 = U^T U``), per expert [E, D, D];
    dead inputs (never active) get a unit diagonal, and the damping grows until it factors.
    Each step is evaluated before the next so that at most two [E, D, D] arrays are alive.
    (MLX's LAPACK calls, not numpy's: numpy's threaded BLAS stalls on a loaded CPU.)"""
    idx = np.arange(H.shape[-1])
    diag = H[:, idx, idx].astype(np.float32)
    mean = np.maximum(diag.mean(-1), 1e-8)[:, None]
    for damp in (DAMP, 0.1, 1.0):
        add = mx.array(damp * mean + (diag <= 0))  # [E, D]
        with mx.stream(device.linalg_device()):
            Hd = mx.array(H, dtype=F32) + add[:, :, None] * mx.eye(H.shape[-1])
            L = mx.linalg.cholesky(Hd)
            mx.eval(L)
            del Hd
            Hinv = mx.linalg.cholesky_inv(L)
            mx.eval(Hinv)
            del L
            U = mx.linalg.cholesky(Hinv, upper=True)
            mx.eval(U)
            del Hinv
        if not mx.isnan(U).any().item():
            return np.array(U)
    raise ValueError("the calibration Hessian could not be factored: give more calibration text")


def _group_grid(wg: np.ndarray, choice: dict, dtype) -> tuple[mx.array, mx.array]:
    """MLX's scales and biases [E, O, 1] of one group ``wg`` [E, O, g], in the stored dtype."""
    _, s, b = mx.quantize(mx.array(wg).astype(dtype), group_size=choice["group_size"], bits=choice["bits"])
    return s, b


def shrink(H: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """``H`` [E, D, D] from ``tokens`` [E] tokens' worth, shrunk towards its diagonal by
    ``D / (D + tokens)``: fewer tokens than inputs cannot pin down the correlations, and a
    Hessian fitted on them makes GPTQ fit the calibration text's noise (worse than plain
    rounding on other text). A diagonal Hessian is plain rounding, so the shrinkage moves GPTQ
    towards round-to-nearest exactly as far as the calibration falls short."""
    D = H.shape[-1]
    lam = (D / (D + np.maximum(tokens, 1.0))).astype(np.float32)[:, None, None]
    idx = np.arange(D)
    out = (1 - lam) * H
    out[:, idx, idx] = H[:, idx, idx]
    return out


def _gptq(W: mx.array, H: np.ndarray, choice: dict, dtype) -> tuple[mx.array, mx.array, mx.array]:
    """GPTQ of ``W`` [E, O, D] with Hessians ``H`` [E, D, D]: (packed weight, scales, biases)."""
    g, bits = choice["group_size"], choice["bits"]
    n_levels = 2 ** bits - 1
    U = _inverse_factor(H)
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
            Wt[:, j:] -= np.array(mx.array(U[:, i:j, j:]).swapaxes(1, 2) @ mx.array(err))
    packed = pack(levels.transpose(0, 2, 1), bits)
    return packed, mx.concatenate(scales, -1), mx.concatenate(biases, -1)


def _dequantize(triple, choice: dict) -> mx.array:
    return mx.dequantize(*triple, group_size=choice["group_size"], bits=choice["bits"]).astype(F32)


def _output_error(W: mx.array, M: mx.array, H: np.ndarray) -> np.ndarray:
    """Per expert, ``tr((W - M) H (W - M)^T)``: the summed squared output error on H's inputs."""
    d = W.astype(F32) - M
    return np.array(((d @ mx.array(H)) * d).sum((-2, -1)))


def quantize_weight(W: mx.array, halves, choice: dict, dtype):
    """``W`` [E, O, D] quantized; ``halves``: two (Hessians [E, D, D], tokens [E]) pairs, from
    two disjoint halves of the calibration text. GPTQ fitted on the first half is checked
    against round-to-nearest on the second, per expert: where it lowers that output error, the
    expert gets GPTQ fitted on both halves, elsewhere round-to-nearest (so a Hessian that does
    not generalise, as on activations without correlations, costs nothing). Returns (packed
    weight, scales, biases, which experts got GPTQ [E])."""
    if choice.get("mode", "affine") != "affine":
        raise ValueError(f"GPTQ quantizes affine grids, not {choice['mode']}")
    (Ha, na), (Hb, nb) = halves
    rtn = mx.quantize(W.astype(dtype), group_size=choice["group_size"], bits=choice["bits"])
    trial = _gptq(W, shrink(Ha, na), choice, dtype)
    keep = _output_error(W, _dequantize(trial, choice), Hb) < _output_error(W, _dequantize(rtn, choice), Hb)
    if not keep.any():
        return (*rtn, keep)
    idx = mx.array(np.flatnonzero(keep))
    sel = np.flatnonzero(keep)
    final = _gptq(W[idx], shrink(Ha[sel] + Hb[sel], na[sel] + nb[sel]), choice, dtype)
    out = []
    for r, f in zip(rtn, final):
        r = mx.array(r)
        r[idx] = f.astype(r.dtype)
        out.append(r)
    return (*out, keep)


def hessian_halves(inputs: list) -> list:
    """The two halves' (H [1, D, D], tokens [1]) of a matrix's ``inputs`` (arrays [..., D]),
    even and odd tokens apart."""
    H, n = [0, 0], [0, 0]
    for x in inputs:
        xf = x.reshape(-1, x.shape[-1]).astype(F32)
        for p in (0, 1):
            H[p] = H[p] + xf[p::2].T @ xf[p::2]
            n[p] += xf[p::2].shape[0]
    return [(np.array(H[p])[None], np.array([n[p]], np.float32)) for p in (0, 1)]


def head_halves(h: mx.array) -> list:
    """``hessian_halves`` of the head's inputs ``h`` [N, D] (the final-normed calibration hidden states)."""
    return hessian_halves([h])


def head_row_errors(W: mx.array, M: mx.array, H: Optional[np.ndarray], lookup: Optional[float] = None) -> mx.array:
    """Per row [V], the relative error of the quantized table ``M`` for ``W`` [V, D]: of the logits
    on ``H``'s inputs (None: no head use), plus, for a table also looked up, ``lookup`` times the
    relative error of its rows (every row alike: the calibration text sees few of the rows later
    text looks up). ``lookup`` is the measured gain from a lookup's relative error to the
    logits' (``_Head.inputs``). Rows are independent in both uses (GPTQ moves error along a
    row's inputs, never between rows), so a table may mix GPTQ's rows and rounding's."""
    W, d = W.astype(F32), W.astype(F32) - M
    err = mx.zeros(W.shape[0])
    if H is not None:
        Hm = mx.array(H[0])
        err = ((d @ Hm) * d).sum(-1) / ((W @ Hm) * W).sum()
    if lookup is not None:
        err = err + lookup * (d * d).sum(-1) / (W * W).sum()
    return err


def head_error(W: mx.array, M: mx.array, H: Optional[np.ndarray], lookup: Optional[float] = None) -> float:
    """``head_row_errors`` summed over the rows."""
    return float(head_row_errors(W, M, H, lookup).sum().item())


def _head_gptq(W: mx.array, H: np.ndarray, tokens: np.ndarray, choice: dict, dtype, lookup: Optional[float]):
    """GPTQ of the table ``W`` [V, D] on the objective ``head_row_errors`` sums: the shrunk head
    Hessian over its error scale, plus the lookup use's identity (a ridge towards rounding)."""
    Hs = shrink(H, tokens)
    if lookup is not None:
        Wf = W.astype(F32)
        head_scale = float(((Wf @ mx.array(Hs[0])) * Wf).sum().item())
        Hs = Hs / head_scale + (lookup / float((Wf * Wf).sum().item())) * np.eye(H.shape[-1], dtype=np.float32)
    return tuple(a[0] for a in _gptq(W[None], Hs.astype(np.float32), choice, dtype))


def head_trial(W: mx.array, halves, choice: dict, dtype, lookup: Optional[float] = None):
    """Round-to-nearest of the table ``W`` [V, D] (a head; with ``lookup``, a tied one), the rows in
    which GPTQ fitted on the first half of the calibration text beats rounding on the second, and
    the errors (``head_error``) there of rounding and of that per-row mix."""
    if choice.get("mode", "affine") != "affine":
        raise ValueError(f"GPTQ quantizes affine grids, not {choice['mode']}")
    (Ha, na), (Hb, _) = halves
    rtn = tuple(mx.quantize(W.astype(dtype), group_size=choice["group_size"], bits=choice["bits"]))
    trial = _head_gptq(W, Ha, na, choice, dtype, lookup)
    e_rtn = head_row_errors(W, _dequantize(rtn, choice), Hb, lookup)
    e_gptq = head_row_errors(W, _dequantize(trial, choice), Hb, lookup)
    rows = e_gptq < e_rtn
    return rtn, rows, (float(e_rtn.sum().item()), float(mx.minimum(e_rtn, e_gptq).sum().item()))


def quantize_head(W: mx.array, halves, choice: dict, dtype, lookup: Optional[float] = None):
    """The table ``W`` [V, D] quantized for its head use (and, with ``lookup``, its lookups): GPTQ
    refitted on both halves of the calibration text in the rows where ``head_trial`` found it
    better than rounding on held-out calibration tokens, rounding elsewhere. Returns ((packed
    weight, scales, biases), how many rows kept GPTQ, (error of rounding, of the mix) there)."""
    rtn, rows, errs = head_trial(W, halves, choice, dtype, lookup)
    n = int(rows.sum().item())
    if n == 0:
        return rtn, 0, errs
    (Ha, na), (Hb, nb) = halves
    return _mix_rows(rows, _head_gptq(W, Ha + Hb, na + nb, choice, dtype, lookup), rtn), n, errs


def _mix_rows(rows: mx.array, gptq_triple, rtn_triple) -> tuple:
    return tuple(mx.where(rows.reshape(-1, 1), g, r.astype(g.dtype)) for g, r in zip(gptq_triple, rtn_triple))


class _Catcher(nn.Module):
    """Wraps a linear: keeps its inputs (a reference, no copy: [N, D] each, far smaller than a
    [D, D] Hessian while calibration tokens number fewer than a few widths) while computing as
    it did, so each linear's Hessian can be formed only when that linear is quantized."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module
        self.inputs: list = []

    def __call__(self, x, *args, **kwargs):
        self.inputs.append(x)
        return self.module(x, *args, **kwargs)

    def halves(self) -> list:
        return hessian_halves(self.inputs)


def _linear_hessians(block: Block, x: mx.array, names: list[str]):
    """Yields path -> the two halves' (H [1, D, D], tokens [1]) of each plain linear in ``names``,
    from one pass of ``x`` [B, L, D], one linear's at a time (the caller frees each before the next)."""
    leaves = dict(tree_flatten(block.leaf_modules(), is_leaf=nn.Module.is_module))
    catchers = [(n, _Catcher(leaves[n])) for n in names]
    block.update_modules(tree_unflatten(catchers))
    try:
        mx.eval(block(x))
    finally:
        block.update_modules(tree_unflatten([(n, c.module) for n, c in catchers]))
    for n, c in catchers:
        yield n, c.halves()
        c.inputs = []


def _prior_hessian(own: mx.array, every: mx.array, prior: float) -> tuple[mx.array, float]:
    """``own^T own`` plus ``every``'s Hessian weighted as ``prior`` tokens, and the token count."""
    return own.T @ own + (prior / every.shape[0]) * (every.T @ every), own.shape[0] + prior


def _expert_hessians(moe: SparseMoE, f: mx.array, min_tokens: int):
    """Per chunk of experts: (first expert, w1/w3's halves, w2's halves), each half a pair
    (H [C, D or F, D or F], tokens [C]) from the even or the odd calibration tokens.

    An expert's own (token, expert) pairs rarely number more than its input width, too few to
    pin down a Hessian, so each is shrunk towards the expert's Hessian over every calibration
    token, weighted as ``PRIOR`` times the input width in tokens: an expert that sees many
    tokens is fitted on its own, one that sees few mostly on the text at large."""
    tok, exp, _ = expert_pairs(moe, f, min_tokens)
    ex = moe.experts
    E, F, D = ex.w1.weight.shape
    for lo in range(0, E, EXPERT_CHUNK):
        h13, h2 = [[], []], [[], []]
        for e in range(lo, min(E, lo + EXPERT_CHUNK)):
            w1, w3 = ex.w1.weight[e].astype(F32).T, ex.w3.weight[e].astype(F32).T
            for p in (0, 1):
                mine, every = tok[(exp == e) & (tok % 2 == p)], f[p::2]
                fe = f[mx.array(mine)] if len(mine) else mx.zeros((0, D))
                he, ha = swiglu(fe @ w1, fe @ w3), swiglu(every @ w1, every @ w3)  # [n_e, F], [N/2, F]
                h13[p].append(_prior_hessian(fe, every, PRIOR * D / 2))
                h2[p].append(_prior_hessian(he, ha, PRIOR * F / 2))
                mx.eval(h13[p][-1][0], h2[p][-1][0])
        yield lo, *[[(np.stack([np.array(h) for h, _ in hs[p]]), np.array([n for _, n in hs[p]], np.float32))
                     for p in (0, 1)] for hs in (h13, h2)]


def quantize_block(block: Block, x: mx.array, choice: Callable, min_tokens: int = 16) -> dict:
    """GPTQ of every quantized weight of ``block`` (unquantized, AWQ scales already folded)
    from its input ``x`` [B, L, D]: (path -> (weight, scales, biases) for ``install``, (weights
    or experts that kept GPTQ, out of how many)). The router and paths not quantized, or not
    affine, are left to plain quantization."""
    x = x.astype(F32)
    dtype = block.operator_norm.weight.dtype
    out, kept = {}, []

    def wanted(path, m):
        c = choice(path, m)
        return c if isinstance(c, dict) and c.get("mode", "affine") == "affine" and not is_router(path) else None

    leaves = dict(tree_flatten(block.leaf_modules(), is_leaf=nn.Module.is_module))
    plain = [n for n, m in leaves.items() if isinstance(m, nn.Linear) and wanted(n, m)]
    for n, halves in _linear_hessians(block, x, plain):
        *triple, keep = quantize_weight(leaves[n].weight[None], halves, wanted(n, leaves[n]), dtype)
        del halves
        out[n] = tuple(a[0] for a in triple)
        mx.eval(out[n])
        kept.append(keep)
    ffn = block.feed_forward
    if isinstance(ffn, SparseMoE):
        h = x + block.op(block.operator_norm(x), None)
        f = block.ffn_norm(h).reshape(-1, x.shape[-1])
        base = "feed_forward.experts."
        todo = {n: wanted(base + n, getattr(ffn.experts, n)) for n in ("w1", "w3", "w2")}
        parts = {n: [] for n in todo if todo[n]}
        for lo, h13, h2 in _expert_hessians(ffn, f, min_tokens):
            for n in parts:
                w = getattr(ffn.experts, n).weight[lo:lo + h13[0][0].shape[0]]
                *triple, keep = quantize_weight(w, h2 if n == "w2" else h13, todo[n], dtype)
                mx.eval(triple)
                parts[n].append(triple)
                kept.append(keep)
        for n, chunks in parts.items():
            out[base + n] = tuple(mx.concatenate(list(a), 0) for a in zip(*chunks))
    kept = np.concatenate(kept) if kept else np.zeros(0, bool)
    return out, (int(kept.sum()), int(kept.size))


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
