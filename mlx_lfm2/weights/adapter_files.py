"""Adapter files: the names of an adapter folder's files, atomic writes, and reading its
config and a safetensors file with every header checked before MLX reads it. Shared by
mlx-lm's layout (``adapters``) and PEFT's (``peft``)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Optional

import mlx.core as mx

from .layouts import WeightsError, check_safetensors

CONFIG, WEIGHTS = "adapter_config.json", "adapters.safetensors"
PEFT_WEIGHTS = "adapter_model.safetensors"


class AdapterError(ValueError):
    """An adapter folder that does not fit the model (or is not an adapter folder)."""


def write_atomic(path: Path, write) -> None:
    """``write(tmp_path)`` then rename over ``path``: a crash leaves the old file or none."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_safetensors(path: Path, arrays: dict, metadata: Optional[dict] = None) -> None:
    write_atomic(Path(path), lambda tmp: mx.save_safetensors(tmp, arrays, metadata=metadata or {}))


def save_json(path: Path, obj: dict) -> None:
    write_atomic(Path(path), lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2) + "\n"))


def read_config(folder: Path) -> dict:
    f = folder / CONFIG
    if not folder.is_dir():
        raise AdapterError(f"adapter path {folder} is not a folder")
    if not f.exists():
        raise AdapterError(f"{folder} has no {CONFIG}: is it an adapter folder (mlx-lm or PEFT)?")
    try:
        cfg = json.loads(f.read_text())
    except ValueError as e:
        raise AdapterError(f"{f} is not valid JSON: {e}") from e
    if not isinstance(cfg, dict):
        raise AdapterError(f"{f} must hold a JSON object")
    return cfg


def read_weights(path: Path) -> dict:
    if not path.exists():
        raise AdapterError(f"{path.parent} has no {path.name}")
    try:
        check_safetensors(path)
        return mx.load(str(path))
    except (WeightsError, RuntimeError, ValueError) as e:
        raise AdapterError(str(e)) from e
