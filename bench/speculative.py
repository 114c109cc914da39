"""Speculative decoding: plain decode vs a small draft vs prompt lookup vs mlx-lm, same 4-bit target.

Random weights make acceptance meaningless, so two targets bracket it: ``agrees`` has layer
weights 10x smaller than usual, so with its tied head it repeats its last token and a small
draft built the same way agrees with it (the machinery at acceptance ~1); ``random`` is a
normal random model with an untied head (so it does not fall into the loops a tied random
model does) that neither the draft nor prompt lookup agrees with: the cost of failing. Runs
alternate between engines, a fresh process each, medians and ratios over plain decode.

``--verify-cost`` measures what transfers to real weights: the time of one forward pass of
``k + 1`` tokens over one decode step at the real 24B-A2B layer shapes (4-bit), per layer and
for the head, scaled to 40 layers, for k = 1..8, and the speed-up that implies at acceptance
0.5 / 0.7 / 0.9 (expected tokens per round ``(1 - a^(k+1)) / (1 - a)`` over the round's cost).

    python bench/speculative.py --runs 3
    python bench/speculative.py --verify-cost --layers 4
"""

import argparse
import json
import platform
import statistics
import sys
import time

from common import OUT, REFERENCE, alternating_medians, checkpoint, converted, ratios, run_json


def small_weights(preset: str, layers: int, scale: float = 0.1, **overrides):
    """A random checkpoint whose layer weight matrices are ``scale`` x the usual size."""
    import mlx.core as mx

    src = checkpoint(preset, layers, **overrides)
    folder = OUT / f"{src.name}-small{scale}"
    if not (folder / "config.json").exists():
        import shutil

        shutil.copytree(src, folder, dirs_exist_ok=True)
        w = mx.load(str(src / "model.safetensors"))
        w = {k: (v * scale).astype(v.dtype) if ".layers." in k and "norm" not in k and v.ndim >= 2 else v
             for k, v in w.items()}
        mx.save_safetensors(str(folder / "model.safetensors"), w, metadata={"format": "pt"})
    return folder


def worker(a) -> dict:
    import mlx.core as mx
    import numpy as np

    from mlx_lfm2 import load, stream_generate

    model, tok = load(a.folder)
    kw = {}
    if a.engine == "draft":
        kw = dict(draft_model=load(a.draft)[0], num_draft_tokens=a.k)
    elif a.engine == "lookup":
        kw = dict(prompt_lookup=True)
    bias = {t: -1e9 for t in tok.eos_token_ids}
    rng = np.random.default_rng(0)
    prompt = rng.integers(10, min(model.args.vocab_size, 8192), a.prompt).tolist()
    list(stream_generate(model, tok, prompt, max_tokens=8, logit_bias=bias, **kw))  # warm-up
    *_, last = stream_generate(model, tok, prompt, max_tokens=a.decode, logit_bias=bias, **kw)
    mx.synchronize()
    return {"engine": a.engine, "decode_tps": last.generation_tps, "tokens": last.generation_tokens,
            "acceptance": last.acceptance or 0.0, "drafted": last.draft_tokens}


