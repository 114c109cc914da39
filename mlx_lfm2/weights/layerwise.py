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


def embed_rows(embed_weight: mx.array, ids: np.ndarray, choice=None) -> mx.array:
    """The embedding of ``ids`` [B, L] as float32 [B, L, D], through its quantization if any."""
    rows = embed_weight[mx.array(ids)]
    if isinstance(choice, dict):  # groups run along D, so quantizing rows = quantizing the table
        rows = fake_quantize(rows, choice)
    return rows.astype(mx.float32)


class LayerwiseQuantizer:
    """Hooks around each group's quantization in ``conversion`` (see ``before`` / ``after``)."""

    def __init__(self, calib: CalibrationSet, predicate: Callable, method: str, min_expert_tokens: int = 16):
        self.calib, self.predicate = calib, predicate
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
        self.result = kl_and_agreement(norm(self.h_fp), norm(self.h_q), self.head_fp, dequantized(head))
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
    """For a calibrated conversion: the tokenized calibration text, the sensitivity pass when
    ``target_bpw`` is set (a first streaming pass over ``files``), and the hooks, started on
    the embeddings. Returns ``(hooks, predicate, plan)`` (``plan``: path -> choice, or None)."""
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

    def fresh() -> dict:  # a lazy view of the checkpoint of its own: nothing read stays cached
        source = {}
        for f in files:
            source.update(load_safetensors(f))
        return source

    rest = Model(dataclasses.replace(args, num_hidden_layers=0, layer_types=[]))
    source = fresh()
    embed_weight = source["model.embed_tokens.weight"].astype(dtype)
    plan = None
    if target_bpw is not None:
        def blocks():
            for i in range(args.num_hidden_layers):
                prefix = f"model.layers.{i}."
                block = Block(args, i)
                load_group(block, prefix, {k: source.pop(k) for k in list(source) if k.startswith(prefix)},
                           args, dtype)
                yield prefix, block

        x0 = embed_rows(embed_weight, calib.calibration)
        total = sum(w.size for w in source.values())
        dtype_bits = 8 * mx.zeros((), dtype).itemsize
        options = sensitivity.candidates(default["mode"], default["group_size"])
        ends = _ends_errors(source, args, dtype, embed_weight, calib, options, predicate, rest)
        plan, _ = sensitivity.plan(blocks(), x0, options, target_bpw, total, ends,
                                   lambda p, m: bool(predicate(p, m)), dtype_bits)
        predicate = plan_predicate(plan, predicate)
    hooks = LayerwiseQuantizer(calib, predicate, method)
    hooks.start(embed_weight, predicate(EMBED, rest.model.embed_tokens))
    return hooks, predicate, plan


def _ends_errors(source: dict, args, dtype, embed_weight, calib, options, predicate, rest, head_tokens: int = 256):
    """``ends(final hidden states) -> {path: (weights, errors)}`` for the embedding and the head."""
    from . import sensitivity

    def ends(x: mx.array) -> dict:
        ids = mx.array(calib.calibration)
        out = {}
        if predicate(EMBED, rest.model.embed_tokens):
            out[EMBED] = [embed_weight.size, sensitivity.relative_errors(
                embed_weight[ids], lambda w: w[ids], embed_weight, options)]
        norm = source["model.embedding_norm.weight"].astype(mx.float32)
        h = mx.fast.rms_norm(x.reshape(-1, x.shape[-1])[:head_tokens], norm, args.norm_eps)
        tied = "lm_head" not in rest
        head, path = (embed_weight, EMBED) if tied else (source["lm_head.weight"].astype(dtype), HEAD)
        if predicate(path, rest.model.embed_tokens if tied else rest.lm_head):
            errs = sensitivity.relative_errors(h @ head.T, lambda w: h @ w.T, head, options)
            if path in out:
                out[path][1] = [a + b for a, b in zip(out[path][1], errs)]
            else:
                out[path] = [head.size, errs]
        return {p: tuple(v) for p, v in out.items()}

    return ends
