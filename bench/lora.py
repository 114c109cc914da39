"""LoRA training speed and memory, ours against mlx_lm.lora, alternating, on the same folder,
data, adapted keys (every matmul in every block, experts included), rank, batch and
sequence length; plus one QLoRA step on the real 24B-A2B shapes (random 4-bit weights) for
its peak memory.

    python bench/lora.py --preset 24b-a2b-narrow --layers 3 --seq 64 --batch-size 2 --steps 2 --runs 3
    python bench/lora.py --preset lfm2-350m --layers 2 --bits 0 --seq 64 --batch-size 2 --steps 2 --runs 3
    python bench/lora.py --preset lfm2-350m --layers 2 --bits 0 --seq 512 --batch-size 2 --steps 1 --warmup 0
    python bench/lora.py --preset lfm2-350m --layers 2 --bits 0 --seq 512 --spread --pack   # mixed lengths
    python bench/lora.py --full-shapes --rank 8 --seq 128 --block-seq 2048   # QLoRA step, real 24B-A2B shapes

Each run is a fresh process: ``steps`` optimizer steps after one warm-up step, reporting
trained tokens/s (the targets the loss counts) and MLX's peak memory over those steps. Each
side runs its own loop as its trainer does: mlx_lm.lora's step under ``mx.compile`` (as
``mlx_lm.tuner.trainer.train``), ours as ``mlx_lfm2.train.trainer.train``. The folder is
written in ``--dtype`` (default float32: scales, norms and activations in float32 for both
tools; with bfloat16 scales mlx_lm.lora computes in bfloat16, which this CPU's quantized
matmul runs ~9x slower, while ours computes quantized models in float32 on the CPU). A run
past ``--timeout`` seconds is reported as timed out, not waited for.

``--full-shapes`` builds the model in memory (no checkpoint on disk) from a few of the real
24B-A2B layers (``--sets``), runs one QLoRA step on each set at ``--seq``, the costliest block
alone at ``--block-seq``, and fits the 40-layer peak at ``--block-seq`` (``lora_shapes.py``).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import checkpoint, model_parser, ratios, run_json

ROWS = 16
# LFM2-350M's widths on the tiny dense layout (its layer count comes from --layers).
DENSE_350M = dict(hidden_size=1024, num_attention_heads=16, num_key_value_heads=8, intermediate_size=4608,
                  block_dim=1024, block_multiple_of=256, block_ffn_dim_multiplier=1.0)


def data_dir(seq: int, masked: bool, spread: bool = False):
    """16 rows of >= ``seq`` tokens (no padding). ``masked``: prompt/completion rows whose
    prompt is about 3/4 of ``seq`` (trained with --mask-prompt: only the completion counts).
    ``spread``: ``text`` rows of seq/4 to seq words, evenly spread (real data's mix of lengths:
    mlx_lm.lora pads each batch to its longest row, ours packs rows with --pack)."""
    from common import OUT

    folder = OUT / f"lora-data-{seq}{'-masked' if masked else ''}{'-spread' if spread else ''}"
    folder.mkdir(parents=True, exist_ok=True)
    words = ("the model routes each token to four experts and the adapter learns the task " * 400).split()
    cut = lambda i, n: " ".join(words[i * 7:i * 7 + n])
    if spread:  # about one token a word: rows of ~seq/4 to ~seq tokens, none cut
        n = lambda i: seq // 4 + (seq - seq // 4) * ((i * 7) % ROWS) // (ROWS - 1)
        rows = [{"text": cut(i, n(i) * 15 // 16)} for i in range(ROWS)]
    else:
        rows = [{"prompt": cut(i, seq * 3 // 4), "completion": cut(i + 3, seq)} if masked else {"text": cut(i, seq)}
                for i in range(ROWS)]
    for split in ("train", "valid"):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def worker(engine: str, folder: str, data: str, rank: int, batch: int, seq: int, steps: int, masked: bool,
           warmup: int = 1, pack: bool = False) -> dict:
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim

    lora = {"rank": rank, "scale": 20.0, "dropout": 0.0}
    opt = optim.Adam(learning_rate=1e-5)
    if engine == "ours":
        from mlx_lfm2 import load
        from mlx_lfm2.model.lora import trainable_adapters
        from mlx_lfm2.train.data import load_datasets
        from mlx_lfm2.train.trainer import Batches, TrainConfig, loss_fn
        from mlx_lfm2.weights.adapters import add_adapter_layers

        model, tok = load(folder, fuse=False)
        add_adapter_layers(model, "lora", -1, lora)
        trainable_adapters(model)
        cfg = TrainConfig(batch_size=batch, max_seq_length=seq + 1, pack=pack)
        b = Batches(load_datasets(data, tok, masked, max_seq_length=seq + 1)["train"], cfg, 0)
        vg = nn.value_and_grad(model, loss_fn(cfg))
        live = lambda: [model.trainable_parameters(), opt.state]

        def step(i):  # as mlx_lfm2.train.trainer.train
            (loss, n), grads = vg(model, *b[i])
            opt.update(model, grads)
            return loss, n
    else:
        from functools import partial
        from types import SimpleNamespace

        from mlx_lm.tuner.datasets import CacheDataset, create_dataset
        from mlx_lm.tuner.trainer import default_loss, iterate_batches
        from mlx_lm.tuner.utils import linear_to_lora_layers
        from mlx_lm.utils import load

        model, tok = load(folder)
        model.freeze()
        linear_to_lora_layers(model, len(model.layers), lora)
        rows = [json.loads(l) for l in open(f"{data}/train.jsonl")]
        ds = CacheDataset(create_dataset(rows, tok, SimpleNamespace(mask_prompt=masked, prompt_feature="prompt",
                                                                 completion_feature="completion")))
        it = iterate_batches(ds, batch, seq + 1, loop=True, seed=0)
        vg = nn.value_and_grad(model, default_loss)
        state = [model.state, opt.state, mx.random.state]
        live = lambda: state

        @partial(mx.compile, inputs=state, outputs=state)  # as mlx_lm.tuner.trainer.train
        def compiled(bt):
            (loss, n), grads = vg(model, *bt)
            opt.update(model, grads)
            return loss, n

        step = lambda i: compiled(next(it))
    model.train()
    trained, t0 = 0.0, None
    for i in range(steps + warmup):
        if i == warmup:  # the warm-up steps (mlx_lm's compiles its step) are not timed
            mx.reset_peak_memory()
            t0, trained = time.perf_counter(), 0.0
        loss, n = step(i)
        mx.eval(live(), loss, n)
        trained += float(n)
    dt = time.perf_counter() - t0
    return {"trained_tok_s": trained / dt, "step_s": dt / steps, "peak_gb": mx.get_peak_memory() / 1e9,
            "loss": float(loss)}


def timed_run(args: list[str], timeout: int):
    """A worker's result, or None (with a line on stderr) when it ran past ``timeout`` seconds."""
    try:
        return run_json(args, timeout=timeout)
    except subprocess.TimeoutExpired:
        print(f"timed out after {timeout} s: {' '.join(args[1:3])}", file=sys.stderr, flush=True)
        return None


