"""Losses that never hold the full logits (a 65,536-row vocabulary at batch 4 x 2048 is 2.1 GB
of float32 logits, plus as much again for their gradient): the LM head and cross-entropy run
``CHUNK`` rows at a time.

* ``sft_loss``: token-weighted mean cross-entropy over the trained targets (mlx-lm's
  ``default_loss``). With a frozen head (LoRA) only the trained positions reach the head
  (a masked prompt costs no head matmul) and ``fused_cross_entropy`` computes the gradient
  for the hidden states in the forward pass; a trained head takes ``token_logprobs``, each
  chunk under ``mx.checkpoint`` (its logits recomputed in the backward pass);
* ``eval_loss``: the same value with no gradient work (validation);
* ``dpo_loss``: DPO (Rafailov et al.) with the reference = the same model, adapters off.

Dimensions: B rows, T positions, D hidden, V vocabulary, C positions per chunk.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..model import device
from ..model.lora import adapters_off
from .packing import Batch, packed

# Rows of logits at a time: 16 MiB of float32 at a 65,536-token vocabulary. A chunk's step
# holds about 13 arrays of its size at once (logits, softmax, its gradient, the split head's
# parts), so 256 rows peaked at 0.76 GB of transient over 1,024 rows (full logits: 1.1 GB)
# and 64 rows at 0.22 GB, in the same time (the head's matmuls cost per row either way).
CHUNK = 64


def head(model, h: mx.array) -> mx.array:
    """Logits for hidden states ``h`` (the tied embedding or ``lm_head``). A float tied
    embedding splits its rows across CPU streams (``device.split``), as quantized ones do
    after ``layers.specialize``: the same values, every core busy on MLX's CPU backend."""
    if "lm_head" in model:
        return model.lm_head(h)
    embed = model.model.embed_tokens
    if type(embed) is nn.Embedding and not embed.trainable_parameters():  # frozen: no weight gradient to gather
        w = embed.weight
        return device.split(lambda lo, hi: h @ w[lo:hi].T, w.shape[0], w.size)
    return embed.as_linear(h)


def hidden(model, batch: Batch) -> mx.array:
    """The final normed hidden states ``[B, T, D]`` (packed rows: documents kept apart)."""
    with packed(model, batch) as cache:
        return model.model(batch.inputs, cache)


def token_logprobs(model, h: mx.array, targets: mx.array, chunk: int = CHUNK) -> mx.array:
    """``log p(target)`` per position ``[B, T]`` (float32), the head applied to about ``chunk``
    rows (``chunk // B`` positions) at a time."""

    def piece(params, hc, tc):
        model.update(params)
        logits = head(model, hc).astype(mx.float32)  # [B, C, V]
        picked = mx.take_along_axis(logits, mx.stop_gradient(tc)[..., None], axis=-1)[..., 0]
        return picked - mx.logsumexp(logits, axis=-1)

    params = model.trainable_parameters()
    step = mx.checkpoint(piece)
    T, C = h.shape[1], max(1, chunk // h.shape[0])
    outs = [step(params, h[:, i:i + C], targets[:, i:i + C]) for i in range(0, T, C)]
    return outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=1)


def head_trains(model) -> bool:
    """Whether the LM head has trainable arrays (a LoRA on ``lm_head``, a full fine-tune)."""
    return any(k.startswith(("lm_head", "model.embed_tokens")) for k, _ in tree_flatten(model.trainable_parameters()))


