"""Checkpoint layouts, in one place.

Three layouts reach us:

* the hub's (transformers ``save_pretrained``): ``feed_forward.experts.{e}.w1.weight`` per
  expert, conv weight ``[D, 1, L]``;
* mlx-lm's converted folders: ``feed_forward.switch_mlp.gate_proj.weight`` stacked, and for
  ``lfm2_moe`` dense layers ``gate_proj/up_proj/down_proj``; conv weight ``[D, L, 1]``;
* ours (the model's parameter paths): hub names, experts stacked, MLX conv layout.

``sanitize`` maps either of the first two onto ours and is idempotent; ``to_mlx_lm_name``
is the inverse used when writing folders for mlx-lm / LM Studio.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Callable, Iterable, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..model.config import ModelArgs


class WeightsError(ValueError):
    """Weights that do not fit the model their config describes."""


# (mlx-lm lfm2_moe name, our name), most specific first. For lfm2 the two agree.
_MLX_LM_MOE_NAMES = [
    ("feed_forward.switch_mlp.gate_proj.", "feed_forward.experts.w1."),
    ("feed_forward.switch_mlp.up_proj.", "feed_forward.experts.w3."),
    ("feed_forward.switch_mlp.down_proj.", "feed_forward.experts.w2."),
    ("feed_forward.gate_proj.", "feed_forward.w1."),
    ("feed_forward.up_proj.", "feed_forward.w3."),
    ("feed_forward.down_proj.", "feed_forward.w2."),
]
_PER_EXPERT = re.compile(r"^(.*\.feed_forward\.experts)\.(\d+)\.(w[123])\.weight$")


def _rename(key: str, pairs) -> str:
    for old, new in pairs:
        if old in key + ".":
            return (key + ".").replace(old, new, 1)[:-1]
    return key


def from_mlx_lm_name(key: str) -> str:
    return _rename(key, _MLX_LM_MOE_NAMES)


def to_mlx_lm_name(key: str, model_type: str) -> str:
    if model_type != "lfm2_moe":
        return key
    return _rename(key, [(new, old) for old, new in _MLX_LM_MOE_NAMES])


def sanitize(weights: dict, args: ModelArgs) -> dict:
    """Hub or mlx-lm weights -> our parameter paths. Works on any set of whole layers."""
    out, per_expert = {}, {}
    for key, w in weights.items():
        key = from_mlx_lm_name(key)
        if key.endswith("conv.conv.weight") and w.ndim == 3 and w.shape[1] == 1 < w.shape[2]:
            w = w.swapaxes(1, 2)  # hub [D, 1, L] -> MLX [D, L, 1]
        if key == "lm_head.weight" and args.tie_word_embeddings:
            continue
        m = _PER_EXPERT.match(key)
        if m:
            per_expert.setdefault((m[1], m[3]), {})[int(m[2])] = w
            continue
        out[key] = w
    for (prefix, name), experts in per_expert.items():
        if sorted(experts) != list(range(args.num_experts)):
            missing = sorted(set(range(args.num_experts)) - set(experts))
            raise WeightsError(f"{prefix}: experts {missing} of {name} missing from the checkpoint")
        out[f"{prefix}.{name}.weight"] = mx.stack([experts[e] for e in range(args.num_experts)])
    return out


def safetensors_files(folder: Path) -> list[Path]:
    """The weight files of a folder: from the shard index when there is one."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError) as e:
            raise WeightsError(f"{index} is not a valid shard index: {e}") from e
        files = [folder / n for n in names]
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise WeightsError(f"{folder}: shards {missing} named in the index are missing")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise WeightsError(f"{folder} holds no *.safetensors weights")
    return files


