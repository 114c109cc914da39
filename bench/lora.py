"""LoRA training speed and memory, ours against mlx_lm.lora, alternating, on the same folder,
data, adapted keys, rank, batch and sequence length; plus one QLoRA step on the real
24B-A2B shapes (random 4-bit weights) for its peak memory.

    python bench/lora.py --preset 24b-a2b-narrow --layers 8 --steps 4 --runs 3
    python bench/lora.py --preset lfm2-350m --layers 4 --bits 0   # a dense LFM2 (350M widths)
    python bench/lora.py --full-shapes --layers 4      # QLoRA step, real 24B-A2B shapes

Each run is a fresh process: ``steps`` optimizer steps after one warm-up, reporting trained
tokens/s (targets the loss counts) and MLX's peak memory. ``--full-shapes`` builds the model
in memory (no checkpoint on disk), quantizes it layer by layer, and measures one step at
``--layers`` - 1 and ``--layers`` layers (both past the 2 dense layers) with --grad-checkpoint:
the growth per (MoE) layer extrapolates the peak to 40 layers.
"""

from __future__ import annotations

import json
import sys
import time

from common import alternating_medians, checkpoint, converted, model_parser, ratios, run_json

ROWS = 16
# LFM2-350M's widths on the tiny dense layout (its layer count comes from --layers).
DENSE_350M = dict(hidden_size=1024, num_attention_heads=16, num_key_value_heads=8, intermediate_size=4608,
                  block_dim=1024, block_multiple_of=256, block_ffn_dim_multiplier=1.0)


def data_dir(seq: int):
    from common import OUT

    folder = OUT / f"lora-data-{seq}"
    folder.mkdir(parents=True, exist_ok=True)
    words = ("the model routes each token to four experts and the adapter learns the task " * 400).split()
    rows = [{"text": " ".join(words[i * 7:i * 7 + seq])} for i in range(ROWS)]  # >= seq tokens: no padding
    for split in ("train", "valid"):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def worker(engine: str, folder: str, data: str, rank: int, batch: int, seq: int, steps: int) -> dict:
    import mlx.core as mx
    import mlx.optimizers as optim

    lora = {"rank": rank, "scale": 20.0, "dropout": 0.0}
    if engine == "ours":
        import mlx.nn as nn

        from mlx_lfm2 import load
        from mlx_lfm2.train.data import load_datasets
        from mlx_lfm2.train.losses import sft_loss
        from mlx_lfm2.train.trainer import Batches, TrainConfig
        from mlx_lfm2.weights.adapters import add_adapter_layers
        from mlx_lfm2.model.lora import trainable_adapters

        model, tok = load(folder, fuse=False)
        add_adapter_layers(model, "lora", -1, lora)
        trainable_adapters(model)
        cfg = TrainConfig(batch_size=batch, max_seq_length=seq + 1)
        b = Batches(load_datasets(data, tok, max_seq_length=seq + 1)["train"], cfg, 0)
        vg = nn.value_and_grad(model, sft_loss)
        batches = lambda i: b[i]
        count = lambda bt: float(bt[0].weights.sum())
    else:
        import mlx.nn as nn
        from types import SimpleNamespace

        from mlx_lm.tuner.datasets import CacheDataset, create_dataset
        from mlx_lm.tuner.trainer import default_loss, iterate_batches
        from mlx_lm.tuner.utils import linear_to_lora_layers
        from mlx_lm.utils import load

        model, tok = load(folder)
        model.freeze()
        linear_to_lora_layers(model, len(model.layers), lora)
        rows = [json.loads(l) for l in open(f"{data}/train.jsonl")]
        ds = CacheDataset(create_dataset(rows, tok, SimpleNamespace(mask_prompt=False)))
        it = iterate_batches(ds, batch, seq + 1, loop=True, seed=0)
        vg = nn.value_and_grad(model, default_loss)
        batches = lambda i: next(it)
        count = lambda bt: float(bt[0].shape[0] * (bt[0].shape[1] - 1))  # rows are cut to seq + 1: no padding
    opt = optim.Adam(learning_rate=1e-5)
    trained, t0 = 0.0, None
    for i in range(steps + 1):
        if i == 1:
            mx.reset_peak_memory()
            t0, trained = time.perf_counter(), 0.0
        bt = batches(i)
        (loss, _), grads = vg(model, *bt)
        opt.update(model, grads)
        mx.eval(model.trainable_parameters(), opt.state, loss)
        trained += count(bt)
    dt = time.perf_counter() - t0
    return {"trained_tok_s": trained / dt, "step_s": dt / steps, "peak_gb": mx.get_peak_memory() / 1e9}