def verify_cost(a) -> dict:
    """Forward time for t = 1..9 tokens after a 64-token prefix, median of ``runs`` rounds."""
    import mlx.core as mx

    from mlx_lfm2 import load
    from mlx_lfm2.engine.decode import prefill
    from mlx_lfm2.model.cache import rewind

    folder = converted(checkpoint("24b-a2b", a.layers, num_dense_layers=0), 4)
    model, _ = load(folder)
    cache = model.make_cache()
    prefill(model, mx.arange(100, 164), cache)
    head = model.model.embed_tokens
    D = model.args.hidden_size
    times, head_times = {t: [] for t in range(1, 10)}, {t: [] for t in range(1, 10)}
    for _ in range(2):  # warm-up
        mx.eval(model(mx.arange(200, 209)[None], cache=cache))
        rewind(cache, 9)
    for r in range(a.runs):
        for t in (range(1, 10) if r % 2 == 0 else range(9, 0, -1)):
            tic = time.perf_counter()
            mx.eval(model(mx.arange(300, 300 + t)[None], cache=cache))
            times[t].append(time.perf_counter() - tic)
            rewind(cache, t)
            x = mx.random.normal((1, t, D)).astype(mx.float32)
            mx.eval(x)
            tic = time.perf_counter()
            mx.eval(head.as_linear(x))
            head_times[t].append(time.perf_counter() - tic)
    med = {t: statistics.median(v) for t, v in times.items()}
    hmed = {t: statistics.median(v) for t, v in head_times.items()}
    # 40 layers: the measured layers' share scaled up, plus one head.
    real = {t: (med[t] - hmed[t]) * 40 / a.layers + hmed[t] for t in med}
    cost = {k: real[k + 1] / real[1] for k in range(1, 9)}
    speedup = {}
    for acc in (0.5, 0.7, 0.9):
        tokens = {k: (1 - acc ** (k + 1)) / (1 - acc) for k in cost}
        best = max(cost, key=lambda k: tokens[k] / cost[k])
        speedup[str(acc)] = {"best_k": best, "speedup": tokens[best] / cost[best],
                             "by_k": {k: round(tokens[k] / cost[k], 3) for k in cost}}
    return {"bench": "speculative_verify_cost", "preset": "24b-a2b", "layers_measured": a.layers, "bits": 4,
            "step_ms_40_layers": {t: round(v * 1e3, 1) for t, v in real.items()},
            "verify_cost_over_decode": {k: round(v, 3) for k, v in cost.items()},
            "implied_speedup_no_draft_cost": speedup, "machine": f"{platform.machine()} {platform.system()}"}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worker", nargs=2, metavar=("ENGINE", "FOLDER"))
    p.add_argument("--draft")
    p.add_argument("--k", type=int, default=4, help="num_draft_tokens for the draft model")
    p.add_argument("--preset", default="24b-a2b-narrow")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--decode", type=int, default=128)
    p.add_argument("--prompt", type=int, default=16)
    p.add_argument("--verify-cost", action="store_true")
    a = p.parse_args()
    if a.worker:
        a.engine, a.folder = a.worker
        print(json.dumps(worker(a)))
        return
    if a.verify_cost:
        a.layers = a.layers if a.layers != 8 else 4
        print(json.dumps(verify_cost(a)))
        return
    vocab = {"vocab_size": 8192}
    targets = {"agrees": converted(small_weights(a.preset, a.layers), 4),
               "random": converted(checkpoint(a.preset, a.layers, tie_word_embeddings=False), 4)}
    drafts = {"agrees": small_weights("tiny-dense", 4, **vocab), "random": checkpoint("tiny-dense", 4, **vocab)}
    out = {"bench": "speculative", "preset": a.preset, "layers": a.layers, "bits": 4, "runs": a.runs,
           "decode": a.decode, "k": a.k, "machine": f"{platform.machine()} {platform.system()}"}
    common = ["--decode", str(a.decode), "--prompt", str(a.prompt)]
    for name, target in targets.items():
        me = lambda e, extra=(): run_json(["bench/speculative.py", "--worker", e, str(target), *common, *extra])
        runners = {"plain": lambda: me("plain"),
                   "draft": lambda: me("draft", ["--draft", str(drafts[name]), "--k", str(a.k)]),
                   "lookup": lambda: me("lookup"),
                   "mlx_lm": lambda: run_json(["bench/speed_worker.py", "mlx_lm", str(target), "--decode",
                                               str(a.decode), "--decode-prompt", str(a.prompt), "--prefill"])}
        if name == "random":  # mlx-lm's lfm2_moe has no untied head: it cannot load this target
            runners.pop("mlx_lm")
        med = alternating_medians(runners, a.runs)
        out[name] = {"median": med, "ratio_over_plain": ratios(med, "plain")}
        print(json.dumps({name: out[name]}), file=sys.stderr)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
