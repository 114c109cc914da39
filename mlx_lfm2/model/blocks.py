"""The LFM2 family as one MLX module tree.

Dense LFM2 and LFM2-MoE share every block; a layer differs only in its operator
(short convolution or attention, from ``layer_types``) and its feed-forward (dense
SwiGLU below ``num_dense_layers``, sparse MoE above). Parameter paths are the hub
checkpoint's, with experts stacked (``feed_forward.experts.w1.weight`` is ``[E, F, D]``);
``weights.sanitize`` maps hub and mlx-lm layouts onto them.

Each module here is only the math, on MLX's own layers; what depends on the device (fused
gate/up and q/k/v matmuls, compiled one-token pieces, quantized matmuls split across CPU
streams) is swapped in afterwards by ``layers.specialize``, as variants with the same call
signature, following the choices in ``device``. The backbone builds the attention mask once
per forward call and hands it to every attention layer.

Dimensions: B batch, L tokens in this call, D hidden, H / H_kv query / key-value heads,
Dh head dim, T cached positions, E experts, K experts per token, F FFN width.
"""

from __future__ import annotations

from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from .cache import ConvCache, KVCache
from .config import ModelArgs
from .experts import SwitchGLU, swiglu


class Attention(nn.Module):
    """Grouped-query attention with per-head RMSNorm on q and k before RoPE."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        D, self.H, self.H_kv, Dh = (
            args.hidden_size,
            args.num_attention_heads,
            args.num_key_value_heads,
            args.head_dim,
        )
        self.scale, self.head_dim = Dh**-0.5, Dh
        self.q_proj = nn.Linear(D, self.H * Dh, bias=False)
        self.k_proj = nn.Linear(D, self.H_kv * Dh, bias=False)
        self.v_proj = nn.Linear(D, self.H_kv * Dh, bias=False)
        self.out_proj = nn.Linear(self.H * Dh, D, bias=False)
        self.q_layernorm = nn.RMSNorm(Dh, eps=args.norm_eps)
        self.k_layernorm = nn.RMSNorm(Dh, eps=args.norm_eps)
        self.rope = nn.RoPE(Dh, traditional=False, base=args.rope_theta)

    def __call__(self, x: mx.array, cache: Optional[KVCache] = None, mask="causal") -> mx.array:
        """``mask``: what the cache's ``make_mask(L)`` gave (the backbone asks once per call);
        the default is right for any call without a batched cache."""
        B, L, _ = x.shape
        offset = cache.offset if cache is not None else 0  # a batched cache's: per row, [B]
        if L == 1 and not isinstance(offset, mx.array):
            offset = mx.array(offset)  # an input, so a compiled step is not retraced per token
        q, k, v = self.qkv(x, offset)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)  # [B, H_kv, T, Dh]
        o = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)  # [B, H, L, Dh]
        return self.out_proj((o if L == 1 else o.transpose(0, 2, 1, 3)).reshape(B, L, -1))

    def qkv(self, x: mx.array, offset):
        """Projections, q/k norms and RoPE: ``[B, H(_kv), L, Dh]`` each."""
        B, L, _ = x.shape

        def heads(t, n):  # [B, L, n * Dh] -> [B, n, L, Dh]; for one token a reshape is enough
            return t.reshape(B, n, 1, -1) if L == 1 else t.reshape(B, L, n, -1).transpose(0, 2, 1, 3)

        q, k, v = self.project(x)
        q = self.q_layernorm(heads(q, self.H))
        k = self.k_layernorm(heads(k, self.H_kv))
        return self.rope(q, offset=offset), self.rope(k, offset=offset), heads(v, self.H_kv)

    def project(self, x: mx.array):
        """q, k, v ``[B, L, H(_kv) * Dh]``."""
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)


class DepthwiseConv(nn.Module):
    """Causal depthwise convolution over time; weight ``[D, L_cache, 1]`` (MLX Conv1d layout)."""

    def __init__(self, dims: int, kernel: int, bias: bool):
        super().__init__()
        self.weight = mx.zeros((dims, kernel, 1))
        if bias:
            self.bias = mx.zeros((dims,))

    def __call__(self, x: mx.array, state: Optional[mx.array]):
        """x ``[B, L, D]``, state ``[B, K-1, D]`` (None: zeros) -> (y ``[B, L, D]``, new state)."""
        B, L, D = x.shape
        K = self.weight.shape[1]
        if state is None:
            state = mx.zeros((B, K - 1, D), dtype=x.dtype)
        if L == 1:  # decode: the K taps as one elementwise expression, no [B, K, D] window
            taps = [*mx.split(state, K - 1, axis=1), x]  # K x [B, 1, D], oldest first
            w = mx.split(self.weight.T, K, axis=1)  # K x [1, 1, D]
            y = taps[0] * w[0]
            for t, wk in zip(taps[1:], w[1:]):
                y = y + t * wk
            new_state = mx.concatenate(taps[1:], axis=1)
        else:
            w = self.weight[:, :, 0].T  # [K, D]
            window = mx.concatenate([state, x], axis=1)  # [B, L+K-1, D]
            y = window[:, 0:L] * w[0]
            for k in range(1, K):  # K = 3 taps, not a loop over tokens
                y = y + window[:, k : k + L] * w[k]
            new_state = window[:, -(K - 1) :]
        if "bias" in self:
            y = y + self.bias
        return y, new_state


class ShortConv(nn.Module):
    """Double-gated short convolution: ``out_proj(C * conv(B * x))``."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        D = args.hidden_size
        self.in_proj = nn.Linear(D, 3 * D, bias=args.conv_bias)
        self.conv = DepthwiseConv(D, args.conv_L_cache, bias=args.conv_bias)
        self.out_proj = nn.Linear(D, D, bias=args.conv_bias)

    def __call__(self, x: mx.array, cache: Optional[ConvCache] = None, mask=None) -> mx.array:
        """``mask`` is unused: no padding ever enters a conv state (a batched row is prefilled
        alone before it joins, see batch_cache.py), so there is nothing to hide."""
        state = cache.conv_state if cache is not None else None
        y, new_state, inputs = self.mix(x, state)
        if cache is not None:
            cache.update(inputs, new_state)  # keeps the conv inputs for exact rewinds (see cache.py)
        return y

    def mix(self, x: mx.array, state: Optional[mx.array]):
        """``(out_proj(C * conv(B * x)), new conv state, conv inputs B * x)``; the cache stays
        with the caller."""
        b, c, h = mx.split(self.in_proj(x), 3, axis=-1)  # 3 x [B, L, D]
        bx = b * h
        y, new_state = self.conv(bx, state)
        return self.out_proj(c * y), new_state, bx


