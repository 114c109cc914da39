"""Adapter folders: mlx-lm's layout (ours too) and PEFT's.

mlx-lm's layout, which mlx-lm, mlx-lm-lora and LM Studio's tooling read:

* ``adapter_config.json``: ``fine_tune_type`` (lora | dora | full), ``num_layers`` (the
  last n blocks; -1 all), ``lora_parameters`` {``rank``, ``scale``, ``dropout``, optional
  ``keys``: module paths inside a block, mlx-lm's names}; we add ``expert_rank`` only when
  the experts' rank differs (mlx-lm cannot read such a file).
* ``adapters.safetensors``: ``<module path>.lora_a`` / ``.lora_b`` (DoRA also ``.m``),
  module paths in mlx-lm's names (``feed_forward.switch_mlp.gate_proj``, never our
  ``feed_forward.experts.w1``); for ``full``, every trained parameter.

PEFT's (``adapter_config.json`` with ``peft_type: LORA``, ``adapter_model.safetensors``
with ``base_model.model.<hub path>.lora_A.weight`` ``[r, in]`` / ``lora_B.weight``
``[out, r]``, scale ``lora_alpha / r``): ``load_adapters`` reads it, ``save_peft`` writes it.
Every file is validated (header, names, shapes, dtypes) before MLX reads a byte of it.
"""

from __future__ import annotations

import hashlib
import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Union

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..model.lora import ADAPTER_LEAVES, apply_lora
from .adapter_files import (CONFIG, PEFT_WEIGHTS, WEIGHTS, AdapterError, read_config, read_weights, save_json,
                            save_safetensors)
from .layouts import from_mlx_lm_name, to_mlx_lm_name
from .peft import peft_to_mlx_lm

FINE_TUNE_TYPES = ("lora", "dora", "full")
DEFAULT_LORA = {"rank": 8, "dropout": 0.0, "scale": 20.0}


# --- mlx-lm's layout -----------------------------------------------------------------------


def inner_key(key: str) -> str:
    """An mlx-lm module path inside a block -> ours (``feed_forward.switch_mlp.gate_proj`` ->
    ``feed_forward.experts.w1``)."""
    return from_mlx_lm_name(key + ".weight")[: -len(".weight")]


def outer_key(key: str, model_type: str) -> str:
    return to_mlx_lm_name(key + ".weight", model_type)[: -len(".weight")]


def adapter_weights(model: nn.Module, fine_tune_type: str) -> dict:
    """The arrays an adapter file holds, under mlx-lm's names."""
    params = tree_flatten(model.trainable_parameters() if fine_tune_type == "full" else model.parameters())
    keep = (lambda k: True) if fine_tune_type == "full" else (lambda k: k.rsplit(".", 1)[-1] in ADAPTER_LEAVES)
    return {to_mlx_lm_name(k, model.model_type): v for k, v in params if keep(k)}


def adapter_config(model: nn.Module, fine_tune_type: str, num_layers: int, lora: dict, extra=None) -> dict:
    """``adapter_config.json`` as mlx-lm writes it (``extra``: the rest of the run's settings)."""
    lora = {**DEFAULT_LORA, **lora}
    if lora.get("keys") is not None:
        lora["keys"] = sorted(outer_key(k, model.model_type) for k in lora["keys"])
    if lora.get("expert_rank") in (None, lora["rank"]):
        lora.pop("expert_rank", None)
    return {**(extra or {}), "fine_tune_type": fine_tune_type, "num_layers": num_layers, "lora_parameters": lora}


def save_adapters(model: nn.Module, folder: Union[str, Path], config: dict) -> Path:
    """``adapters.safetensors`` + ``adapter_config.json`` in ``folder`` (atomic writes)."""
    folder = Path(folder)
    weights = adapter_weights(model, config["fine_tune_type"])
    mx.eval(weights)
    save_safetensors(folder / WEIGHTS, weights)
    save_json(folder / CONFIG, config)
    return folder / WEIGHTS


def check_lora_config(cfg: dict, where: Path) -> tuple[str, int, dict]:
    kind = cfg.get("fine_tune_type", "lora")
    if kind not in FINE_TUNE_TYPES:
        raise AdapterError(f"{where}: fine_tune_type {kind!r} is not one of {FINE_TUNE_TYPES}")
    n = cfg.get("num_layers", 16)
    if not isinstance(n, int) or isinstance(n, bool) or n < -1:
        raise AdapterError(f"{where}: num_layers must be an integer >= -1, not {n!r}")
    lora = {**DEFAULT_LORA, **(cfg.get("lora_parameters") or {})}
    for name in ("rank", "expert_rank"):
        r = lora.get(name)
        if r is not None and (not isinstance(r, int) or isinstance(r, bool) or not 0 < r <= 4096):
            raise AdapterError(f"{where}: lora_parameters.{name} must be an integer in 1..4096, not {r!r}")
    if not isinstance(lora["scale"], (int, float)) or not math.isfinite(lora["scale"]):
        raise AdapterError(f"{where}: lora_parameters.scale must be a finite number")
    keys = lora.get("keys")
    if keys is not None and not (isinstance(keys, list) and all(isinstance(k, str) for k in keys)):
        raise AdapterError(f"{where}: lora_parameters.keys must be a list of module paths")
    return kind, n, lora


