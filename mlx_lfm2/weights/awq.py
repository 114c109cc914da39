"""Activation-aware weight scaling (AWQ), per layer and per expert.

A weight column that meets large activations matters more than one that meets small ones,
yet round-to-nearest treats them alike. AWQ multiplies such columns by ``s`` before quantizing
(``W x = (W diag(s)) (x / s)``) and divides the input by ``s`` where it is made, so the
unquantized function is unchanged and the important columns get finer steps. ``s`` is
``mean|x| ** alpha`` with ``alpha`` searched on the calibration activations to minimise the
quantized outputs' error (``alpha = 0`` is plain round-to-nearest, so the fit is never worse
than it on the calibration text). Where ``1 / s`` goes:

* ``operator_norm`` -> q/k/v projections or the conv's ``in_proj``: into the norm's weight;
* ``ffn_norm`` -> w1/w3 (dense), or every expert's w1/w3 and the router: into the norm's weight
  (one ``s`` for all experts, fitted on the (token, expert) pairs the router makes);
* w3 -> w2 (``w2 (silu(w1 x) * w3 x)``): into w3's rows, one ``s`` per expert, fitted on
  that expert's tokens.

Mixture of experts: each expert sees ~K/E of the tokens, and some none. The pairs used here are
the router's choices plus, for an expert with fewer than ``min_tokens``, the tokens it scores
highest, so every expert's scales are fitted on real activations of its own kind.

Dimensions: N tokens, D hidden, E experts, F expert width, P (token, expert) pairs.
"""

from __future__ import annotations

from typing import Callable, Optional

import mlx.core as mx
import numpy as np

from ..model.blocks import Block, SparseMoE
from ..model.experts import swiglu
from .quantize import fake_quantize

GRID = [i / 10 for i in range(10)]
F32 = mx.float32


def _scales(stat: mx.array, alpha: float) -> mx.array:
    """``stat ** alpha`` normalised so that its largest and smallest entries straddle 1."""
    s = mx.maximum(stat, 1e-5) ** alpha
    return s / mx.sqrt(s.max(-1, keepdims=True) * s.min(-1, keepdims=True))


def _fold_into_norm(norm, linears: list, s: mx.array) -> None:
    norm.weight = (norm.weight.astype(F32) / s).astype(norm.weight.dtype)
    for lin in linears:
        lin.weight = (lin.weight.astype(F32) * s).astype(lin.weight.dtype)


def _fit_shared(x: mx.array, targets: list, apply: Callable) -> mx.array:
    """The ``s`` [D] minimising the summed error of ``apply(x, W, choice)`` over ``targets``
    ((weight, choice) pairs; choice False: kept unquantized, scaled exactly)."""
    stat = mx.abs(x).mean(0)
    refs = [apply(x, w.astype(F32)) for w, c in targets if c]
    best, best_err = mx.ones_like(stat), float("inf")
    for alpha in GRID:
        s = _scales(stat, alpha)
        err = sum(((apply(x / s, fake_quantize(w.astype(F32) * s, c)) - r) ** 2).sum()
                  for (w, c), r in zip([t for t in targets if t[1]], refs))
        err = float(err.item()) if isinstance(err, mx.array) else 0.0
        if err < best_err:
            best, best_err = s, err
    return best


