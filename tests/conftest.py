"""Shared fixtures: random-weight hub checkpoints and the real LFM2 tokenizer files."""

import os
from pathlib import Path

import pytest

from mlx_lfm2.random_checkpoint import PRESETS, write_checkpoint

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = Path(os.environ.get("LFM2_REFERENCE", ROOT.parent / "shared/lfm2-reference/LFM2-350M"))


def reference_dir() -> Path:
    if not (REFERENCE / "tokenizer.json").exists():
        pytest.skip(f"real LFM2 tokenizer files not found at {REFERENCE} (set LFM2_REFERENCE)")
    return REFERENCE


def tiny_config(kind: str = "tiny-moe", layers=None, **overrides) -> dict:
    cfg = PRESETS[kind](layers) if layers else PRESETS[kind]()
    cfg.update(overrides)
    return cfg


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """``checkpoint(config, dtype="float32", tokenizer=False) -> folder`` (cached per config)."""
    made = {}

    def make(config: dict, dtype: str = "float32", tokenizer: bool = False, seed: int = 0) -> Path:
        key = (repr(sorted(config.items())), dtype, tokenizer, seed)
        if key not in made:
            out = tmp_path_factory.mktemp("ckpt")
            made[key] = write_checkpoint(out, config, seed=seed, dtype=dtype,
                                         tokenizer_from=reference_dir() if tokenizer else None)
        return made[key]

    return make


@pytest.fixture(scope="session")
def chat_model(checkpoint):
    """A tiny MoE model with the real LFM2 tokenizer and template: ``(model, tokenizer, folder)``."""
    from mlx_lfm2 import load

    folder = checkpoint(tiny_config("tiny-moe"), tokenizer=True)
    model, tokenizer = load(folder)
    return model, tokenizer, folder