def add_adapter_layers(model: nn.Module, kind: str, num_layers: int, lora: dict) -> int:
    """Wrap the model's layers as an adapter config says (mlx-lm's rules)."""
    keys = None if lora.get("keys") is None else [inner_key(k) for k in lora["keys"]]
    return apply_lora(model, num_layers, rank=lora["rank"], scale=float(lora["scale"]),
                      dropout=float(lora.get("dropout", 0.0)), keys=keys, dora=kind == "dora",
                      expert_rank=lora.get("expert_rank"))


def check_against(model: nn.Module, weights: dict, where: Path, full: bool) -> None:
    """Every tensor names a parameter of the (wrapped) model with its shape and a float dtype."""
    params = dict(tree_flatten(model.parameters()))
    if not full:
        params = {k: v for k, v in params.items() if k.rsplit(".", 1)[-1] in ADAPTER_LEAVES}
    check_shapes({k: tuple(v.shape) for k, v in params.items()}, weights, where, require_all=not full)


def check_shapes(expected: dict, weights: dict, where: Path, require_all: bool = True) -> None:
    """Every tensor is one of ``expected`` ``{name: shape}``, with its shape and a float dtype
    (and, ``require_all``, every expected one is there)."""
    errors = []
    for name, w in sorted(weights.items()):
        if name not in expected:
            errors.append(f"{name}: not an adapter parameter of this model")
        elif tuple(w.shape) != tuple(expected[name]):
            errors.append(f"{name}: shape {tuple(w.shape)}, the model's is {tuple(expected[name])}")
        elif not mx.issubdtype(w.dtype, mx.floating):
            errors.append(f"{name}: dtype {w.dtype} is not a float type")
    missing = sorted(set(expected) - set(weights)) if require_all else []
    if missing:
        errors.append(f"{len(missing)} adapter arrays missing, e.g. {missing[:3]}")
    if errors:
        shown = "\n  ".join(errors[:8]) + (f"\n  ... and {len(errors) - 8} more" if len(errors) > 8 else "")
        raise AdapterError(f"adapter {where} does not fit this model:\n  {shown}")


def load_adapters(model: nn.Module, path: Union[str, Path]) -> dict:
    """Add the adapter in ``path`` (mlx-lm's layout or PEFT's) to ``model``; returns its config
    in mlx-lm's form. The model must be unfused (``load(..., adapter_path=...)`` sees to it)."""
    folder = Path(path).expanduser()
    cfg = read_config(folder)
    if "peft_type" in cfg:
        cfg, weights = peft_to_mlx_lm(folder, cfg, model)
    else:
        weights = None
    kind, num_layers, lora = check_lora_config(cfg, folder / CONFIG)
    if weights is None:
        weights = read_weights(folder / WEIGHTS)
    weights = {from_mlx_lm_name(k): v for k, v in weights.items()}
    if kind != "full":
        add_adapter_layers(model, kind, num_layers, lora)
    check_against(model, weights, folder, full=kind == "full")
    model.load_weights(list(weights.items()), strict=False)
    mx.eval(model.parameters())
    return {**cfg, "fine_tune_type": kind, "num_layers": num_layers, "lora_parameters": lora}



# --- resident adapters (several on one base, chosen per batch row) ---------------------------


def read_resident(adapters, path: Union[str, Path]) -> tuple[dict, float, dict]:
    """An adapter folder (mlx-lm's layout or PEFT's) read for a ``model.lora_rows.AdapterSet``:
    ``({module path: (A, B)}, scale, info)``, every array checked against the base's layers
    (names, shapes, dtypes; the file's header, sizes and byte ranges before MLX reads it), then
    read, its fingerprint hashed meanwhile."""
    folder = Path(path).expanduser()
    cfg = read_config(folder)
    weights, file = None, folder / WEIGHTS
    if "peft_type" in cfg:
        cfg, weights = peft_to_mlx_lm(folder, cfg, adapters.model)
        file = folder / PEFT_WEIGHTS
    kind, num_layers, lora = check_lora_config(cfg, folder / CONFIG)
    if kind != "lora":
        raise AdapterError(f"{folder}: a {kind} adapter cannot share the base with other adapters (only LoRA can): "
                           "serve it alone with --adapter-path, or fuse it into the model (python -m mlx_lfm2.fuse)")
    if weights is None:
        weights = read_weights(file)
    weights = {from_mlx_lm_name(k): v for k, v in weights.items()}
    keys = None if lora.get("keys") is None else [inner_key(k) for k in lora["keys"]]
    targets = adapters.targets(num_layers, keys, lora["rank"], lora.get("expert_rank"))
    check_shapes({f"{p}.{leaf}": shape for p, shapes in targets.items() for leaf, shape in zip(ADAPTER_LEAVES, shapes)},
                 weights, folder)
    arrays = {p: (weights[f"{p}.lora_a"], weights[f"{p}.lora_b"]) for p in targets}
    with ThreadPoolExecutor(1) as pool:  # the hash (which releases the GIL) beside MLX's read
        digest = pool.submit(fingerprint, [folder / CONFIG, file])
        mx.eval([x for ab in arrays.values() for x in ab])
        info = {"path": str(folder), "rank": lora["rank"], "scale": float(lora["scale"]),
                "fingerprint": digest.result()}
    return arrays, float(lora["scale"]), info


def fingerprint(files) -> str:
    """What identifies an adapter's content (its prompt caches' namespace): a hash of its files."""
    h = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def add_resident(adapters, name: str, path: Union[str, Path]) -> dict:
    """Read ``path`` (``read_resident``) and make it resident as ``name``; returns its info."""
    arrays, scale, info = read_resident(adapters, path)
    adapters.add(name, arrays, scale, info)
    return info
