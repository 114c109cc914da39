"""The LFM2 family as one MLX module tree.

Dense LFM2 and LFM2-MoE share every block; a layer differs only in its operator
(short convolution or attention, from ``layer_types``) and its feed-forward (dense
SwiGLU below ``num_dense_layers``, sparse MoE above). Parameter paths are the hub
checkpoint's, with experts stacked (``feed_forward.experts.w1.weight`` is ``[E, F, D]``);
``weights.sanitize`` maps hub and mlx-lm layouts onto them.

Dimensions: B batch, L tokens in this call, D hidden, H / H_kv query / key-value heads,
Dh head dim, T cached positions, E experts, K experts per token, F FFN width.
"""

from __future__ import annotations

from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from .batch_cache import BatchKVCache
from .cache import ConvCache, KVCache
from .config import ModelArgs
from . import device
from .device import Embedding, Linear
from .experts import SwitchGLU, concat_outputs, same_format, swiglu


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
        self.q_proj = Linear(D, self.H * Dh, bias=False)
        self.k_proj = Linear(D, self.H_kv * Dh, bias=False)
        self.v_proj = Linear(D, self.H_kv * Dh, bias=False)
        self.out_proj = Linear(self.H * Dh, D, bias=False)
        self.q_layernorm = nn.RMSNorm(Dh, eps=args.norm_eps)
        self.k_layernorm = nn.RMSNorm(Dh, eps=args.norm_eps)
        self.rope = nn.RoPE(Dh, traditional=False, base=args.rope_theta)

    def __call__(self, x: mx.array, cache: Optional[KVCache]) -> mx.array:
        B, L, _ = x.shape
        offset = cache.offset if cache is not None else 0  # a BatchKVCache's: per row, [B]
        # "causal" aligns the L queries with the last L of the T keys; a batch also hides padding.
        mask = cache.make_mask(L) if isinstance(cache, BatchKVCache) else "causal" if L > 1 else None
        if L == 1 and not isinstance(offset, mx.array):
            offset = mx.array(offset)  # an input, so a compiled step is not retraced per token
        q, k, v = device.decode_compiled(self, "qkv", self.qkv, x)(x, offset)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)  # [B, H_kv, T, Dh]
        o = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)  # [B, H, L, Dh]
        return self.out_proj((o if L == 1 else o.transpose(0, 2, 1, 3)).reshape(B, L, -1))

    def qkv(self, x: mx.array, offset):
        """Projections, q/k norms and RoPE: ``[B, H(_kv), L, Dh]`` each."""
        B, L, _ = x.shape

        def heads(t, n):  # [B, L, n * Dh] -> [B, n, L, Dh]; for one token a reshape is enough
            return t.reshape(B, n, 1, -1) if L == 1 else t.reshape(B, L, n, -1).transpose(0, 2, 1, 3)

        if "qkv_proj" in self:
            q_end, k_end = self.H * self.head_dim, (self.H + self.H_kv) * self.head_dim
            q, k, v = mx.split(self.qkv_proj(x), [q_end, k_end], axis=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = self.q_layernorm(heads(q, self.H))
        k = self.k_layernorm(heads(k, self.H_kv))
        return self.rope(q, offset=offset), self.rope(k, offset=offset), heads(v, self.H_kv)

    def fuse_qkv(self) -> None:
        """One ``qkv_proj`` for q, k and v (a runtime layout, see ``device.fuse_matmuls``)."""
        if "qkv_proj" not in self and same_format(self.q_proj, self.k_proj, self.v_proj):
            self.qkv_proj = concat_outputs(self.q_proj, self.k_proj, self.v_proj, axis=0)
            del self["q_proj"], self["k_proj"], self["v_proj"]


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
        self.in_proj = Linear(D, 3 * D, bias=args.conv_bias)
        self.conv = DepthwiseConv(D, args.conv_L_cache, bias=args.conv_bias)
        self.out_proj = Linear(D, D, bias=args.conv_bias)

    def __call__(self, x: mx.array, cache: Optional[ConvCache]) -> mx.array:
        state = cache.conv_state if cache is not None else None
        mix = self.mix if state is None else device.decode_compiled(self, "mix", self.mix, x)
        y, new_state, inputs = mix(x, state)
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
        self.w1 = Linear(dims, hidden, bias=False)
        self.w3 = Linear(dims, hidden, bias=False)
        self.w2 = Linear(hidden, dims, bias=False)

    def __call__(self, x: mx.array, residual: Optional[mx.array] = None) -> mx.array:
        """``residual + FFN(x)`` (``residual`` None: zero)."""
        if "w13" in self:
            y = self.w2(swiglu(*mx.split(self.w13(x), 2, axis=-1)))
        else:
            y = self.w2(swiglu(self.w1(x), self.w3(x)))
        return y if residual is None else residual + y

    def fuse_gate_up(self) -> None:
        """One ``w13`` for gate and up (a runtime layout, see ``device.fuse_matmuls``)."""
        if "w13" not in self and same_format(self.w1, self.w3):
            self.w13 = concat_outputs(self.w1, self.w3, axis=0)
            del self["w1"], self["w3"]


class SparseMoE(nn.Module):
    """Sigmoid router; ``expert_bias`` steers which experts are chosen, never their weights."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        E = args.num_experts
        self.top_k = args.num_experts_per_tok
        self.norm_topk_prob = args.norm_topk_prob
        self.routed_scaling_factor = args.routed_scaling_factor
        self.gate = Linear(args.hidden_size, E, bias=False)
        if args.use_expert_bias:
            self.expert_bias = mx.zeros((E,), dtype=mx.float32)
        self.experts = SwitchGLU(args.hidden_size, args.moe_intermediate_size, E)

    def __call__(self, x: mx.array, residual: Optional[mx.array] = None) -> mx.array:
        """``residual + MoE(x)`` (``residual`` None: zero)."""
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

    def __call__(self, x: mx.array, cache=None) -> mx.array:
        op = self.self_attn if self.is_attention else self.conv
        r = op(self.operator_norm(x), cache)
        ffn = device.decode_compiled(self, "ffn", self.residual_ffn, x, [self.ffn_norm, self.feed_forward])
        return ffn(x, r)

    def residual_ffn(self, x: mx.array, r: mx.array) -> mx.array:
        h = x + r
        return self.feed_forward(self.ffn_norm(h), h)


class Backbone(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.compute_dtype: Optional[mx.Dtype] = None  # see Model.compute_dtype
        self.embed_tokens = Embedding(args.vocab_size, args.hidden_size)
        self.layers = [Block(args, i) for i in range(args.num_hidden_layers)]
        self.embedding_norm = nn.RMSNorm(args.hidden_size, eps=args.norm_eps)

    def __call__(self, inputs: mx.array, cache=None) -> mx.array:
        h = self.embed_tokens(inputs)
        if self.compute_dtype is not None:
            h = h.astype(self.compute_dtype)
        cache = cache if cache is not None else [None] * len(self.layers)
        for layer, c in zip(self.layers, cache):
            h = layer(h, c)
        return self.embedding_norm(h)


class Model(nn.Module):
    """``model(inputs [B, L], cache=None) -> logits [B, L, vocab]``."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.model = Backbone(args)
        if not args.tie_word_embeddings:
            self.lm_head = Linear(args.hidden_size, args.vocab_size, bias=False)

    def __call__(self, inputs: mx.array, cache=None) -> mx.array:
        h = self.model(inputs, cache)
        if "lm_head" in self:
            return self.lm_head(h)
        return self.model.embed_tokens.as_linear(h)

    @property
    def layers(self):
        return self.model.layers

    @property
    def compute_dtype(self) -> Optional[mx.Dtype]:
        """Activation dtype (None: the weights'). The loader picks float32 for quantized models
        on the CPU backend, where quantized matmuls with float32 inputs run ~8x faster than with
        bfloat16 ones (scales stay bfloat16; outputs follow the input dtype)."""
        return self.model.compute_dtype

    @compute_dtype.setter
    def compute_dtype(self, dtype: Optional[mx.Dtype]) -> None:
        self.model.compute_dtype = dtype

    def fuse_matmuls(self, evaluate: bool = True) -> None:
        """One matmul for q/k/v and one for gate/up in every layer (``device.fuse_matmuls``),
        layer by layer so only one layer's old and new arrays coexist when ``evaluate``."""
        for layer in self.layers:
            if layer.is_attention:
                layer.self_attn.fuse_qkv()
            ffn = layer.feed_forward
            (ffn.experts if isinstance(ffn, SparseMoE) else ffn).fuse_gate_up()
            if evaluate:
                mx.eval(layer.parameters())

    def make_cache(self) -> list:
        """A fresh cache: a KVCache per attention layer, a ConvCache per conv layer."""
        return [KVCache() if l.is_attention else ConvCache() for l in self.layers]
