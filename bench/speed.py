"""Decode/prefill speed and memory: mlx_lfm2 vs mlx-lm on the same quantized folder.

Runs alternate between the engines (fresh process each), then reports medians and ratios.

    python bench/speed.py --preset 24b-a2b-narrow --layers 8 --bits 4 --runs 3
"""

import json
import platform

from common import alternating_medians, checkpoint, converted, model_parser, ratios, run_json


def bandwidth_gbs() -> float:
    """Measured read bandwidth: summing a 1 GB array, best of 5."""
    import time

    import mlx.core as mx

    a = mx.ones((256 * 1024 * 1024,), dtype=mx.float32)
    mx.eval(a)
    best = 0.0
    for _ in range(5):
        t = time.perf_counter()
        mx.eval(a.sum())
        best = max(best, a.nbytes / (time.perf_counter() - t) / 1e9)
    return best


def bytes_per_token(folder) -> int:
    """Weight bytes one decoded token reads: dense parts, K of E experts, the tied head."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from mlx_lfm2.weights.loader import load_model

    model = load_model(folder, lazy=True)
    a = model.args
    total = 0
    for name, p in tree_flatten(model.parameters()):
        n = p.nbytes
        if ".experts." in name:
            n = n * a.num_experts_per_tok // a.num_experts
        total += n
    return total  # the tied embedding counts once: read whole as the head, one row as input


def main():
    p = model_parser(__doc__)
    p.add_argument("--decode", type=int, default=128)
    p.add_argument("--prefill", type=int, nargs="*", default=[512, 4096])
    p.add_argument("--bf16", action="store_true", help="also run mlx_lfm2 with bfloat16 activations")
    a = p.parse_args()
    folder = converted(checkpoint(a.preset, a.layers), a.bits)
    engines = ["mlx_lfm2", "mlx_lm"] + (["mlx_lfm2_bf16"] if a.bf16 else [])
    args = ["--decode", str(a.decode), "--prefill", *map(str, a.prefill)]
    med = alternating_medians({e: (lambda e=e: run_json(["bench/speed_worker.py", e, str(folder), *args]))
                               for e in engines}, a.runs)
    bpt = bytes_per_token(folder)
    bw = bandwidth_gbs()
    bound = bw * 1e9 / bpt
    print(json.dumps({
        "bench": "speed", "preset": a.preset, "layers": a.layers, "bits": a.bits, "runs": a.runs,
        "machine": f"{platform.machine()} {platform.system()}", "median": med, "ratio_over_mlx_lm": ratios(med, "mlx_lm"),
        "bytes_per_token": bpt, "bandwidth_gbs": bw, "decode_bound_tps": bound,
        "decode_fraction_of_bound": med["mlx_lfm2"]["decode_tps"] / bound,
    }))


if __name__ == "__main__":
    main()