class DenseFFN(nn.Module):
    """SwiGLU: ``w2(silu(w1 x) * w3 x)``."""

    def __init__(self, dims: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dims, hidden, bias=False)
        self.w3 = nn.Linear(dims, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dims, bias=False)

    def __call__(self, x: mx.array, residual: Optional[mx.array] = None) -> mx.array:
        """``residual + FFN(x)`` (``residual`` None: zero)."""
        y = self.w2(self.glu(x))
        return y if residual is None else residual + y

    def glu(self, x: mx.array) -> mx.array:
        return swiglu(self.w1(x), self.w3(x))


class SparseMoE(nn.Module):
    """Sigmoid router; ``expert_bias`` steers which experts are chosen, never their weights."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        E = args.num_experts
        self.top_k = args.num_experts_per_tok
        self.norm_topk_prob = args.norm_topk_prob
        self.routed_scaling_factor = args.routed_scaling_factor
        self.gate = nn.Linear(args.hidden_size, E, bias=False)
        if args.use_expert_bias:
            self.expert_bias = mx.zeros((E,), dtype=mx.float32)
        self.experts = SwitchGLU(args.hidden_size, args.moe_intermediate_size, E)

    def __call__(self, x: mx.array, residual: Optional[mx.array] = None) -> mx.array:
        """``residual + MoE(x)`` (``residual`` None: zero); for one token the residual rides in
        the weighted sum's matmul (``addmm``), one op less than adding it after."""
        K = self.top_k
        probs = mx.sigmoid(self.gate(x).astype(mx.float32))  # [B, L, E]
        choice = probs + self.expert_bias if "expert_bias" in self else probs
        # Which experts is a choice, not a function of the weights: without stop_gradient the
        # backward pass would differentiate the gathers with respect to these indices (and fail).
        inds = mx.stop_gradient(mx.argpartition(choice, kth=-K, axis=-1)[..., -K:])  # [B, L, K]
        w = mx.take_along_axis(probs, inds, axis=-1)
        if self.norm_topk_prob:
            w = w / (w.sum(axis=-1, keepdims=True) + 1e-6)
        w = (w * self.routed_scaling_factor).astype(x.dtype)
        y = self.experts(x, inds)  # [B, L, K, D]
        if x.shape[-2] == 1:  # one token: weighted sum and residual as one op
            r = mx.zeros_like(x) if residual is None else residual
            return mx.addmm(r[..., None, :], w[..., None, :], y).squeeze(-2)  # [B, 1, 1, D] -> [B, 1, D]
        y = (y * w[..., None]).sum(axis=-2)
        return y if residual is None else residual + y


