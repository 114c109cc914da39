"""The training loop: SFT or DPO on adapters (or the full model), resumable step for step.

One ``TrainConfig`` holds a run's settings. Batch ``s`` of a run is a function of (data,
seed, s) only (``packing.epoch_rows``), dropout is seeded per step, and a save writes the
adapters, the optimizer state and the step together, so a resumed run takes exactly the
steps an uninterrupted one would.

Files in the adapter folder: ``adapters.safetensors`` + ``adapter_config.json`` (mlx-lm's
layout), ``{step:07d}_adapters.safetensors`` at each save (as mlx-lm), and
``training_state.safetensors`` (optimizer state; the step in its metadata).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from ..model.blocks import Block
from ..weights.adapters import AdapterError, save_adapters, save_safetensors
from .data import Pair
from .losses import CHUNK, dpo_loss, eval_loss, sft_loss
from .packing import collate, epoch_rows, segment_state, segments_applied

STATE = "training_state.safetensors"


@dataclass
class TrainConfig:
    batch_size: int = 4
    iters: int = 1000
    epochs: Optional[int] = None  # when set, iters = epochs * batches per epoch
    learning_rate: float = 1e-5
    optimizer: str = "adam"
    optimizer_config: dict = field(default_factory=dict)
    lr_schedule: Optional[dict] = None
    max_grad_norm: Optional[float] = None  # gradient clipping (global norm)
    steps_per_report: int = 10
    steps_per_eval: int = 200
    val_batches: int = 25
    save_every: int = 100
    max_seq_length: int = 2048
    pack: bool = False
    grad_checkpoint: bool = False
    grad_accumulation_steps: int = 1  # batches per optimizer step
    train_mode: str = "sft"  # or "dpo"
    beta: float = 0.1
    seed: int = 0
    chunk: int = CHUNK
    adapter_path: str = "adapters"


def make_optimizer(cfg: TrainConfig) -> optim.Optimizer:
    lr = cfg.learning_rate
    if cfg.lr_schedule:
        from mlx_lm.tuner.utils import build_schedule  # mlx-lm's schedule format, only when asked for

        lr = build_schedule(cfg.lr_schedule)
    kinds = {"adam": optim.Adam, "adamw": optim.AdamW, "sgd": optim.SGD, "adafactor": optim.Adafactor,
             "muon": getattr(optim, "Muon", None)}
    if kinds.get(cfg.optimizer) is None:
        raise ValueError(f"unknown optimizer {cfg.optimizer!r}: one of adam, adamw, sgd, adafactor, muon")
    return kinds[cfg.optimizer](learning_rate=lr, **(cfg.optimizer_config or {}).get(cfg.optimizer, {}))


class Batches:
    """Step -> batch, the same for every run with the same data and seed."""

    def __init__(self, examples: list, cfg: TrainConfig, pad_id: int, shuffle: bool = True,
                 pack: Optional[bool] = None):
        if not examples:
            raise ValueError("the data set is empty")
        self.examples, self.cfg, self.pad_id, self.shuffle = examples, cfg, pad_id, shuffle
        self.dpo = isinstance(examples[0], Pair)
        self.pack = (cfg.pack if pack is None else pack) and not self.dpo
        self._epoch, self._rows = None, None
        if not self.rows(0):
            raise ValueError(f"the data has {len(examples)} examples, fewer than --batch-size {cfg.batch_size}")

    def rows(self, epoch: int) -> list:
        if epoch != self._epoch:
            c = self.cfg
            self._rows = epoch_rows(self.examples, c.batch_size, c.max_seq_length, self.pack, c.seed,
                                    epoch if self.shuffle else 0)
            self._epoch = epoch
        return self._rows

    def per_epoch(self) -> int:
        return len(self.rows(0))

    def __getitem__(self, step: int):
        n = self.per_epoch()  # epoch 0's count; a packed epoch may make a batch fewer or more
        epoch = self.rows(step // n)
        rows = epoch[step % n % len(epoch)]
        if self.dpo:
            return tuple(collate([[getattr(r[0], k)] for r in rows], self.pad_id) for k in ("chosen", "rejected"))
        return (collate(rows, self.pad_id),)


def loss_fn(cfg: TrainConfig, evaluating: bool = False) -> Callable:
    """The training loss (``evaluating``: the same value without the fused gradient work)."""
    if cfg.train_mode == "dpo":
        return lambda model, chosen, rejected: dpo_loss(model, chosen, rejected, cfg.beta, cfg.chunk)
    if cfg.train_mode != "sft":
        raise ValueError(f"--train-mode must be sft or dpo, not {cfg.train_mode!r}")
    sft = eval_loss if evaluating else sft_loss
    return lambda model, batch: sft(model, batch, cfg.chunk)


def evaluate(model, batches: Batches, num_batches: int, loss) -> float:
    """Token-weighted mean loss over the first ``num_batches`` batches (-1: all)."""
    n = batches.per_epoch() if num_batches < 0 else min(num_batches, batches.per_epoch())
    total, count = 0.0, 0.0
    for i in range(n):
        value, k = loss(model, *batches[i])
        mx.eval(value, k)
        total, count = total + float(value) * float(k), count + float(k)
    return total / max(count, 1)


class checkpointed_blocks:
    """``mx.checkpoint`` around every block's forward while training (mlx-lm's --grad-checkpoint):
    activations are recomputed in the backward pass instead of kept."""

    def __init__(self, model, on: bool):
        self.model, self.on, self.original = model, on, Block.__call__

    def __enter__(self):
        if self.on:
            original = self.original

            def call(block, x, cache=None, mask="causal"):
                segments = segment_state(block)  # packed rows: the recompute runs after `packed` exits

                def inner(params, x):
                    block.update(params)
                    with segments_applied(segments):
                        return original(block, x, cache, mask)

                return mx.checkpoint(inner)(block.trainable_parameters(), x)

            Block.__call__ = call

    def __exit__(self, *exc):
        Block.__call__ = self.original


def save_state(folder: Path, optimizer: optim.Optimizer, step: int) -> None:
    state = dict(tree_flatten(optimizer.state))
    save_safetensors(folder / STATE, state, metadata={"step": str(step)})


def load_state(folder: Path, optimizer: optim.Optimizer, model) -> int:
    """Restore the optimizer state saved next to an adapter file; returns the step."""
    f = folder / STATE
    if not f.exists():
        raise AdapterError(f"{folder} has no {STATE}: the optimizer cannot resume (its adapters still load "
                           "as initial weights with --resume-adapter-file and a fresh optimizer)")
    state, meta = mx.load(str(f), return_metadata=True)
    optimizer.init(model.trainable_parameters())
    optimizer.state = tree_unflatten(list(state.items()))
    return int(meta.get("step", 0))


class Progress:
    """One line per report: step, loss, validation loss, learning rate, tokens/s, peak memory, ETA."""

    def __init__(self, total: int, start: int, out=print):
        self.total, self.start, self.out = total, start, out
        self.t0 = self.t_report = time.perf_counter()
        self.losses, self.tokens, self.trained = [], 0, 0

    def add(self, loss: float, tokens: int, trained: int) -> None:
        self.losses.append(loss)
        self.tokens += tokens
        self.trained += trained

    def line(self, step: int, lr: float, val: Optional[float]) -> str:
        now = time.perf_counter()
        dt, self.t_report = now - self.t_report, now
        rate = (step - self.start) / max(now - self.t0, 1e-9)
        eta = (self.total - step) / rate if rate > 0 else float("inf")
        loss = sum(self.losses) / max(len(self.losses), 1)
        text = (f"step {step}/{self.total} | loss {loss:.4f}" + (f" | val {val:.4f}" if val is not None else "")
                + f" | lr {lr:.2e} | {self.tokens / dt:.0f} tok/s ({self.trained / dt:.0f} trained)"
                + f" | peak {mx.get_peak_memory() / 1e9:.2f} GB | ETA {fmt_time(eta)}")
        self.losses, self.tokens, self.trained = [], 0, 0
        self.out(text)
        return text


def fmt_time(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    s = int(s)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def train(model, cfg: TrainConfig, train_set: list, valid_set: list, pad_id: int, adapter_config: dict,
          resume: Optional[Path] = None, out=print) -> dict:
    """Train ``model``'s trainable parameters; returns {"step", "loss", "val_loss"}."""
    folder = Path(cfg.adapter_path)
    train_b = Batches(train_set, cfg, pad_id)
    # Validation rows stay unpacked: the same loss (packing is exact), whatever the set's size.
    valid_b = Batches(valid_set, cfg, pad_id, shuffle=False, pack=False) if len(valid_set) >= cfg.batch_size else None
    accum = max(cfg.grad_accumulation_steps, 1)
    total = max(cfg.epochs * train_b.per_epoch() // accum, 1) if cfg.epochs else cfg.iters
    optimizer = make_optimizer(cfg)
    loss, val_loss = loss_fn(cfg), loss_fn(cfg, evaluating=True)
    step = load_state(Path(resume).parent, optimizer, model) if resume else 0
    value_and_grad = nn.value_and_grad(model, loss)
    progress, val, last = Progress(total, step, out), None, float("nan")
    model.train()
    with checkpointed_blocks(model, cfg.grad_checkpoint):
        while step < total:
            if valid_b is not None and step % cfg.steps_per_eval == 0:
                val = evaluate(model, valid_b, cfg.val_batches, val_loss)
            mx.random.seed(cfg.seed * 1_000_003 + step)  # dropout: the same per step on resume
            value, grads, batch = accumulate(value_and_grad, model, [train_b[step * accum + i] for i in range(accum)])
            if cfg.max_grad_norm:
                grads, _ = optim.clip_grad_norm(grads, cfg.max_grad_norm)
            optimizer.update(model, grads)
            mx.eval(model.trainable_parameters(), optimizer.state, value)
            step += 1
            last = float(value)
            progress.add(last, sum(b.tokens for b in batch), int(sum(float(b.weights.sum()) for b in batch)))
            if step % cfg.steps_per_report == 0 or step == total:
                lr = optimizer.learning_rate
                progress.line(step, float(lr), val)
            if step % cfg.save_every == 0 or step == total:
                save(model, folder, optimizer, step, adapter_config, checkpoint=step % cfg.save_every == 0)
    model.eval()
    if valid_b is not None:
        val = evaluate(model, valid_b, cfg.val_batches, val_loss)
        out(f"step {step}/{total} | val {val:.4f}")
    return {"step": step, "loss": last, "val_loss": val}


def accumulate(value_and_grad, model, batches: list):
    """Loss and gradient over several batches, weighted by their trained targets (one batch:
    as is). Returns (loss, grads, every Batch seen)."""
    if len(batches) == 1:
        (value, _), grads = value_and_grad(model, *batches[0])
        return value, grads, list(batches[0])
    total_v, total_g, total_n, seen = 0.0, None, 0.0, []
    for b in batches:
        (value, n), grads = value_and_grad(model, *b)
        mx.eval(value, n, grads)
        w = float(n)
        total_v += float(value) * w
        total_g = tree_map(lambda g: g * w, grads) if total_g is None else tree_map(lambda a, g: a + g * w, total_g, grads)
        total_n += w
        seen.extend(b)
    return mx.array(total_v / total_n), tree_map(lambda g: g / total_n, total_g), seen


def save(model, folder: Path, optimizer, step: int, adapter_config: dict, checkpoint: bool) -> None:
    path = save_adapters(model, folder, adapter_config)
    if checkpoint:
        weights = mx.load(str(path))
        save_safetensors(folder / f"{step:07d}_adapters.safetensors", weights)
    save_state(folder, optimizer, step)
