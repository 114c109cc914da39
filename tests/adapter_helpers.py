"""Random adapters for tests: non-zero B, so each adapter changes the model's output."""

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from mlx_lfm2.model.lora import apply_lora, trainable_adapters
from mlx_lfm2.weights.adapters import adapter_config, save_adapters
from mlx_lfm2.weights.loader import load_model


def make_adapter(base, out, seed=0, rank=4, num_layers=2, keys=None, b_scale=0.5, scale=1.0, dtype=mx.float32):
    """An mlx-lm-layout adapter folder for the model in ``base``, with random A and B."""
    model = load_model(base)
    mx.random.seed(seed)
    apply_lora(model, num_layers, rank=rank, scale=scale, keys=keys)
    trainable_adapters(model)
    rng = np.random.default_rng(seed)
    model.update(tree_unflatten([(k, mx.array((b_scale if k.endswith("lora_b") else 1.0)
                                              * rng.standard_normal(v.shape).astype(np.float32)).astype(dtype))
                                 for k, v in tree_flatten(model.trainable_parameters())]))
    save_adapters(model, out, adapter_config(model, "lora", num_layers, {"rank": rank, "scale": scale, "keys": keys}))
    return out
