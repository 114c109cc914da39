"""The layer variants ``device``'s table chooses, swapped in by ``specialize(model)``.

``blocks`` holds one pure copy of each module; a variant here is a mixin over it with the same
call signature (and, for the fused layouts, concatenated arrays), applied in place after the
weights are loaded, so forward code never asks which device it runs on:

* ``SplitQuantizedLinear`` / ``SplitQuantizedEmbedding`` (CPU): a large quantized matmul cut
  into one slice of output rows per CPU stream (``device.split``);
* ``FusedQKV`` (attention) and ``FusedGateUp`` (dense FFN, experts): one matmul where the
  checkpoint has three or two, weights concatenated along the output axis (GPU);
* ``CompiledQKV``, ``CompiledMix`` (attention / conv: the work before the cache) and
  ``CompiledFFN`` (a block's second half): ``mx.compile``d for one-token steps (GPU), with the
  module's arrays as live inputs, so weights loaded later are seen, not frozen into the graph.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Callable, Optional

import mlx.core as mx
import mlx.nn as nn

from . import device
from .blocks import Attention, DenseFFN, Model
from .experts import SwitchGLU, swiglu


# --- quantized matmuls split across CPU streams ------------------------------------------


def quantized_matmul(layer, x: mx.array) -> mx.array:
    """``x @ W.T`` for a quantized layer's ``[rows, in]`` weight, rows split across streams."""
    w, s, b = layer["weight"], layer["scales"], layer.get("biases")
    rows = w.shape[0]

    def part(lo, hi):
        pw, ps, pb = (w, s, b) if (lo, hi) == (0, rows) else (w[lo:hi], s[lo:hi], None if b is None else b[lo:hi])
        return mx.quantized_matmul(x, pw, ps, pb, transpose=True, group_size=layer.group_size, bits=layer.bits,
                                   mode=layer.mode)

    return device.split(part, rows, rows * s.shape[1] * layer.group_size)


class SplitQuantizedLinear(nn.QuantizedLinear):
    def __call__(self, x: mx.array) -> mx.array:
        y = quantized_matmul(self, x)
        return y + self["bias"] if "bias" in self else y


class SplitQuantizedEmbedding(nn.QuantizedEmbedding):
    def as_linear(self, x: mx.array) -> mx.array:
        return quantized_matmul(self, x)


# --- fused layouts -------------------------------------------------------------------------


def same_format(*layers: nn.Module) -> bool:
    """Layers whose arrays can be concatenated: one class, one quantization, the same arrays."""
    return len({(type(l), getattr(l, "group_size", None), getattr(l, "bits", None), getattr(l, "mode", None),
                 tuple(sorted(l.keys()))) for l in layers}) == 1


def concat_outputs(*layers: nn.Module, axis: int) -> nn.Module:
    """One layer computing ``layers``' outputs side by side (``same_format`` ones): every array
    concatenated along the output axis (0 for a Linear's ``[out, in]``, 1 for experts' ``[E, out, in]``)."""
    a = layers[0]
    fused = type(a).__new__(type(a))
    nn.Module.__init__(fused)
    fused.__dict__.update({k: v for k, v in a.__dict__.items() if not k.startswith("_")})
    for k in a:
        fused[k] = mx.concatenate([l[k] for l in layers], axis=axis)
    if "scales" in a:  # quantized layers keep their arrays frozen
        fused.freeze()
    return fused


class FusedQKV:
    """Attention with one ``qkv_proj`` for q, k and v (outputs ``[q | k | v]``)."""

    @staticmethod
    def fuse(attn: Attention) -> bool:
        if not same_format(attn.q_proj, attn.k_proj, attn.v_proj):
            return False
        attn.qkv_proj = concat_outputs(attn.q_proj, attn.k_proj, attn.v_proj, axis=0)
        del attn["q_proj"], attn["k_proj"], attn["v_proj"]
        return True

    def project(self, x: mx.array):
        q_end, k_end = self.H * self.head_dim, (self.H + self.H_kv) * self.head_dim
        return mx.split(self.qkv_proj(x), [q_end, k_end], axis=-1)


