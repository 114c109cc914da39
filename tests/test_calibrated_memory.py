"""Calibrated conversion streams: its peak memory is a constant plus a layer's, not the model's,
so a deeper model of the same widths peaks no higher (MLX's peak plus numpy's, through tracemalloc)."""

import json
import os
import struct
import subprocess
import sys

import pytest

from conftest import reference_dir, tiny_config
from mlx_lfm2.weights.random_checkpoint import write_checkpoint


def layer_bytes(folder) -> int:
    """The largest layer's bytes in the checkpoint."""
    with open(folder / "model.safetensors", "rb") as f:
        header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
    sizes = {}
    for k, v in header.items():
        if k.startswith("model.layers."):
            group = ".".join(k.split(".")[:3])
            sizes[group] = sizes.get(group, 0) + v["data_offsets"][1] - v["data_offsets"][0]
    return max(sizes.values())


def layers_peak(src, dst) -> int:
    """The peak (MLX's plus numpy's) while the layers are converted: from the first layer's
    start to the head's (the embeddings and the head are the constant part, the same at any depth).
    Measured in a fresh process: MLX's buffer cache and peak counter are process-wide, so what
    earlier tests left behind would otherwise be part of the number."""
    out = subprocess.run([sys.executable, "-c", _MEASURE, str(src), str(dst)], capture_output=True, text=True,
                         timeout=600, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert out.returncode == 0, out.stderr[-2000:]
    return int(out.stdout.split()[-1])


_MEASURE = """
import sys, tracemalloc
import mlx.core as mx
from mlx_lfm2 import convert
from mlx_lfm2.model.blocks import Block
from mlx_lfm2.weights.layerwise import LayerwiseQuantizer

seen = {}
before = LayerwiseQuantizer.before

def watched(self, module, prefix):
    if isinstance(module, Block) and not seen:
        mx.clear_cache()
        mx.reset_peak_memory()
        tracemalloc.reset_peak()
        seen["base"] = mx.get_active_memory()
    elif not isinstance(module, Block):
        seen["peak"] = mx.get_peak_memory() - seen["base"] + tracemalloc.get_traced_memory()[1]
    return before(self, module, prefix)

LayerwiseQuantizer.before = watched
tracemalloc.start()
convert(sys.argv[1], sys.argv[2], quantize=True, progress=False, q_method="awq-gptq", calibration_tokens=128)
print(seen["peak"])
"""


@pytest.mark.slow
def test_calibrated_conversion_peak_does_not_grow_with_depth(tmp_path):
    peaks, layer = {}, 0
    for n in (2, 8):
        cfg = tiny_config("tiny-moe", n, hidden_size=128, intermediate_size=256, moe_intermediate_size=64)
        src = write_checkpoint(tmp_path / f"src{n}", cfg, dtype="float32", tokenizer_from=reference_dir(),
                               lm_like_head=True)
        layer = max(layer, layer_bytes(src))
        peaks[n] = layers_peak(src, tmp_path / f"out{n}")
    # measured at 2 and 6 layers: 6.7-9.4 MB either way (noise ~1 MB, under one layer); keeping
    # each converted layer's unquantized weights added ~0.8 MB a layer, 6 more here: over this
    assert peaks[8] <= peaks[2] + layer, (peaks, layer)