def expert_pairs(moe: SparseMoE, f: mx.array, min_tokens: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(token, expert) pairs sorted by expert: the router's top-k, topped up to ``min_tokens`` per
    expert with the tokens that score it highest; and how many experts the router chose at all."""
    probs = mx.sigmoid(moe.gate(f).astype(F32))  # [N, E]
    choice = probs + moe.expert_bias if "expert_bias" in moe else probs
    top = mx.argpartition(choice, kth=-moe.top_k, axis=-1)[:, -moe.top_k:]
    top, score = np.array(top), np.array(choice)
    N, E = score.shape
    chosen = np.zeros((N, E), dtype=bool)
    chosen[np.arange(N)[:, None], top] = True
    covered = int(chosen.any(0).sum())
    for e in np.flatnonzero(chosen.sum(0) < min_tokens):
        chosen[np.argsort(-score[:, e])[:min_tokens], e] = True
    exp, tok = np.nonzero(chosen.T)  # expert-major: sorted by expert
    return tok.astype(np.uint32), exp.astype(np.uint32), covered


def _stack_apply(tok: np.ndarray, exp: np.ndarray):
    """``apply(x [N, D] or pairs [P, D], W [E, O, D]) -> [P, O]`` over the pairs."""
    t, e = mx.array(tok), mx.array(exp)

    def apply(x, w, per_pair=False):
        xp = x if per_pair else x[t]
        return mx.gather_mm(xp[:, None, :], w.swapaxes(-1, -2), rhs_indices=e, sorted_indices=True)[:, 0]

    return apply


def _fit_down(h: mx.array, w2: mx.array, choice, exp: np.ndarray, E: int) -> mx.array:
    """Per expert, the ``s`` [E, F] for w2's input (``h`` [P, F] the pairs' hidden activations)."""
    apply = _stack_apply(np.zeros(len(exp), np.uint32), exp)
    counts = np.maximum(np.bincount(exp, minlength=E), 1)[:, None]
    stat = np.zeros((E, h.shape[-1]), np.float32)
    np.add.at(stat, exp, np.abs(np.array(h)))
    stat = mx.array(stat / counts)
    w2 = w2.astype(F32)
    ref = apply(h, w2, per_pair=True)
    best, best_err = mx.ones_like(stat), np.full(E, np.inf)
    for alpha in GRID:
        s = _scales(stat, alpha)
        y = apply(h / s[mx.array(exp)], fake_quantize(w2 * s[:, None, :], choice), per_pair=True)
        per_pair = np.array(((y - ref) ** 2).sum(-1))
        err = np.zeros(E)
        np.add.at(err, exp, per_pair)
        better = err < best_err
        best = mx.where(mx.array(better)[:, None], s, best)
        best_err = np.where(better, err, best_err)
    return best


def scale_block(block: Block, x: mx.array, choice: Callable, min_tokens: int = 16) -> Optional[int]:
    """Fit and fold AWQ scales into ``block`` (unquantized, in place) from its input ``x``
    [B, L, D]; ``choice(path, module)`` is each weight's quantization. Returns how many experts
    the router chose on the calibration text (None for a dense layer)."""
    D = x.shape[-1]
    x = x.astype(F32)
    a = block.operator_norm(x)  # [B, L, D]: the operator mixes positions within a sequence
    if block.is_attention:
        at = block.self_attn
        names = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]
        linears = [at.q_proj, at.k_proj, at.v_proj]
        h = x + at(a, None)
    else:
        names, linears = ["conv.in_proj"], [block.conv.in_proj]
        h = x + block.conv(a, None)
    a, h = a.reshape(-1, D), h.reshape(-1, D)
    plain = lambda xx, w: xx @ w.T  # noqa: E731
    s = _fit_shared(a, [(l.weight, choice(n, l)) for n, l in zip(names, linears)], plain)
    _fold_into_norm(block.operator_norm, linears, s)

    f = block.ffn_norm(h)
    ffn = block.feed_forward
    if isinstance(ffn, SparseMoE):
        tok, exp, covered = expert_pairs(ffn, f, min_tokens)
        w1, w3, w2 = ffn.experts.w1, ffn.experts.w3, ffn.experts.w2
        base, extra = "feed_forward.experts.", [ffn.gate]
    else:
        tok, exp, covered = np.arange(f.shape[0], dtype=np.uint32), np.zeros(f.shape[0], np.uint32), None
        w1, w3, w2 = ffn.w1, ffn.w3, ffn.w2
        base, extra = "feed_forward.", []
    stack = (lambda w: w) if w1.weight.ndim == 3 else (lambda w: w[None])
    apply = _stack_apply(tok, exp)
    targets = [(stack(w1.weight), choice(base + "w1", w1)), (stack(w3.weight), choice(base + "w3", w3))]
    s = _fit_shared(f, targets, apply)
    _fold_into_norm(block.ffn_norm, [w1, w3, *extra], s)

    c2 = choice(base + "w2", w2)
    if c2:
        fs = f / s
        hid = swiglu(apply(fs, stack(w1.weight).astype(F32)), apply(fs, stack(w3.weight).astype(F32)))
        s2 = _fit_down(hid, stack(w2.weight), c2, exp, stack(w2.weight).shape[0])  # [E, F]
        w3_s = (stack(w3.weight).astype(F32) / s2[:, :, None]).astype(w3.weight.dtype)
        w2_s = (stack(w2.weight).astype(F32) * s2[:, None, :]).astype(w2.weight.dtype)
        w3.weight, w2.weight = (w3_s, w2_s) if w1.weight.ndim == 3 else (w3_s[0], w2_s[0])
    mx.eval(block.parameters())
    return covered
