"""Calibrated quantization that streams: the model is never whole in memory.

Conversion loads one layer at a time; this module carries the calibration text's hidden
states through each layer as it passes, so the calibrated methods need only the layer at hand:

* ``x``: calibration hidden states through the unquantized layers (what AWQ fits on, and what
  the sensitivity pass measures each path's error against);
* ``h_fp`` / ``h_q``: held-out hidden states through the unquantized and the quantized layers;
  at the head they give the KL(unquantized || quantized) and top-1 agreement the card reports.

Dimensions: B sequences, L tokens each, D hidden, V vocabulary, N = B * L.
"""

from __future__ import annotations

from typing import Callable, Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..model.blocks import Block
from . import awq, gptq
from .calibrate import CalibrationSet
from .quantize import fake_quantize

EMBED, HEAD = "model.embed_tokens", "lm_head"
SAMPLE_ROWS = 8192  # of the vocabulary: the head's sensitivity is measured on these rows


def embed_rows(embed_weight: mx.array, ids: np.ndarray, choice=None) -> mx.array:
    """The embedding of ``ids`` [B, L] as float32 [B, L, D], through its quantization if any."""
    rows = embed_weight[mx.array(ids)]
    if isinstance(choice, dict):  # groups run along D, so quantizing rows = quantizing the table
        rows = fake_quantize(rows, choice)
    return rows.astype(mx.float32)


class LayerwiseQuantizer:
    """Hooks around each group's quantization in ``conversion`` (see ``before`` / ``after``)."""

    def __init__(self, calib: CalibrationSet, predicate: Callable, method: str, min_expert_tokens: int = 16,
                 head: Optional[tuple] = None):
        self.calib, self.predicate = calib, predicate
        self.head = head  # (path, choice, (weight, scales, biases), kept, errors): the head's GPTQ, if any
        self.use_awq, self.use_gptq = method in ("awq", "awq-gptq"), method in ("gptq", "awq-gptq")
        self.gptq: dict = {}  # path -> GPTQ's (weight, scales, biases) for the group being converted
        self.gptq_kept = [0, 0]  # weights (an expert counts as one) where GPTQ beat rounding, of all
        self.min_expert_tokens = min_expert_tokens
        self.x = self.h_fp = self.h_q = None
        self.head_fp: Optional[mx.array] = None
        self.result: dict = {}
        self.coverage: list[int] = []  # per MoE layer: experts that calibration tokens were routed to

    def start(self, embed_weight: mx.array, embed_choice) -> None:
        """Embed the calibration and held-out text (``embed_choice``: the embedding's quantization)."""
        self.x = embed_rows(embed_weight, self.calib.calibration)
        self.h_fp = embed_rows(embed_weight, self.calib.held_out)
        if self.head is not None and self.head[0] == EMBED:  # the tied table's head GPTQ, looked up
            _, choice, triple, _, _ = self.head
            table = mx.dequantize(*triple, group_size=choice["group_size"], bits=choice["bits"])
            self.h_q = table[mx.array(self.calib.held_out)].astype(mx.float32)
        else:
            self.h_q = embed_rows(embed_weight, self.calib.held_out, embed_choice)
        mx.eval(self.x, self.h_fp, self.h_q)

    def before(self, module: nn.Module, prefix: str) -> None:
        """The group is loaded unquantized: advance the unquantized streams, fit AWQ scales,
        then GPTQ's weights (installed by ``after`` once the group is quantized)."""
        if not isinstance(module, Block):  # embeddings, final norm, head
            head = module.lm_head if "lm_head" in module else module.model.embed_tokens
            self.head_fp = mx.array(head.weight)
            mx.eval(self.head_fp)
            return
        x_next, self.h_fp = module(self.x), module(self.h_fp)
        mx.eval(x_next, self.h_fp)
        choices = lambda path, m: self.predicate(prefix + path, m)  # noqa: E731
        if self.use_awq:
            covered = awq.scale_block(module, self.x, choices, self.min_expert_tokens)
            if covered is not None:
                self.coverage.append(covered)
        if self.use_gptq:
            self.gptq, (kept, total) = gptq.quantize_block(module, self.x, choices, self.min_expert_tokens)
            self.gptq_kept = [self.gptq_kept[0] + kept, self.gptq_kept[1] + total]
        self.x = x_next

    def after(self, module: nn.Module, prefix: str) -> None:
        """The group is quantized: advance the quantized stream; at the head, measure."""
        if isinstance(module, Block):
            gptq.install(module, self.gptq)
            self.gptq = {}
            self.h_q = module(self.h_q)
            mx.eval(self.h_q)
            return
        norm = module.model.embedding_norm
        head = module.lm_head if "lm_head" in module else module.model.embed_tokens
        if self.head is not None:
            path, _, (w, s, b), kept, (e_rtn, e_gptq) = self.head
            if head.weight.shape != w.shape or head.scales.shape != s.shape:
                raise AssertionError(f"{path}: GPTQ made {w.shape}/{s.shape}, the head holds "
                                     f"{head.weight.shape}/{head.scales.shape}")
            head.weight, head.scales, head.biases = w, s.astype(head.scales.dtype), b.astype(head.biases.dtype)
            self.result["head_gptq"] = (f"{kept} of {w.shape[0]} rows: relative error {e_gptq:.4g} against "
                                        f"round-to-nearest's {e_rtn:.4g} on held-out calibration tokens")
        self.result.update(kl_and_agreement(norm(self.h_fp), norm(self.h_q), self.head_fp, dequantized(head)))
        if self.use_gptq:
            self.result["gptq_kept"] = f"{self.gptq_kept[0]} of {self.gptq_kept[1]}"
        self.head_fp = None