class FusedGateUp:
    """A SwiGLU (dense FFN or experts) with one ``w13`` for gate and up (outputs ``[gate | up]``)."""

    @staticmethod
    def fuse(glu) -> bool:
        if not same_format(glu.w1, glu.w3):
            return False
        glu.w13 = concat_outputs(glu.w1, glu.w3, axis=glu.w1["weight"].ndim - 2)
        del glu["w1"], glu["w3"]
        return True

    def glu(self, x: mx.array, *route) -> mx.array:
        return swiglu(*mx.split(self.w13(x, *route), 2, axis=-1))


# --- compiled one-token pieces -------------------------------------------------------------


def compiled(owner: nn.Module, name: str, fn: Callable, inputs=None) -> Callable:
    """``fn`` compiled once per ``owner``, with ``inputs`` (default: the owner's arrays) as
    live inputs."""
    done = owner.__dict__.setdefault("_compiled", {})
    if name not in done:
        done[name] = mx.compile(fn, inputs=owner if inputs is None else inputs)
    return done[name]


class CompiledQKV:
    """Attention whose projections, q/k norms and RoPE run compiled for one token."""

    def qkv(self, x: mx.array, offset):
        if x.shape[-2] != 1:
            return super().qkv(x, offset)
        return compiled(self, "qkv", super().qkv)(x, offset)


class CompiledMix:
    """A short convolution whose gating, convolution and projections run compiled for one
    token with a state."""

    def mix(self, x: mx.array, state):
        if x.shape[-2] != 1 or state is None:
            return super().mix(x, state)
        return compiled(self, "mix", super().mix)(x, state)


class CompiledFFN:
    """A block whose second half (residual, FFN norm, FFN, residual) runs compiled for one token."""

    def __call__(self, x: mx.array, cache=None, mask="causal") -> mx.array:
        if x.shape[-2] != 1:
            return super().__call__(x, cache, mask)
        r = self.op(self.operator_norm(x), cache, mask)
        return compiled(self, "ffn", self.finish, [self.ffn_norm, self.feed_forward])(x, r)

    def finish(self, x: mx.array, r: mx.array) -> mx.array:
        h = x + r
        return self.feed_forward(self.ffn_norm(h), residual=h)


# --- applying them -------------------------------------------------------------------------


@lru_cache(maxsize=None)
def _variant(base: type, mixins: tuple) -> type:
    return type("".join(m.__name__ for m in mixins) + base.__name__, (*mixins, base), {})


def swap(module: nn.Module, *mixins: type) -> None:
    """Give ``module`` the behaviour of ``mixins`` over its own class, in place (its arrays,
    paths and identity stay)."""
    mixins = tuple(m for m in mixins if not isinstance(module, m))
    if mixins:
        module.__class__ = _variant(type(module), mixins)


def specialize(model: Model, evaluate: bool = True, fuse: Optional[bool] = None,
               compile_: Optional[bool] = None) -> Model:
    """Swap in the variants ``device`` chooses, layer by layer (when ``evaluate``, each layer's
    new arrays are evaluated before the next, so only one layer's old and new arrays coexist).
    ``fuse``: the fused q/k/v and gate/up layouts (None: ``device.fuse_matmuls()``; a model
    with adapters, or one to train, stays unfused). ``compile_``: the compiled one-token pieces
    (None: ``device.compile_decode()``; a model whose adapters change per forward goes without)."""
    fuse = device.fuse_matmuls() if fuse is None else fuse
    compile_ = device.compile_decode() if compile_ is None else compile_
    for layer in model.layers:
        op, ffn = layer.op, layer.feed_forward
        glu = ffn.experts if "experts" in ffn else ffn
        if fuse and isinstance(op, Attention) and ("qkv_proj" in op or FusedQKV.fuse(op)):
            swap(op, FusedQKV)
        if fuse and isinstance(glu, (DenseFFN, SwitchGLU)) and ("w13" in glu or FusedGateUp.fuse(glu)):
            swap(glu, FusedGateUp)
        if compile_:
            swap(op, CompiledQKV if isinstance(op, Attention) else CompiledMix)
            swap(layer, CompiledFFN)
        if evaluate:
            mx.eval(layer.parameters())
    if device.split_matmuls():
        for _, m in model.named_modules():
            if type(m) is nn.QuantizedLinear:
                m.__class__ = SplitQuantizedLinear
            elif type(m) is nn.QuantizedEmbedding:
                m.__class__ = SplitQuantizedEmbedding
    return model
