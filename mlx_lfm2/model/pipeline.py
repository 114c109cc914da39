"""One model across processes (``mlx.launch``): pipeline parallelism over ``mx.distributed``.

Each rank owns one contiguous range of layers (a *stage*), sized so the ranks hold about the
same weight bytes, and only those weights are ever read (see ``weights.loader``). Stages run
in reverse rank order, as in mlx-lm: the highest rank embeds the tokens and runs the first
layers, rank 0 runs the last layers, the final norm and the head. So rank 0, the rank that
talks to the user or the network, has the real logits (and logprobs).

One forward call, per rank:

    rank r < size-1:  h = recv(from r+1)          rank size-1:  h = embed(tokens)
    h = own layers(h, own caches)
    rank r > 0:       send(h, to r-1); logits = a placeholder that depends on the send
    rank 0:           logits = head(norm(h))

Every rank runs the same token loop (``engine.decode.generate_step``): after sampling,
``share_token`` replaces each rank's token by rank 0's with an ``all_sum`` (rank 0 adds its
token, the others zeros), together with rank 0's stop flag, so all ranks feed the same token
to their caches and stop at the same step. The placeholder logits make the other ranks'
sampled token depend on their send, so evaluating the shared token runs the whole pipeline.
Prefill evaluates only the caches: the send is tied into the stage's last cache.

Bytes on the wire: ``D x L x itemsize(wire dtype)`` per hop and forward call (L tokens in
the call), plus 4 x (B + 1) bytes for the shared token.
"""

from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path
from typing import Optional, Sequence

import mlx.core as mx

from .blocks import Model
from .cache import ConvCache, KVCache
from .config import ModelArgs

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def launched() -> bool:
    """True in a process started by ``mlx.launch`` (or mpirun) with more than one rank."""
    if "MLX_RANK" in os.environ or "OMPI_COMM_WORLD_SIZE" in os.environ:
        return mx.distributed.init().size() > 1
    return False


def layer_of(key: str) -> Optional[int]:
    """The layer index a checkpoint key belongs to (None: embedding, final norm or head)."""
    m = _LAYER.search(key)
    return int(m[1]) if m else None


def read_header(path: Path) -> dict:
    """A safetensors file's header ({key: {dtype, shape, data_offsets}}) without its tensors."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header


def split_layers(layer_bytes: Sequence[int], first_extra: int, last_extra: int, n: int) -> list[range]:
    """Contiguous layer ranges for ``n`` stages minimising the largest stage's bytes.

    ``first_extra`` (the embedding) is held by stage 0, ``last_extra`` (final norm and head;
    for a tied head the embedding again) by stage n-1. Every stage gets at least one layer.
    """
    L = len(layer_bytes)
    if not 1 <= n <= L:
        raise ValueError(f"cannot split {L} layers across {n} processes (at most one per layer)")
    prefix = [0]
    for b in layer_bytes:
        prefix.append(prefix[-1] + b)

    def cost(s, i, j):  # bytes of stage s holding layers [i, j)
        return prefix[j] - prefix[i] + (first_extra if s == 0 else 0) + (last_extra if s == n - 1 else 0)

    # best[s][j]: (largest stage bytes, cut) for layers [0, j) over stages 0..s
    best = [[(float("inf"), 0)] * (L + 1) for _ in range(n)]
    for j in range(1, L + 1):
        best[0][j] = (cost(0, 0, j), 0)
    for s in range(1, n):
        for j in range(s + 1, L + 1):
            best[s][j] = min((max(best[s - 1][i][0], cost(s, i, j)), i) for i in range(s, j))
    cuts, j = [L], L
    for s in range(n - 1, 0, -1):
        j = best[s][j][1]
        cuts.append(j)
    cuts = [0] + cuts[::-1]
    return [range(a, b) for a, b in zip(cuts, cuts[1:])]


def plan_stages(headers: dict, args: ModelArgs, n: int) -> list[range]:
    """Stage layer ranges from the checkpoint's headers (``{key: header entry}``), by bytes."""
    per_layer = [0] * args.num_hidden_layers
    embed = head = 0
    for key, h in headers.items():
        size = h["data_offsets"][1] - h["data_offsets"][0]
        i = layer_of(key)
        if i is not None and i < args.num_hidden_layers:
            per_layer[i] += size
        elif "embed_tokens" in key:
            embed += size
        else:
            head += size
    if args.tie_word_embeddings:
        head += embed
    return split_layers(per_layer, embed, head, n)


