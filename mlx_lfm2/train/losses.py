"""Losses that never hold the full logits: the LM head and cross-entropy run per chunk of
positions, each chunk under ``mx.checkpoint`` so the backward pass recomputes its logits
instead of keeping them (a 65,536-row vocabulary at batch 4 x 2048 is 2.1 GB of float32
logits, plus as much again for their gradient; a 512-position chunk is 1/16 of that).

* ``sft_loss``: token-weighted mean cross-entropy over the trained targets (mlx-lm's
  ``default_loss``, without materialising ``[B, T, V]``);
* ``dpo_loss``: DPO (Rafailov et al.) with the reference = the same model, adapters off.

Dimensions: B rows, T positions, D hidden, V vocabulary, C positions per chunk.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ..model.lora import adapters_off
from .packing import Batch, packed

CHUNK = 512


def head(model, h: mx.array) -> mx.array:
    """Logits for hidden states ``h`` (the tied embedding or ``lm_head``)."""
    return model.lm_head(h) if "lm_head" in model else model.model.embed_tokens.as_linear(h)


def hidden(model, batch: Batch) -> mx.array:
    """The final normed hidden states ``[B, T, D]`` (packed rows: documents kept apart)."""
    with packed(model, batch) as cache:
        return model.model(batch.inputs, cache)


def token_logprobs(model, h: mx.array, targets: mx.array, chunk: int = CHUNK) -> mx.array:
    """``log p(target)`` per position ``[B, T]`` (float32), the head applied C positions at a time."""

    def piece(params, hc, tc):
        model.update(params)
        logits = head(model, hc).astype(mx.float32)  # [B, C, V]
        picked = mx.take_along_axis(logits, mx.stop_gradient(tc)[..., None], axis=-1)[..., 0]
        return picked - mx.logsumexp(logits, axis=-1)

    params = model.trainable_parameters()
    step = mx.checkpoint(piece)
    T = h.shape[1]
    outs = [step(params, h[:, i:i + chunk], targets[:, i:i + chunk]) for i in range(0, T, chunk)]
    return outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=1)


def sft_loss(model, batch: Batch, chunk: int = CHUNK):
    """``(mean cross-entropy over trained targets, number of them)``."""
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
