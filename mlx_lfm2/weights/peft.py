"""PEFT LoRA folders (what transformers users and Liquid's published LFM2 LoRAs ship), read
into mlx-lm's layout and written from it.

PEFT keys are ``base_model.model.<hub module path>.lora_A.weight`` ``[r, in]`` and
``.lora_B.weight`` ``[out, r]``, scaled by ``lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA);
per-expert modules (``feed_forward.experts.{e}.w1``) are stacked into our experts' A/B.
Modules PEFT adapted in only some layers get zero adapters elsewhere (the identity), so
the adapter maps onto mlx-lm's "last ``num_layers`` blocks, these ``keys``" shape.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import mlx.core as mx
import numpy as np

from .adapter_files import PEFT_WEIGHTS, AdapterError, read_weights, save_json, save_safetensors
from .layouts import to_mlx_lm_name

PREFIX = "base_model.model."
_KEY = re.compile(r"^(?:base_model\.model\.)?(model\.layers\.(\d+)\.(.+?))\.lora_([AB])(?:\.default)?\.weight$")
_EXPERT = re.compile(r"^(.*\.experts)\.(\d+)\.(w[123])$")


def peft_scale(cfg: dict, where: Path) -> tuple[int, float]:
    r, alpha = cfg.get("r"), cfg.get("lora_alpha", cfg.get("r"))
    if not isinstance(r, int) or r <= 0 or not isinstance(alpha, (int, float)):
        raise AdapterError(f"{where}: a PEFT LoRA config needs an integer r and a numeric lora_alpha")
    return r, alpha / (math.sqrt(r) if cfg.get("use_rslora") else r)


def peft_to_mlx_lm(folder: Path, cfg: dict, model) -> tuple[dict, dict]:
    """(mlx-lm adapter config, mlx-lm-named arrays) for a PEFT LoRA folder."""
    where = folder / "adapter_config.json"
    if cfg.get("peft_type") != "LORA":
        raise AdapterError(f"{where}: peft_type {cfg.get('peft_type')!r}: only LORA adapters can be read")
    if cfg.get("use_dora"):
        raise AdapterError(f"{where}: PEFT DoRA adapters are not supported; export a plain LoRA")
    rank, scale = peft_scale(cfg, where)
    raw = read_weights(folder / PEFT_WEIGHTS)
    parts: dict = {}  # (layer, module path inside the block) -> {"A": [r, in], "B": [out, r]}
    for key, w in raw.items():
        m = _KEY.match(key)
        if m is None:
            raise AdapterError(f"{folder / PEFT_WEIGHTS}: {key} is not a LoRA weight of an LFM2 block")
        parts.setdefault((int(m[2]), m[3]), {})[m[4]] = w
    experts: dict = {}
    weights = {}
    for (layer, path), ab in parts.items():
        if set(ab) != {"A", "B"}:
            raise AdapterError(f"{folder / PEFT_WEIGHTS}: layer {layer} {path} lacks lora_{'AB'[('A' in ab)]}")
        e = _EXPERT.match(path)
        if e:
            experts.setdefault((layer, f"{e[1]}.{e[3]}"), {})[int(e[2])] = ab
            continue
        weights[(layer, path)] = (ab["A"].T, ab["B"].T)  # ours: A [in, r], B [r, out]
    E = getattr(model.args, "num_experts", 0)
    for (layer, path), per in experts.items():
        some = next(iter(per.values()))
        a = mx.stack([per[i]["A"] if i in per else mx.zeros_like(some["A"]) for i in range(E)])  # [E, r, in]
        b = mx.stack([per[i]["B"] if i in per else mx.zeros_like(some["B"]) for i in range(E)])  # [E, out, r]
        weights[(layer, path)] = (a, b)
    return fill_layers(model, weights, rank, scale, cfg)


def fill_layers(model, weights: dict, rank: int, scale: float, cfg: dict) -> tuple[dict, dict]:
    """Zero adapters where PEFT had none, over the blocks from the first adapted one to the last."""
    keys = sorted({p for _, p in weights})
    first = min(layer for layer, _ in weights)
    n = len(model.layers)
    out = {}
    for layer in range(first, n):
        block = dict(model.layers[layer].named_modules())
        for path in keys:
            if path not in block:
                continue  # e.g. q_proj in a conv block
            if (layer, path) in weights:
                a, b = weights[(layer, path)]
            else:
                a, b = zero_adapter(block[path], rank)
            name = to_mlx_lm_name(f"model.layers.{layer}.{path}.weight", model.model_type)[: -len(".weight")]
            out[f"{name}.lora_a"], out[f"{name}.lora_b"] = a, b
    config = {"fine_tune_type": "lora", "num_layers": n - first,
              "lora_parameters": {"rank": rank, "scale": scale, "dropout": float(cfg.get("lora_dropout", 0.0)),
                                  "keys": [to_mlx_lm_name(k + ".weight", model.model_type)[:-7] for k in keys]},
              "peft_base_model": cfg.get("base_model_name_or_path")}
    return config, out


def zero_adapter(module, rank: int):
    module = module["linear"] if "linear" in module else module  # a resident adapters' slot layer: its base
    w = module["weight"]
    in_dims = w.shape[-1] * (32 // module.bits if "scales" in module else 1)
    if w.ndim == 3:
        return mx.zeros((w.shape[0], rank, in_dims)), mx.zeros((w.shape[0], w.shape[1], rank))
    return mx.zeros((in_dims, rank)), mx.zeros((rank, w.shape[0]))


def save_peft(model, folder, base_model: str = "") -> Path:
    """The model's LoRA adapters as a PEFT folder (``lora_alpha = scale * r``, so PEFT's
    ``alpha / r`` is our scale); experts are written per expert, as the hub names them."""
    from ..model.lora import DoRALinear, LoRASwitchLinear, adapter_layers

    folder = Path(folder)
    arrays, targets, layers, ranks, scales = {}, set(), set(), set(), set()
    for path, m in adapter_layers(model):
        if isinstance(m, DoRALinear):
            raise AdapterError("DoRA adapters cannot be written as PEFT LoRA")
        layer = int(re.search(r"layers\.(\d+)\.", path)[1])
        layers.add(layer)
        ranks.add(m.rank)
        scales.add(m.scale)
        if isinstance(m, LoRASwitchLinear):
            prefix, leaf = path.rsplit(".", 1)
            for e in range(m.lora_a.shape[0]):
                arrays[f"{PREFIX}{prefix}.{e}.{leaf}.lora_A.weight"] = m.lora_a[e]
                arrays[f"{PREFIX}{prefix}.{e}.{leaf}.lora_B.weight"] = m.lora_b[e]
            targets.add(leaf)
        else:
            arrays[f"{PREFIX}{path}.lora_A.weight"] = m.lora_a.T
            arrays[f"{PREFIX}{path}.lora_B.weight"] = m.lora_b.T
            targets.add(path.rsplit(".", 1)[1])
    if len(ranks) != 1 or len(scales) != 1:
        raise AdapterError("PEFT needs one rank and one scale for every adapted module (expert_rank differs?)")
    r, scale = ranks.pop(), scales.pop()
    save_safetensors(folder / PEFT_WEIGHTS, {k: mx.array(np.ascontiguousarray(np.array(v))) for k, v in arrays.items()},
                     metadata={"format": "pt"})
    save_json(folder / "adapter_config.json", {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": scale * r, "lora_dropout": 0.0,
        "target_modules": sorted(targets), "layers_to_transform": sorted(layers), "bias": "none",
        "base_model_name_or_path": base_model, "fan_in_fan_out": False, "use_rslora": False, "use_dora": False})
    return folder / PEFT_WEIGHTS