def dequantized(layer: nn.Module) -> mx.array:
    """The weight a (possibly quantized) linear or embedding computes with: one float matmul
    over the vocabulary is far cheaper on the CPU than a quantized one per row."""
    if "scales" not in layer:
        return layer.weight
    return mx.dequantize(layer.weight, layer.scales, layer.get("biases"), group_size=layer.group_size,
                         bits=layer.bits, mode=layer.mode)


def kl_and_agreement(h_fp: mx.array, h_q: mx.array, head_fp: mx.array, head_q: mx.array, chunk: int = 128) -> dict:
    """Mean KL(p_fp || p_q) and top-1 agreement of the next-token distributions, ``chunk``
    positions at a time (a [chunk, V] slice of logits is the largest thing made)."""
    D = h_fp.shape[-1]
    h_fp, h_q = h_fp.reshape(-1, D), h_q.reshape(-1, D)
    kl_sum, agree = 0.0, 0
    for lo in range(0, h_fp.shape[0], chunk):
        lp = nn.log_softmax((h_fp[lo:lo + chunk] @ head_fp.astype(mx.float32).T).astype(mx.float32), axis=-1)
        lq = nn.log_softmax((h_q[lo:lo + chunk] @ head_q.astype(mx.float32).T).astype(mx.float32), axis=-1)
        kl = (mx.exp(lp) * (lp - lq)).sum(-1)
        same = (lp.argmax(-1) == lq.argmax(-1)).sum()
        mx.eval(kl, same)
        kl_sum += kl.sum().item()
        agree += same.item()
    n = h_fp.shape[0]
    return {"kl": kl_sum / n, "top1_agreement": agree / n, "held_out_tokens": n}


