"""One engine, one process: decode and prefill speed and peak memory, as a JSON line.

    python bench/speed_worker.py {mlx_lfm2|mlx_lm} FOLDER --decode 128 --prefill 512 4096
"""

import argparse
import json
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import peak_rss_gb  # noqa: E402  (bench/ is on the path when run as a script)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("engine", choices=["mlx_lfm2", "mlx_lfm2_bf16", "mlx_lm"],
                   help="mlx_lfm2_bf16: mlx_lfm2 with bfloat16 activations (compute_dtype=None)")
    p.add_argument("folder")
    p.add_argument("--decode", type=int, default=128)
    p.add_argument("--prefill", type=int, nargs="*", default=[512, 4096])
    p.add_argument("--decode-prompt", type=int, default=16, help="prompt tokens before the decode run")
    p.add_argument("--no-warmup", action="store_true", help="skip the warm-up generation")
    a = p.parse_args()
    t0 = time.perf_counter()
    if a.engine.startswith("mlx_lfm2"):
        from mlx_lfm2 import load, stream_generate

        model, tok = load(a.folder, **({"compute_dtype": None} if a.engine == "mlx_lfm2_bf16" else {}))

        def run(prompt, n):
            *_, last = stream_generate(model, tok, prompt, max_tokens=n, temperature=0.0,
                                       logit_bias={tid: -1e9 for tid in tok.eos_token_ids})
            return last
    else:
        from mlx_lm import load, stream_generate
        from mlx_lm.sample_utils import make_logits_processors, make_sampler

        model, tok = load(a.folder)
        eos = list(tok.eos_token_ids) if hasattr(tok, "eos_token_ids") else [7]

        def run(prompt, n):
            *_, last = stream_generate(model, tok, prompt, max_tokens=n, sampler=make_sampler(0.0),
                                       logits_processors=make_logits_processors({t: -1e9 for t in eos}))
            return last
    load_s = time.perf_counter() - t0
    vocab = min(model.args.vocab_size, 8192)
    rng = np.random.default_rng(0)
    out = {"engine": a.engine, "load_s": load_s}
    if not a.no_warmup:
        run(rng.integers(10, vocab, 16).tolist(), 4)
    for n in a.prefill:
        mx.reset_peak_memory()
        r = run(rng.integers(10, vocab, n).tolist(), 1)
        out[f"prefill_{n}_tps"] = r.prompt_tps
        out[f"prefill_{n}_peak_gb"] = r.peak_memory
    mx.reset_peak_memory()
    r = run(rng.integers(10, vocab, a.decode_prompt).tolist(), a.decode)
    out["decode_tps"] = r.generation_tps
    out["decode_tokens"] = r.generation_tokens
    out["decode_peak_gb"] = r.peak_memory
    out["max_rss_gb"] = peak_rss_gb()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