class PipelineModel(Model):
    """``Model`` holding one stage: same call and cache contract, logits real on rank 0 only.

    Unowned layers are ``None`` so parameter paths keep the checkpoint's layer numbers;
    ``layers`` and ``make_cache`` cover the owned layers only, and the forward call runs them
    with the backbone's own loop (``Backbone.run``).
    """

    shares_tokens = True

    def __init__(self, args: ModelArgs, group, stages: Sequence[range], wire_dtype: mx.Dtype):
        super().__init__(args)
        self.group = group
        self.rank, self.size = group.rank(), group.size()
        self.stage = self.size - 1 - self.rank
        self.owned = stages[self.stage]
        self.wire_dtype = wire_dtype  # the activations' dtype when compute_dtype is None
        self.is_first, self.is_last = self.stage == 0, self.stage == self.size - 1
        m = self.model
        m.layers = [l if i in self.owned else None for i, l in enumerate(m.layers)][: self.owned.stop]
        m.first_layer = self.owned.start
        if not self.is_last:
            del m.embedding_norm
            if "lm_head" in self:
                del self.lm_head
        if not self.is_first and not (self.is_last and args.tie_word_embeddings):
            del m.embed_tokens

    def __call__(self, inputs: mx.array, cache=None) -> mx.array:
        B, L = inputs.shape
        m, D = self.model, self.args.hidden_size
        dtype = self.compute_dtype or self.wire_dtype
        if self.is_first:
            h = m.embed_tokens(inputs).astype(dtype)
        else:
            h = mx.distributed.recv((B, L, D), dtype, self.rank + 1, group=self.group)
        h = m.run(h, cache)
        if not self.is_last:
            sent = mx.distributed.send(h.astype(dtype), self.rank - 1, group=self.group)
            if cache is not None and cache[-1] is not None:
                _depend(cache[-1], sent)  # prefill evaluates the caches: that sends h
            # Logits here are never used; they only carry the send into the sampled token.
            return mx.broadcast_to(mx.depends(mx.zeros((1, 1, 1), dtype), sent), (B, L, self.args.vocab_size))
        return self.head(m.embedding_norm(h))

    def sync_ranks(self) -> None:
        mx.eval(mx.distributed.all_sum(mx.array(1), group=self.group, stream=mx.cpu))

    def share_token(self, y: mx.array, stop: bool) -> tuple[mx.array, mx.array]:
        """Rank 0's sampled token ``y`` and stop flag on every rank, lazily (one ``all_sum``)."""
        v = mx.concatenate([y.reshape(-1).astype(mx.int32), mx.array([int(stop)], mx.int32)])
        if not self.is_last:
            v = v * 0  # keeps the dependency on this rank's forward (and its send)
        v = mx.distributed.all_sum(v, group=self.group, stream=mx.cpu)
        return v[:-1].reshape(y.shape).astype(y.dtype), v[-1]

    def share_prompt(self, prompt: mx.array) -> mx.array:
        """Rank 0's prompt ids on every rank; a clear error if the ranks' lengths differ (the
        front end fed them different inputs, which would otherwise hang the pipeline)."""
        n = mx.distributed.all_sum(mx.array([prompt.size], mx.int32), group=self.group, stream=mx.cpu).item()
        if n != prompt.size * self.size:
            raise RuntimeError(
                "the ranks were given prompts of different lengths: under mlx.launch every rank must "
                "run the same front end on the same input (see engine.distributed.from_leader)"
            )
        ids = prompt.astype(mx.int32) if self.rank == 0 else mx.zeros(prompt.shape, mx.int32)
        ids = mx.distributed.all_sum(ids, group=self.group, stream=mx.cpu).astype(prompt.dtype)
        mx.eval(ids)  # now: lazily, only the embedding rank would reach this collective
        return ids


def _depend(c, sent: mx.array) -> None:
    if isinstance(c, KVCache):
        c.keys = mx.depends(c.keys, sent)
    elif isinstance(c, ConvCache):
        c.conv_state = mx.depends(c.conv_state, sent)
    else:
        raise TypeError(f"a pipeline stage cannot run on a {type(c).__name__} (only KVCache/ConvCache)")