def full_shapes(layers: int, rank: int, seq: int) -> dict:
    """One QLoRA step (rank ``rank`` on every matmul incl. experts) on ``layers`` real 24B-A2B layers."""
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim

    from mlx_lfm2.model.blocks import Model
    from mlx_lfm2.model.config import ModelArgs
    from mlx_lfm2.model.lora import apply_lora, trainable_adapters
    from mlx_lfm2.train.losses import sft_loss
    from mlx_lfm2.train.packing import Batch
    from mlx_lfm2.train.trainer import checkpointed_blocks
    from mlx_lfm2.weights.random_checkpoint import PRESETS

    args = ModelArgs.from_dict(PRESETS["24b-a2b"](layers))
    model = Model(args)
    nn.quantize(model.model.embed_tokens, 64, 4)
    mx.eval(model.model.embed_tokens.parameters())
    for layer in model.layers:  # one layer's float weights at a time
        nn.quantize(layer, 64, 4, class_predicate=lambda p, m: hasattr(m, "to_quantized") and not p.endswith("gate"))
        mx.eval(layer.parameters())
    model.compute_dtype = mx.float32
    apply_lora(model, -1, rank=rank)
    trainable_adapters(model)
    mx.eval(model.parameters())
    weights_gb = mx.get_active_memory() / 1e9
    ids = mx.random.randint(0, args.vocab_size, (1, seq + 1))
    batch = Batch(ids[:, :-1], ids[:, 1:], mx.ones((1, seq)))
    opt = optim.Adam(learning_rate=1e-5)
    mx.reset_peak_memory()
    t0 = time.perf_counter()
    with checkpointed_blocks(model, True):  # --grad-checkpoint
        (loss, _), grads = nn.value_and_grad(model, sft_loss)(model, batch)
        opt.update(model, grads)
        mx.eval(model.trainable_parameters(), opt.state, loss)
    return {"layers": layers, "weights_gb": weights_gb, "peak_gb": mx.get_peak_memory() / 1e9,
            "step_s": time.perf_counter() - t0}


def main() -> None:
    if sys.argv[1:2] == ["--worker"]:
        e, folder, data, rank, batch, seq, steps = sys.argv[2:9]
        print(json.dumps(worker(e, folder, data, int(rank), int(batch), int(seq), int(steps))))
        return
    if sys.argv[1:2] == ["--full-worker"]:
        print(json.dumps(full_shapes(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))))
        return
    p = model_parser(__doc__, runs=3)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--full-shapes", action="store_true")
    a = p.parse_args()
    if a.full_shapes:
        points = [run_json([__file__, "--full-worker", str(n), str(a.rank), str(a.seq)]) for n in (a.layers - 1, a.layers)]
        for r in points:
            print(json.dumps(r))
        if len(points) > 1:
            per = (points[-1]["peak_gb"] - points[0]["peak_gb"]) / (points[-1]["layers"] - points[0]["layers"])
            est = points[-1]["peak_gb"] + per * (40 - points[-1]["layers"])
            print(json.dumps({"per_layer_gb": per, "extrapolated_40_layer_peak_gb": est}))
        return
    dense = a.preset == "lfm2-350m"
    # The real vocabulary: the tokenizer's ids fit.
    folder = checkpoint("tiny-dense" if dense else a.preset, a.layers, vocab_size=65536, **(DENSE_350M if dense else {}))
    if a.bits:
        folder = converted(folder, a.bits)
    data = str(data_dir(a.seq))
    run = lambda e: (lambda: run_json([__file__, "--worker", e, str(folder), data, str(a.rank), str(a.batch_size),
                                       str(a.seq), str(a.steps)]))
    med = alternating_medians({"ours": run("ours"), "mlx_lm": run("mlx_lm")}, a.runs)
    print(json.dumps({"folder": str(folder), "medians": med, "ratios": ratios(med, "mlx_lm")}, indent=2))


if __name__ == "__main__":
    main()