def alternating(runners: dict, runs: int) -> dict:
    """Each engine's runs, the order reversed every other round; medians over the runs that
    finished, and how many timed out."""
    results = {e: [] for e in runners}
    for i in range(runs):
        for e in list(runners)[:: 1 if i % 2 == 0 else -1]:
            results[e].append(runners[e]())
            print(json.dumps({"engine": e, "run": i, "result": results[e][-1]}), flush=True)
    out = {}
    for e, rs in results.items():
        done = [r for r in rs if r is not None]
        out[e] = {k: statistics.median(r[k] for r in done) for k in (done[0] if done else {})}
        out[e]["timed_out"] = len(rs) - len(done)
    return out


def full_shapes(a) -> None:
    """The 24B-A2B QLoRA step: runs on ``--sets`` of real layers at ``--seq``, the costliest block
    (layer 4, MoE + attention) at ``--block-seq``, and the law fitted to 40 layers (lora_shapes.py)."""
    import lora_shapes

    def run(fn, *arg):
        r = timed_run([__file__, "--full-worker", fn, json.dumps(arg)], a.timeout)
        print(json.dumps({fn: r}), flush=True)
        return r

    shapes = run("bytes", a.rank)
    points = [run("step", [int(i) for i in s.split(",")], a.rank, a.seq) for s in a.sets]
    block = json.loads(Path(a.block_result).read_text())["block"] if a.block_result else run("block", 4, a.rank,
                                                                                             a.block_seq)
    if shapes and block and all(points):
        law = lora_shapes.law(points, block, shapes, a.block_seq)
        print(json.dumps({"law": law, "peak_gb": law["peak"] / 1e9}, indent=2))