def check_safetensors(path: Path) -> None:
    """Header parses and the file holds every byte it promises (catches truncated downloads)."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 0 < n <= min(size - 8, 100_000_000):
                raise ValueError("bad header length")
            header = json.loads(f.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        for k, v in header.items():
            if k != "__metadata__":
                _check_extent(k, v)
    except (ValueError, KeyError, TypeError) as e:
        raise WeightsError(f"cannot read {path}: {e} (corrupt or truncated download?)") from e
    if 8 + n + end > size:
        raise WeightsError(
            f"cannot read {path}: it holds {size} bytes but its header needs {8 + n + end} "
            "(corrupt or truncated download?)"
        )


_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
             "U32": 4, "I32": 4, "F32": 4, "U64": 8, "I64": 8, "F64": 8}


def _check_extent(name: str, entry: dict) -> None:
    """A tensor's byte range is ordered and holds exactly its shape's bytes (MLX would read
    whatever the shape says, past the range)."""
    start, stop = entry["data_offsets"]
    shape = entry["shape"]
    if not (isinstance(start, int) and isinstance(stop, int) and 0 <= start <= stop):
        raise ValueError(f"tensor {name}: bad data_offsets {entry['data_offsets']}")
    if not all(isinstance(d, int) and d >= 0 for d in shape):
        raise ValueError(f"tensor {name}: bad shape {shape}")
    size = _ITEMSIZE.get(entry["dtype"])
    if size is not None and math.prod(shape) * size != stop - start:
        raise ValueError(f"tensor {name}: shape {shape} of {entry['dtype']} needs {math.prod(shape) * size} bytes, "
                         f"its data_offsets hold {stop - start}")


def load_safetensors(path: Path) -> dict:
    """Lazy arrays of one file (read when first evaluated); corrupt files are clear errors."""
    check_safetensors(path)
    try:
        return mx.load(str(path))
    except Exception as e:  # mlx raises RuntimeError/ValueError with terse text
        raise WeightsError(f"cannot read {path}: {e} (corrupt or truncated download?)") from e


def quantization_predicate(quantization: dict, weights: dict) -> Callable:
    """The class predicate that rebuilds a quantized folder's modules before loading it."""
    overrides = {from_mlx_lm_name(k): v for k, v in quantization.items() if isinstance(v, dict)}

    def predicate(path: str, module: nn.Module):
        if path in overrides:
            return overrides[path]
        return hasattr(module, "to_quantized") and f"{path}.scales" in weights

    return predicate


def check_weights(model: nn.Module, weights: dict) -> None:
    """Every parameter present with its shape, nothing left over; errors name the keys."""
    expected = dict(tree_flatten(model.parameters()))
    missing = sorted(set(expected) - set(weights))
    extra = sorted(set(weights) - set(expected))
    if missing:
        raise WeightsError(f"checkpoint lacks {len(missing)} weights, e.g. {missing[:5]}")
    if extra:
        raise WeightsError(f"checkpoint has {len(extra)} weights the model does not, e.g. {extra[:5]}")
    for k, w in weights.items():
        if tuple(w.shape) != tuple(expected[k].shape):
            raise WeightsError(
                f"weight {k} has shape {tuple(w.shape)}, the config implies {tuple(expected[k].shape)}"
            )


def keep_fp32(path: str) -> bool:
    """Parameters that stay float32 whatever the model dtype: the router bias."""
    return path.endswith("expert_bias")


def cast(weights: dict, dtype: Optional[mx.Dtype]) -> dict:
    if dtype is None:
        return weights
    return {
        k: w.astype(dtype) if mx.issubdtype(w.dtype, mx.floating) and not keep_fp32(k) else w
        for k, w in weights.items()
    }


def load_into(model: nn.Module, files: Iterable[Path], args: ModelArgs, dtype=None,
              keep: Optional[Callable[[str], bool]] = None) -> None:
    """``keep(checkpoint key)``: load only those tensors (a pipeline stage); the rest are never read."""
    weights = {}
    for f in files:
        w = load_safetensors(f)
        weights.update(w if keep is None else {k: v for k, v in w.items() if keep(k)})
    weights = cast(sanitize(weights, args), dtype)
    if args.quantization:
        q = args.quantization
        nn.quantize(
            model, q.get("group_size", 64), q.get("bits", 4), mode=q.get("mode", "affine"),
            class_predicate=quantization_predicate(q, weights),
        )
    check_weights(model, weights)
    model.load_weights(list(weights.items()), strict=False)


def load_group(module: nn.Module, prefix: str, weights: dict, args: ModelArgs, dtype) -> None:
    """Load one layer's (``prefix`` ``model.layers.{i}.``) or the globals' (``""``) source
    weights into ``module``. Consumes ``weights``: afterwards the lazy source tensors live only
    in the module, so nothing else holds them once it is dropped."""
    local = {k[len(prefix):]: v for k, v in cast(sanitize(weights, args), dtype).items()}
    weights.clear()
    check_weights(module, local)
    module.load_weights(list(local.items()), strict=False)