class Block(nn.Module):
    def __init__(self, args: ModelArgs, i: int):
        super().__init__()
        self.is_attention = args.is_attention(i)
        if self.is_attention:
            self.self_attn = Attention(args)
        else:
            self.conv = ShortConv(args)
        if args.is_moe(i):
            self.feed_forward = SparseMoE(args)
        else:
            self.feed_forward = DenseFFN(args.hidden_size, args.intermediate_size)
        self.operator_norm = nn.RMSNorm(args.hidden_size, eps=args.norm_eps)
        self.ffn_norm = nn.RMSNorm(args.hidden_size, eps=args.norm_eps)

    @property
    def op(self) -> nn.Module:
        return self.self_attn if self.is_attention else self.conv

    def __call__(self, x: mx.array, cache=None, mask="causal") -> mx.array:
        """One layer; ``mask`` goes to attention (the default: see ``Attention``)."""
        h = x + self.op(self.operator_norm(x), cache, mask)
        return self.feed_forward(self.ffn_norm(h), residual=h)  # h + FFN(norm(h)), see SparseMoE


def attention_mask(h: mx.array, layers: list, cache: list):
    """The mask of a forward call's attention layers, from the first one's cache (they all hold
    the same positions; a batched cache also hides each row's padding): causal without one."""
    c = next((c for layer, c in zip(layers, cache) if layer.is_attention and c is not None), None)
    if c is not None:
        return c.make_mask(h.shape[1])
    return "causal" if h.shape[1] > 1 else None


class Backbone(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.compute_dtype: Optional[mx.Dtype] = None  # see Model.compute_dtype
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [Block(args, i) for i in range(args.num_hidden_layers)]
        self.embedding_norm = nn.RMSNorm(args.hidden_size, eps=args.norm_eps)
        self.first_layer = 0  # a pipeline stage holds layers[first_layer:] (see pipeline.py)

    def __call__(self, inputs: mx.array, cache=None) -> mx.array:
        return self.embedding_norm(self.run(self.embed(inputs), cache))

    def embed(self, inputs: mx.array) -> mx.array:
        h = self.embed_tokens(inputs)
        return h if self.compute_dtype is None else h.astype(self.compute_dtype)

    @property
    def owned(self) -> list:
        return self.layers[self.first_layer :]

    def run(self, h: mx.array, cache=None) -> mx.array:
        """The owned layers over ``h`` ``[B, L, D]`` with their caches (one per owned layer)."""
        layers = self.owned
        cache = cache if cache is not None else [None] * len(layers)
        mask = attention_mask(h, layers, cache)
        for layer, c in zip(layers, cache):
            h = layer(h, c, mask if layer.is_attention else None)
        return h


class Model(nn.Module):
    """``model(inputs [B, L], cache=None) -> logits [B, L, vocab]``.

    What a decode loop may rely on, for this model and a pipeline stage alike (see pipeline.py):
    ``make_cache()``, the call above, ``share_prompt``, ``share_token`` and ``shares_tokens``.
    """

    # True for a pipeline stage: its ranks decode in lockstep on rank 0's tokens and stop flag
    # (``share_token``), so stop on that shared flag, and decode plainly (no speculation).
    shares_tokens = False

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.model = Backbone(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def __call__(self, inputs: mx.array, cache=None) -> mx.array:
        return self.head(self.model(inputs, cache))

    def head(self, h: mx.array) -> mx.array:
        return self.lm_head(h) if "lm_head" in self else self.model.embed_tokens.as_linear(h)

    @property
    def layers(self) -> list:
        """The layers this process runs, in order (all of them outside a pipeline)."""
        return self.model.owned

    @property
    def compute_dtype(self) -> Optional[mx.Dtype]:
        """Activation dtype (None: the weights'). The loader picks float32 for quantized models
        on the CPU backend, where quantized matmuls with float32 inputs run ~8x faster than with
        bfloat16 ones (scales stay bfloat16; outputs follow the input dtype)."""
        return self.model.compute_dtype

    @compute_dtype.setter
    def compute_dtype(self, dtype: Optional[mx.Dtype]) -> None:
        self.model.compute_dtype = dtype

    def make_cache(self) -> list:
        """A fresh cache: a KVCache per attention layer, a ConvCache per conv layer."""
        return [KVCache() if l.is_attention else ConvCache() for l in self.layers]

    def share_prompt(self, prompt: mx.array) -> mx.array:
        """The prompt every rank decodes: in one process, ``prompt`` itself."""
        return prompt

    def share_token(self, y: mx.array, stop: bool):
        """``(token, shared stop flag)`` after sampling ``y``: in one process ``(y, None)``, nothing
        to share; a pipeline stage returns rank 0's token and stop flag (a lazy array)."""
        return y, None

    def sync_ranks(self) -> None:
        """Wait until every rank is here (one process: nothing to wait for)."""
