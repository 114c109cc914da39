"""Quantized experts against a dequantized reference, on every path the layer takes."""

import mlx.core as mx
import numpy as np
import pytest

from mlx_lfm2.model import device as parallel
from mlx_lfm2.model.experts import SORT_THRESHOLD, QuantizedSwitchLinear, SwitchGLU


def reference(layer, x, indices):
    w = mx.dequantize(layer.weight, layer.scales, layer.biases, layer.group_size, layer.bits)  # [E, F, D]
    return np.einsum("nd,nkfd->nkf", np.array(x), np.array(w)[np.array(indices)])


@pytest.mark.parametrize("streams", [1, 2])
@pytest.mark.parametrize("tokens", [1, 3, 40])  # decode (take-first), small batch, sorted prefill
def test_quantized_switch_linear_matches_dequantized(tokens, streams, monkeypatch):
    if streams == 2:
        monkeypatch.setattr(parallel, "_streams", [mx.default_stream(mx.cpu), mx.new_stream(mx.cpu)])
        monkeypatch.setattr(parallel, "MIN_WEIGHTS", 0)
    E, F, D, K = 16, 128, 256, 4
    mx.random.seed(0)
    layer = QuantizedSwitchLinear(mx.random.normal((E, F, D)) / 16, group_size=64, bits=4)
    x = mx.random.normal((tokens, D))
    indices = mx.array(np.random.default_rng(0).integers(0, E, (tokens, K)))
    ref = reference(layer, x, indices)
    glu_x = mx.expand_dims(x, (-2, -3))
    out = layer(glu_x, indices)[..., 0, :]  # unsorted path, K pairs per token
    np.testing.assert_allclose(np.array(out), ref, atol=1e-3, rtol=1e-3)
    if tokens * K >= SORT_THRESHOLD:
        flat = indices.flatten()
        order = mx.argsort(flat)
        xs = glu_x.flatten(0, -3)[order // K]
        sorted_out = layer(xs, flat[order], sorted_indices=True)[mx.argsort(order)].reshape(tokens, K, F)
        np.testing.assert_allclose(np.array(sorted_out), ref, atol=1e-3, rtol=1e-3)


def test_switch_glu_quantized_equals_its_own_dequantized_experts():
    E, F, D = 8, 64, 128
    glu = SwitchGLU(D, F, E)
    x = mx.random.normal((2, 5, D))
    inds = mx.array(np.random.default_rng(1).integers(0, E, (2, 5, 2)))
    import mlx.nn as nn

    nn.quantize(glu, 64, 8)
    deq = SwitchGLU(D, F, E)
    for name in ("w1", "w2", "w3"):
        q = getattr(glu, name)
        getattr(deq, name).weight = mx.dequantize(q.weight, q.scales, q.biases, 64, 8)
    np.testing.assert_allclose(np.array(glu(x, inds)), np.array(deq(x, inds)), atol=1e-4, rtol=1e-4)
