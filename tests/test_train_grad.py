"""Gradients of the model against central finite differences (dense, MoE, quantized base,
the GPU path's fused layouts)."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from conftest import tiny_config
from mlx_lfm2.model import device
from mlx_lfm2.model.blocks import Model
from mlx_lfm2.model.config import ModelArgs
from mlx_lfm2.model.layers import specialize


def tiny_model(kind: str, quantized: bool = False, fused: bool = False, seed: int = 0) -> Model:
    """float64 where MLX's CPU backend has every op, so a small step flips no routing choice;
    quantized and GPU-path (gather_mm without the float32 cast) models stay float32."""
    mx.random.seed(seed)
    model = Model(ModelArgs.from_dict(tiny_config(kind, vocab_size=256)))
    if not (quantized or fused or not device.on_cpu()):
        model.set_dtype(mx.float64)
    # Random norms (ones would hide a wrong norm gradient behind a symmetric one).
    model.update(tree_unflatten([(k, (1 + 0.2 * mx.random.normal(v.shape, dtype=v.dtype)))
                                 if k.endswith("norm.weight") else (k, v)
                                 for k, v in tree_flatten(model.parameters())]))
    if quantized:
        nn.quantize(model, group_size=32, bits=4)
        # float32: a 1e-3 step could flip a routing choice; a bias gap > 1 (sigmoid scores are
        # in (0, 1)) pins which experts each token takes, still weighting them by the scores.
        for layer in model.layers:
            if "expert_bias" in layer.feed_forward:
                E = layer.feed_forward.expert_bias.size
                layer.feed_forward.expert_bias = 2.0 * mx.random.permutation(E).astype(mx.float32)
    if fused:
        specialize(model, fuse=True)
    model.freeze(keys=["expert_bias"], strict=False)  # a choice, not a weight: no gradient
    mx.eval(model.parameters())
    return model


IDS = mx.array(np.random.default_rng(0).integers(0, 256, (2, 21)))


def loss(m):
    return nn.losses.cross_entropy(m(IDS[:, :-1]), IDS[:, 1:]).astype(mx.float32).mean()


def directional_check(model: Model, eps: float):
    """``<grad L, v>`` from ``value_and_grad`` against ``(L(p + eps v) - L(p - eps v)) / 2 eps``."""
    _, grads = nn.value_and_grad(model, loss)(model)
    params = model.trainable_parameters()
    mx.random.seed(1)
    v = tree_map(lambda p: mx.random.normal(p.shape, dtype=p.dtype), params)
    analytic = sum(float((g * d).sum()) for (_, g), (_, d) in zip(tree_flatten(grads), tree_flatten(v)))

    def at(sign):
        model.update(tree_map(lambda p, d: p + sign * eps * d, params, v))
        out = float(loss(model))
        model.update(params)
        return out

    return analytic, (at(1) - at(-1)) / (2 * eps), len(tree_flatten(grads))


@pytest.mark.parametrize("kind,quantized", [
    ("tiny-dense", False), ("tiny-moe", False), ("tiny-dense", True), ("tiny-moe", True)])
def test_gradients_match_finite_differences(kind, quantized):
    """Every trainable weight at once; a quantized base trains its norms and conv kernels (its
    matmul weights are frozen: QLoRA's LoRA layers are checked in test_lora)."""
    model = tiny_model(kind, quantized=quantized)
    analytic, numeric, n = directional_check(model, eps=1e-3 if quantized else 1e-4)
    assert n > 0 and abs(analytic) > 1e-2
    assert abs(analytic - numeric) <= (1e-2 if quantized else 1e-3) * abs(numeric), (analytic, numeric)


@pytest.mark.parametrize("kind", ["tiny-dense", "tiny-moe"])
def test_fused_layouts_get_the_unfused_gradients(kind):
    """The GPU path's one matmul for q/k/v and for gate/up: the fused weight's gradient is the
    separate weights' gradients side by side."""
    with device.assume("gpu"):
        plain, fused = tiny_model(kind), tiny_model(kind, fused=True)
        _, g = nn.value_and_grad(plain, loss)(plain)
        _, gf = nn.value_and_grad(fused, loss)(fused)
    g, gf = dict(tree_flatten(g)), dict(tree_flatten(gf))
    checked = 0
    for k, v in gf.items():
        for fused_name, parts, axis in (("qkv_proj", ("q_proj", "k_proj", "v_proj"), 0),
                                        ("experts.w13", ("experts.w1", "experts.w3"), 1),
                                        ("w13", ("w1", "w3"), 0)):
            if f".{fused_name}." in k:
                want = mx.concatenate([g[k.replace(fused_name, p)] for p in parts], axis=axis)
                break
        else:
            want = g[k]
        np.testing.assert_allclose(np.array(v), np.array(want), atol=1e-5, rtol=1e-4, err_msg=k)
        checked += "13" in k or "qkv" in k
    assert checked >= 3


def test_moe_backward_does_not_differentiate_routing_indices():
    model = tiny_model("tiny-moe")
    ids = mx.array([[3, 1, 4, 1, 5, 9, 2, 6] * 12])  # 96 tokens: the sorted-experts path too
    _, grads = nn.value_and_grad(model, lambda m: m(ids).astype(mx.float32).mean())(model)
    gate = dict(tree_flatten(grads))["model.layers.1.feed_forward.gate.weight"]
    assert float(mx.abs(gate).sum()) > 0  # the router still learns through the expert weights