def prepare(src, args, files, dtype, predicate: Callable, method: str, target_bpw: Optional[float],
            calibration, calibration_tokens: int, default: dict):
    """For a calibrated conversion: the tokenized calibration text, a first streaming pass over
    ``files`` when ``target_bpw`` is set (the sensitivity pass) or the head is GPTQ'd (it needs the
    final hidden states, and a tied table is looked up first), the head's GPTQ, and the hooks,
    started on the embeddings. Returns ``(hooks, predicate, plan)`` (``plan``: path -> choice, or None)."""
    import dataclasses

    from ..model.blocks import Model
    from ..text.tokenizer import load_tokenizer
    from . import sensitivity
    from .calibrate import load_calibration
    from .layouts import load_group, load_safetensors
    from .quantize import plan_predicate

    tokenizer = load_tokenizer(src, args)
    calib = load_calibration(tokenizer, args.vocab_size, calibration, tokens=calibration_tokens,
                             held_out_tokens=max(64, calibration_tokens // 2))
    source = {}  # a lazy view of the checkpoint of its own: nothing read stays cached
    for f in files:
        source.update(load_safetensors(f))
    rest = Model(dataclasses.replace(args, num_hidden_layers=0, layer_types=[]))
    embed_weight = source["model.embed_tokens.weight"].astype(dtype)
    head = _Head(rest, source, embed_weight, calib, args, dtype, method in ("gptq", "awq-gptq"), predicate)

    def blocks():
        for i in range(args.num_hidden_layers):
            prefix = f"model.layers.{i}."
            block = Block(args, i)
            load_group(block, prefix, {k: source.pop(k) for k in list(source) if k.startswith(prefix)}, args, dtype)
            yield prefix, block

    x0 = embed_rows(embed_weight, calib.calibration)
    x0_q = embed_rows(embed_weight, calib.calibration, head.table_choice) if head.table_choice else None
    plan = None
    if target_bpw is not None:
        total = sum(w.size for w in source.values())
        dtype_bits = 8 * mx.zeros((), dtype).itemsize
        options = sensitivity.candidates(default["mode"], default["group_size"])
        plan, _ = sensitivity.plan(blocks(), x0, options, target_bpw, total,
                                   lambda x, xq: head.errors(x, xq, options, predicate),
                                   lambda p, m: bool(predicate(p, m)), dtype_bits, x0_q)
        predicate = plan_predicate(plan, predicate)
    elif head.gptq and predicate(head.path, head.module):
        x, xq = x0, x0_q
        for _, block in blocks():
            x, xq = block(x), None if xq is None else block(xq)
            mx.eval(x, xq)
        head.inputs(x, xq)
    hooks = LayerwiseQuantizer(calib, predicate, method, head=head.quantize(predicate(head.path, head.module)))
    hooks.start(embed_weight, predicate(EMBED, rest.model.embed_tokens))
    return hooks, predicate, plan


class _Head:
    """The head of a calibrated conversion: its inputs' Hessians (the final-normed calibration
    hidden states, from the first pass), its measured sensitivity per candidate precision (both
    uses of a tied table), and its GPTQ.

    A lookup's error reaches the logits through every layer, the head's directly, so the two
    uses are weighed by measurement: the first pass also carries the calibration text from the
    round-to-nearest table's rows, and ``lookup`` is the relative error that makes in the logits
    over the relative error of those rows (on random few-layer models ~4x the head's)."""

    def __init__(self, rest, source: dict, embed_weight: mx.array, calib: CalibrationSet, args, dtype, gptq: bool,
                 predicate: Callable):
        self.tied = "lm_head" not in rest
        self.path, self.module = (EMBED, rest.model.embed_tokens) if self.tied else (HEAD, rest.lm_head)
        choice = predicate(EMBED, rest.model.embed_tokens)  # the table's rounding, measured in ``inputs``
        self.table_choice = choice if isinstance(choice, dict) else None
        self.weight = embed_weight if self.tied else source["lm_head.weight"].astype(dtype)
        self.embed, self.embed_module = embed_weight, rest.model.embed_tokens
        self.norm = source["model.embedding_norm.weight"].astype(mx.float32)
        self.ids = mx.array(calib.calibration.ravel())
        V = embed_weight.shape[0]  # the rows the sensitivity is measured on: rows are independent in both uses
        self.rows = mx.array(np.sort(np.random.default_rng(0).choice(V, min(V, SAMPLE_ROWS), replace=False)))
        self.args, self.dtype, self.gptq, self.halves, self.lookup = args, dtype, gptq, None, 1.0

    def inputs(self, x: mx.array, x_q: Optional[mx.array]) -> None:
        """Take the final hidden states of the calibration text through the unquantized layers,
        from the unquantized table (``x``) and from its rounded rows (``x_q``, None: not quantized)."""
        D = x.shape[-1]
        h = mx.fast.rms_norm(x.reshape(-1, D).astype(mx.float32), self.norm, self.args.norm_eps)
        self.halves = gptq.head_halves(h)
        if x_q is None:
            return
        d = mx.fast.rms_norm(x_q.reshape(-1, D).astype(mx.float32), self.norm, self.args.norm_eps) - h
        W = self.weight[self.rows].astype(mx.float32)
        WtW = W.T @ W  # the logits' squared norm of a hidden state z is z WtW z (a row sample's: a ratio)
        logits_err = ((d @ WtW) * d).sum() / ((h @ WtW) * h).sum()
        rows = self.embed[self.ids].astype(mx.float32)
        looked_up = ((embed_rows(self.embed, self.ids[None], self.table_choice)[0] - rows) ** 2).sum() / (rows ** 2).sum()
        self.lookup = float((logits_err / mx.maximum(looked_up, 1e-12)).item())

    def errors(self, x: mx.array, x_q: Optional[mx.array], options: list, predicate: Callable) -> dict:
        """``sensitivity.plan``'s ``ends``: path -> (weights, relative logit error per option) for
        the embedding and the head, the head's the lower of round-to-nearest's and (with GPTQ)
        GPTQ's per row on held-out calibration tokens, a tied table's over both its uses."""
        self.inputs(x, x_q)
        out = {}
        lookup = self.lookup if self.tied else None
        if predicate(self.path, self.module):
            W, errs = self.weight[self.rows], []
            for c in options:
                if W.shape[-1] % c["group_size"]:
                    errs.append(float("inf"))
                elif self.gptq and c.get("mode", "affine") == "affine":
                    errs.append(gptq.head_trial(W, self.halves, c, self.dtype, lookup)[2][1])
                else:
                    errs.append(gptq.head_error(W, fake_quantize(W, c).astype(mx.float32), self.halves[1][0], lookup))
            out[self.path] = (self.weight.size, errs)
        if not self.tied and predicate(EMBED, self.embed_module):
            E = self.embed[self.rows]
            out[EMBED] = (self.embed.size, [float("inf") if E.shape[-1] % c["group_size"] else gptq.head_error(
                E, fake_quantize(E, c).astype(mx.float32), None, self.lookup) for c in options])
        return out

    def quantize(self, choice) -> Optional[tuple]:
        """(path, choice, (weight, scales, biases), kept, errors) of the head's GPTQ, or None."""
        if not (self.gptq and isinstance(choice, dict) and choice.get("mode", "affine") == "affine"):
            return None
        triple, kept, errs = gptq.quantize_head(self.weight, self.halves, choice, self.dtype,
                                                self.lookup if self.tied else None)
        mx.eval(triple)
        return self.path, choice, triple, kept, errs