def bench_folder(a) -> Path:
    """The random checkpoint (the real 65,536-token vocabulary: the tokenizer's ids fit),
    written and quantized in ``--dtype``."""
    from mlx_lfm2 import convert
    from common import OUT

    dense = a.preset == "lfm2-350m"
    src = checkpoint("tiny-dense" if dense else a.preset, a.layers, dtype=a.dtype, vocab_size=65536,
                     **(DENSE_350M if dense else {}))
    if not a.bits:
        return src
    folder = OUT / f"{src.name}-q{a.bits}-g64-{a.dtype}"
    if not (folder / "config.json").exists():
        convert(src, folder, quantize=True, q_bits=a.bits, q_group_size=64, dtype=a.dtype, force=True, progress=False)
    return folder


def main() -> None:
    if sys.argv[1:2] == ["--worker"]:
        e, folder, data, rank, batch, seq, steps, masked, warmup, pack = sys.argv[2:12]
        print(json.dumps(worker(e, folder, data, int(rank), int(batch), int(seq), int(steps), masked == "1",
                                int(warmup), pack == "1")))
        return
    if sys.argv[1:2] == ["--full-worker"]:
        import lora_shapes

        fn, arg = sys.argv[2], json.loads(sys.argv[3])
        print(json.dumps({"step": lora_shapes.step, "block": lora_shapes.block_transient,
                          "bytes": lora_shapes.shapes_bytes}[fn](*arg)))
        return
    p = model_parser(__doc__, runs=3)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--timeout", type=int, default=1200, help="seconds per run before it is reported as timed out")
    p.add_argument("--mask-prompt", action="store_true", help="prompt/completion rows, only the completion trained")
    p.add_argument("--spread", action="store_true", help="text rows of seq/4 to seq tokens (mixed lengths)")
    p.add_argument("--pack", action="store_true", help="ours packs rows (mlx_lm.lora cannot: it pads)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (0: time the compile too)")
    p.add_argument("--full-shapes", action="store_true")
    p.add_argument("--sets", nargs="+", default=["4", "2,4"],
                   help="--full-shapes: 24B-A2B layer indices per run, each adding a MoE layer to the last")
    p.add_argument("--block-seq", type=int, default=2048, help="--full-shapes: the length of the fitted peak")
    p.add_argument("--block-result", help="--full-shapes: a file with an earlier run's {\"block\": ...} line "
                                          "(the block at 2048 tokens takes ~10 min on a 2-core CPU)")
    a = p.parse_args()
    if a.full_shapes:
        full_shapes(a)
        return
    folder = bench_folder(a)
    data = str(data_dir(a.seq, a.mask_prompt, a.spread))
    run = lambda e: (lambda: timed_run([__file__, "--worker", e, str(folder), data, str(a.rank), str(a.batch_size),
                                        str(a.seq), str(a.steps), str(int(a.mask_prompt)), str(a.warmup),
                                        str(int(a.pack))], a.timeout))
    med = alternating({"ours": run("ours"), "mlx_lm": run("mlx_lm")}, a.runs)
    print(json.dumps({"folder": str(folder), "medians": med, "ratios": ratios(med, "mlx_lm")}, indent=2))


if __name__ == "__main__":
    main()