def fused_cross_entropy(model, chunk: int = CHUNK):
    """``(h [N, D], targets [N], weights [N]) -> sum of weighted -log p(target)`` for a
    frozen head, with its gradient for ``h`` computed in the same pass over each chunk of
    ``chunk`` rows' logits (``softmax - onehot``, then the head's transpose): two head matmuls
    per row, as with full logits, instead of three for a recompute, and one chunk's logits
    alive at a time (each chunk waits on the one before, ``mx.depends``)."""

    def project(x):
        return head(model, x).astype(mx.float32)

    @mx.custom_function
    def nll(h, targets, weights):
        sums, grads, after = [], [], []
        for i in range(0, h.shape[0], chunk):
            hc = h[i:i + chunk]
            if after:
                hc = mx.depends(hc, after)
            tc, wc = targets[i:i + chunk, None], weights[i:i + chunk, None]
            logits = project(hc)  # [C, V]
            lse = mx.logsumexp(logits, axis=-1, keepdims=True)
            picked = mx.take_along_axis(logits, tc, axis=-1)
            sums.append(((lse - picked) * wc).sum())
            g = mx.exp(logits - lse) * wc  # d(sum)/d(logits): w * (softmax - onehot)
            g = mx.put_along_axis(g, tc, mx.take_along_axis(g, tc, axis=-1) - wc, axis=-1)
            grads.append(mx.vjp(project, [hc], [g])[1][0])
            after = [sums[-1], grads[-1]]
        return sum(sums[1:], sums[0]), (grads[0] if len(grads) == 1 else mx.concatenate(grads))

    @nll.vjp
    def nll_vjp(primals, cotangents, outputs):
        h, targets, weights = primals
        return (cotangents[0] * outputs[1]).astype(h.dtype), mx.zeros_like(targets), mx.zeros_like(weights)

    return lambda h, targets, weights: nll(h, targets, weights)[0]


def trained_rows(batch: Batch) -> mx.array:
    """The flat ``B * T`` indices of the positions with a trained target (read on the host:
    masked prompts and padding never reach the head)."""
    return mx.array(np.flatnonzero(np.array(batch.weights).reshape(-1) > 0).astype(np.int32))


def sft_loss(model, batch: Batch, chunk: int = CHUNK):
    """``(mean cross-entropy over trained targets, number of them)``."""
    n = batch.weights.sum()
    h = hidden(model, batch)
    if head_trains(model):
        total = -(token_logprobs(model, h, batch.targets, chunk) * batch.weights).sum()
    else:
        rows = trained_rows(batch)
        if rows.size == 0:
            return (h * 0).sum(), n
        flat = lambda x: x.reshape(-1, *x.shape[2:])[rows]
        total = fused_cross_entropy(model, chunk)(flat(h), flat(batch.targets), flat(batch.weights).astype(mx.float32))
    return total / mx.maximum(n, 1), n


def eval_loss(model, batch: Batch, chunk: int = CHUNK):
    """``sft_loss``'s value without any gradient work (validation)."""
    lp = token_logprobs(model, hidden(model, batch), batch.targets, chunk)
    n = batch.weights.sum()
    return -(lp * batch.weights).sum() / mx.maximum(n, 1), n


def full_logits_loss(model, batch: Batch):
    """The same loss through the model's full ``[B, T, V]`` logits (a check for ``sft_loss``)."""
    with packed(model, batch) as cache:
        logits = model(batch.inputs, cache).astype(mx.float32)
    ce = nn.losses.cross_entropy(logits, batch.targets)
    n = batch.weights.sum()
    return (ce * batch.weights).sum() / mx.maximum(n, 1), n


def sequence_logprobs(model, batch: Batch, chunk: int = CHUNK) -> mx.array:
    """Sum of trained-target log-probabilities per row ``[B]``."""
    return (token_logprobs(model, hidden(model, batch), batch.targets, chunk) * batch.weights).sum(axis=1)


def dpo_loss(model, chosen: Batch, rejected: Batch, beta: float = 0.1, chunk: int = CHUNK):
    """``-log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))`` averaged over pairs; the
    reference log-probabilities come from the model with every adapter switched off."""
    with adapters_off(model):
        ref_c = mx.stop_gradient(sequence_logprobs(model, chosen, chunk))
        ref_r = mx.stop_gradient(sequence_logprobs(model, rejected, chunk))
    margin = (sequence_logprobs(model, chosen, chunk) - ref_c) - (sequence_logprobs(model, rejected, chunk) - ref_r)
    loss = -nn.log_sigmoid(beta * margin).mean()
    return loss, mx.array(chosen.inputs.shape[0])
