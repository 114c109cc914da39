"""Predicted vs measured peak memory of one request (``engine.memory.predict``).

One request at a time through the server's engine (``BatchGenerator``: chunked prefill alone,
then joining the batch and decoding), on a random checkpoint of 24B-A2B-narrow shapes with
few layers; measured is MLX's peak memory during the request minus what was active before
it (the weights), predicted is ``predict(config, prompt, max_tokens, Shapes.of(model))``.
EOS is never a stop, so every request decodes all its ``max_tokens``.

    python bench/memory_predict.py --layers 4 --sizes 1024 8192 --max-tokens 128
    python bench/memory_predict.py --layers 3 --attention-at 1 --sizes 32768 --max-tokens 128

``--attention-at`` places the attention layers (the preset spreads them "never first", which
for 2 or 3 layers puts the only one last: a last attention layer's output is never evaluated
in a prefill chunk, only the cache it writes, so its scores never exist).
"""

import json
import platform
import time

from common import OUT, REFERENCE, checkpoint, converted, model_parser


def source(preset: str, layers: int, attention_at) -> "Path":
    """The random checkpoint: the preset's, or with attention at the layers ``attention_at``."""
    if attention_at is None:
        return checkpoint(preset, layers)
    from mlx_lfm2.weights.random_checkpoint import PRESETS, write_checkpoint

    folder = OUT / f"{preset}-{layers}L-bfloat16-attention{'-'.join(map(str, attention_at))}"
    if not (folder / "config.json").exists():
        cfg = PRESETS[preset](layers)
        cfg["layer_types"] = ["full_attention" if i in attention_at else "conv" for i in range(layers)]
        write_checkpoint(folder, cfg, dtype="bfloat16", tokenizer_from=REFERENCE)
    return folder


def measure(model, prompt: list, max_tokens: int, chunk: int) -> dict:
    """Peak bytes above the active memory before the request, overall and per phase."""
    import mlx.core as mx

    from mlx_lfm2.engine.batch import BatchGenerator

    gen = BatchGenerator(model, 1, chunk)
    mx.clear_cache()
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    tic = time.perf_counter()
    gen.insert(prompt, max_tokens=max_tokens)
    while gen.prefilling is not None or gen.waiting:
        gen.step()
    prefill = mx.get_peak_memory() - base
    mx.reset_peak_memory()
    while len(gen):
        gen.step()
    decode = mx.get_peak_memory() - base
    return {"measured": max(prefill, decode), "prefill_peak": prefill, "decode_peak": decode,
            "seconds": round(time.perf_counter() - tic, 1)}


def main():
    p = model_parser(__doc__, layers=4, runs=1)
    p.add_argument("--sizes", type=int, nargs="+", default=[1024, 8192, 32768], help="prompt + max_tokens")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--prefill-step", type=int, help="prefill chunk (default: the device's)")
    p.add_argument("--attention-at", type=int, nargs="+", help="attention layer indices (default: the preset's)")
    p.add_argument("--out", help="write the rows as JSON here")
    a = p.parse_args()
    import mlx.core as mx

    from mlx_lfm2 import load
    from mlx_lfm2.engine.memory import Shapes, predict

    src = source(a.preset, a.layers, a.attention_at)
    model, _ = load(str(converted(src, a.bits) if a.bits else src))
    shapes = Shapes.of(model, a.prefill_step)
    rows = []
    print(f"{a.preset} {a.layers} layers {model.args.layer_types}, {a.bits or 16}-bit weights, activations {shapes.act_bytes} bytes, "
          f"prefill chunk {shapes.prefill_step}, device {mx.default_device()}")
    print(f"{'tokens':>7} {'prompt':>7} {'predicted MB':>13} {'measured MB':>12} {'ratio':>6}  (prefill / decode peak MB, s)")
    for total in a.sizes:
        prompt = mx.random.randint(10, model.args.vocab_size, (total - a.max_tokens,), key=mx.random.key(total)).tolist()
        row = measure(model, prompt, a.max_tokens, shapes.prefill_step)
        row.update(tokens=total, prompt=len(prompt), predicted=predict(model.args, len(prompt), a.max_tokens, shapes))
        row["ratio"] = round(row["predicted"] / row["measured"], 3)
        rows.append(row)
        mb = 2**20
        print(f"{total:>7} {len(prompt):>7} {row['predicted'] / mb:>13.2f} {row['measured'] / mb:>12.2f} "
              f"{row['ratio']:>6.3f}  ({row['prefill_peak'] / mb:.2f} / {row['decode_peak'] / mb:.2f}, {row['seconds']})",
              flush=True)
    result = {"preset": a.preset, "layers": a.layers, "layer_types": model.args.layer_types, "bits": a.bits, "prefill_step": shapes.prefill_step,
              "max_tokens": a.max_tokens, "machine": platform.machine(), "device": str(mx.default_device()), "rows": rows}
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
