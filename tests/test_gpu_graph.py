"""The GPU path, built on this CPU-only machine with ``device.assume("gpu")``: the shape of its
decode graph (no copies of expert weights, fewer ops than mlx-lm) and logits equal to the CPU
path's, for prefill and for the compiled one-token decode."""

import os
import sys

import mlx.core as mx
import numpy as np
import pytest

from conftest import ROOT, tiny_config
from mlx_lfm2 import convert
from mlx_lfm2.model import device
from mlx_lfm2.weights.loader import load_model

sys.path.insert(0, str(ROOT / "bench"))
from graph import decode_step_ops, graph_ops  # noqa: E402

# Widths that group sizes divide, so every matrix (experts included) is quantized.
QCFG = tiny_config("tiny-moe", hidden_size=128, intermediate_size=256, moe_intermediate_size=64)
IDS = mx.array(np.random.default_rng(0).integers(0, 5000, (2, 12)))


@pytest.fixture(scope="module")
def folders(checkpoint, tmp_path_factory):
    src = checkpoint(QCFG)
    return {"float32": src,
            "q4": convert(src, tmp_path_factory.mktemp("q") / "q4", quantize=True, dtype="float32", progress=False)}


def test_device_kind_is_overridable():
    if "MLX_LFM2_DEVICE" not in os.environ:
        assert device.kind() == ("cpu" if mx.default_device().type == mx.cpu else "gpu")
    with device.assume("gpu"):
        assert device.kind() == "gpu" and device.prefill_step() == 2048 and device.cpu_streams() == []
        assert device.compute_dtype(quantized=True) is None and device.fuse_matmuls()
        assert not device.take_experts_first(pairs=1, num_experts=64)
        with device.assume("cpu"):
            assert device.prefill_step() == 128 and device.compute_dtype(quantized=True) == mx.float32
            assert device.take_experts_first(pairs=4, num_experts=64)
        assert device.kind() == "gpu"
    with pytest.raises(ValueError, match="cpu"):
        with device.assume("tpu"):
            pass


def embedding_gathers(folder) -> int:
    """Gather ops that looking up one token's embedding takes (weight, scales, biases rows)."""
    model = load_model(folder)
    return graph_ops(model.model.embed_tokens(mx.array([[3]])))["Gather"]


@pytest.mark.parametrize("kind", ["float32", "q4"])
def test_gpu_decode_graph_reads_experts_in_place_with_fewer_ops_than_mlx_lm(folders, kind):
    pytest.importorskip("mlx_lm")
    folder = folders[kind]
    moe_layers = sum(QCFG["num_dense_layers"] <= i for i in range(QCFG["num_hidden_layers"]))
    gpu, cpu = decode_step_ops("mlx_lfm2_gpu", folder), decode_step_ops("mlx_lfm2_cpu", folder)
    lm = decode_step_ops("mlx_lm", folder)
    gathers = embedding_gathers(folder)
    assert gpu["Gather"] == gathers  # only the embedding row: no expert weight is copied
    if kind == "q4":
        assert cpu["Gather"] > gathers  # the CPU path does copy the chosen experts (see device.py)
    gather_mm = "GatherQMM" if kind == "q4" else "GatherMM"
    assert gpu[gather_mm] == 2 * moe_layers  # gate+up fused, then down
    if kind == "q4":  # per layer: one q/k/v (or conv in_proj) and out_proj; dense: one gate/up and w2;
        # MoE: the router; then the head
        dense = QCFG["num_dense_layers"]
        assert gpu["QuantizedMatmul"] == 2 * QCFG["num_hidden_layers"] + 2 * dense + moe_layers + 1
    assert sum(gpu.values()) <= 0.8 * sum(lm.values()), (sum(gpu.values()), sum(lm.values()))


def decode_logits(model, ids):
    cache = model.make_cache()
    return mx.concatenate([model(ids[:, t : t + 1], cache=cache) for t in range(ids.shape[1])], axis=1)


@pytest.mark.parametrize("kind", ["float32", "q4"])
def test_gpu_path_logits_equal_cpu_path_and_decode_equals_prefill(folders, kind):
    """Same float32 activations on both paths, so any difference is the GPU path's own
    (compiled pieces, fused gate+up, addmm combine, experts read in place)."""
    with device.assume("cpu"):
        cpu = load_model(folders[kind], compute_dtype=mx.float32)
        cpu_full, cpu_steps = cpu(IDS), decode_logits(cpu, IDS)
        mx.eval(cpu_full, cpu_steps)
    with device.assume("gpu"):
        gpu = load_model(folders[kind], compute_dtype=mx.float32)
        experts = gpu.layers[-1].feed_forward.experts
        assert "w13" in experts and "w1" not in experts and "w3" not in experts
        assert "w13" in gpu.layers[0].feed_forward and "w1" not in gpu.layers[0].feed_forward
        attn = next(l.self_attn for l in gpu.layers if l.is_attention)
        assert "qkv_proj" in attn and "q_proj" not in attn
        gpu_full, gpu_steps = gpu(IDS), decode_logits(gpu, IDS)
        mx.eval(gpu_full, gpu_steps)
        assert gpu.layers[-1].__dict__.get("_compiled")  # the decode steps did run compiled
    np.testing.assert_allclose(np.array(gpu_full), np.array(cpu_full), atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.array(gpu_steps), np.array(cpu_steps), atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.array(gpu_steps), np.array(gpu_full), atol=1e-4, rtol=0)


def test_compiled_decode_sees_weights_loaded_after_the_first_step(folders):
    """The compiled pieces take the weights as live inputs, not constants frozen at trace time."""
    with device.assume("gpu"):
        model = load_model(folders["float32"])
        cache = model.make_cache()
        mx.eval(model(IDS[:1, :1], cache=cache))
        before = model(IDS[:1, 1:2], cache=[c.copy() for c in cache])
        w = model.layers[0].ffn_norm.weight
        model.layers[0].ffn_norm.weight = w * 2
        after = model(IDS[:1, 1:2], cache=cache)
        assert not np.allclose(np.array(before), np.array(after), atol=1e-3)
        model.layers[0].ffn_norm.weight = w
