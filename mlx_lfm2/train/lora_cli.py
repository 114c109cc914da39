"""``python -m mlx_lfm2.lora``: LoRA, DoRA, QLoRA (any quantized folder) or full fine-tuning.

mlx-lm's flags and YAML config (``-c``), plus ``--epochs``, ``--max-grad-norm``, ``--pack``,
``--train-mode dpo``, ``--beta`` and ``lora_parameters.expert_rank``; the adapter folder is
mlx-lm's layout, so ``mlx_lm.generate --adapter-path`` reads it too.

    python -m mlx_lfm2.lora --model M --train --data DATA_DIR --iters 200 --mask-prompt
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..weights.adapters import DEFAULT_LORA, AdapterError, adapter_config, read_weights
from .trainer import TrainConfig

DEFAULTS = {
    "model": None, "train": False, "data": "data", "fine_tune_type": "lora", "optimizer": "adam",
    "optimizer_config": {}, "mask_prompt": False, "num_layers": 16, "batch_size": 4, "iters": 1000,
    "epochs": None, "val_batches": 25, "learning_rate": 1e-5, "steps_per_report": 10, "steps_per_eval": 200,
    "grad_accumulation_steps": 1, "resume_adapter_file": None, "adapter_path": "adapters", "save_every": 100,
    "test": False, "test_batches": 500, "max_seq_length": 2048, "grad_checkpoint": False, "seed": 0,
    "lr_schedule": None, "lora_parameters": dict(DEFAULT_LORA), "max_grad_norm": None, "pack": False,
    "train_mode": "sft", "beta": 0.1,
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mlx_lfm2.lora", description=__doc__.split("\n\n")[0])
    a = p.add_argument
    a("--model", help="model folder or hub repo (a quantized folder trains as QLoRA)")
    a("--train", action="store_true", default=None, help="train (else only --test)")
    a("--data", help="folder with train.jsonl / valid.jsonl / test.jsonl, or a hub dataset id")
    a("--fine-tune-type", choices=["lora", "dora", "full"])
    a("--optimizer", choices=["adam", "adamw", "sgd", "adafactor", "muon"])
    a("--mask-prompt", action="store_true", default=None,
      help="train only the assistant turns (every one of a multi-turn chat)")
    a("--num-layers", type=int, help="adapt the last N blocks (-1: all; default 16)")
    a("--batch-size", type=int)
    a("--iters", type=int, help="optimizer steps (default 1000)")
    a("--epochs", type=int, help="passes over the training set (overrides --iters)")
    a("--val-batches", type=int, help="validation batches (-1: the whole set)")
    a("--learning-rate", type=float)
    a("--steps-per-report", type=int)
    a("--steps-per-eval", type=int)
    a("--grad-accumulation-steps", type=int)
    a("--resume-adapter-file", help="adapters.safetensors to start from; its folder's training state "
      "(optimizer, step) resumes the run")
    a("--adapter-path", help="folder to write the adapter to (default ./adapters)")
    a("--save-every", type=int)
    a("--test", action="store_true", default=None, help="report the loss on test.jsonl")
    a("--test-batches", type=int)
    a("--max-seq-length", type=int)
    a("-c", "--config", help="YAML file of these settings (flags given here win)")
    a("--grad-checkpoint", action="store_true", default=None)
    a("--seed", type=int)
    a("--max-grad-norm", type=float, help="clip the global gradient norm to this")
    a("--pack", action="store_true", default=None, help="pack several examples per row (exact: documents "
      "never see each other)")
    a("--train-mode", choices=["sft", "dpo"], help="dpo: rows {prompt, chosen, rejected}; the reference is "
      "the base model (adapters off)")
    a("--beta", type=float, help="DPO temperature (default 0.1)")
    return p


def settings(argv=None) -> dict:
    args = vars(build_parser().parse_args(argv))
    config = args.pop("config")
    merged = dict(DEFAULTS)
    if config:
        import yaml

        try:
            loaded = yaml.safe_load(Path(config).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise SystemExit(f"error: cannot read --config {config}: {e}")
        if not isinstance(loaded, dict):
            raise SystemExit(f"error: {config} must hold a mapping of settings")
        unknown = sorted(set(loaded) - set(DEFAULTS))
        if unknown:
            raise SystemExit(f"error: {config}: unknown settings {unknown}")
        merged.update(loaded)
    merged.update({k: v for k, v in args.items() if v is not None})
    merged["lora_parameters"] = {**DEFAULT_LORA, **(merged.get("lora_parameters") or {})}
    if not merged["model"]:
        raise SystemExit("error: --model is required (a folder or hub repo id)")
    return merged


def train_config(s: dict) -> TrainConfig:
    fields = TrainConfig.__dataclass_fields__
    return TrainConfig(**{k: v for k, v in s.items() if k in fields})


def prepare(model, s: dict) -> dict:
    """Add the adapter layers (or unfreeze for full) and freeze the rest; returns the adapter config."""
    from ..model.lora import trainable_adapters
    from ..weights.adapters import add_adapter_layers

    kind, n = s["fine_tune_type"], s["num_layers"]
    if kind == "full":
        if model.args.quantization:
            raise SystemExit("error: full fine-tuning needs float weights; use lora/dora on a quantized model")
        model.freeze()
        for layer in model.layers if n < 0 else model.layers[-n:]:
            layer.unfreeze()
        model.freeze(keys=["expert_bias"], strict=False)
    else:
        add_adapter_layers(model, kind, n, s["lora_parameters"])
        trainable_adapters(model)
    keep = {k: v for k, v in s.items() if k not in ("fine_tune_type", "num_layers", "lora_parameters")}
    return adapter_config(model, kind, n, s["lora_parameters"], keep)


def main(argv=None) -> int:
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from ..weights.loader import load
    from .data import DataError, load_datasets
    from .trainer import Batches, evaluate, loss_fn, train

    s = settings(argv)
    cfg = train_config(s)
    mx.random.seed(cfg.seed)
    model, tokenizer = load(s["model"], pipeline=False, fuse=False)
    try:
        data = load_datasets(s["data"], tokenizer, s["mask_prompt"], cfg.max_seq_length)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    config = prepare(model, s)
    if s["resume_adapter_file"]:
        try:
            model.load_weights(list(read_weights(Path(s["resume_adapter_file"])).items()), strict=False)
        except (AdapterError, ValueError) as e:
            print(f"error: --resume-adapter-file: {e}", file=sys.stderr)
            return 2
    trained = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    total = sum(v.size for _, v in tree_flatten(model.parameters()))
    print(f"trainable parameters: {trained / 1e6:.3f}M of {total / 1e6:.3f}M ({100 * trained / total:.3f}%)")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    if s["train"]:
        if not data["train"]:
            print("error: --train needs train.jsonl in --data", file=sys.stderr)
            return 2
        Path(cfg.adapter_path).mkdir(parents=True, exist_ok=True)
        try:
            result = train(model, cfg, data["train"], data["valid"], pad, config,
                           resume=Path(s["resume_adapter_file"]) if s["resume_adapter_file"] else None)
        except (ValueError, AdapterError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"saved {cfg.adapter_path}/adapters.safetensors after {result['step']} steps")
    if s["test"]:
        if not data["test"]:
            print("error: --test needs test.jsonl in --data", file=sys.stderr)
            return 2
        test_b = Batches(data["test"], cfg, pad, shuffle=False, pack=False)
        loss = evaluate(model, test_b, s["test_batches"], loss_fn(cfg, evaluating=True))
        print(f"test loss {loss:.4f}")
    return 0
