"""Many adapters on one base: decode speed of mixed batches, hot-load time, memory per adapter,
and mlx-lm's server answering the same per-adapter requests.

    python bench/adapters.py --preset 24b-a2b-narrow --layers 8 --runs 3 --steps 16
    python bench/adapters.py --servers          # + ours vs mlx_lm.server, 8 requests on 8 adapters (float32)

* decode: 8 rows in one ``BatchGenerator``, aggregate tok/s over ``--steps`` decode steps, with
  every row on the base, every row on one adapter (each layer adds one plain LoRA matmul pair),
  and the 8 rows on 8 different adapters (the deltas gathered per row). The "ratio" is 8 adapters
  over 1. The alternative without per-row adapters (llama.cpp, mlx-lm) is one forward per
  adapter group: "separate" times 8 forwards of one row each, per step.
* hot load: ``read_resident`` (file read + checks + hash) and ``AdapterSet.add`` (one slot
  written in place, or the stacks made/grown on the first) of a rank-8 adapter on every matmul
  layer, for a dense LFM2 (LFM2-350M's shapes) and the 24B-A2B-narrow preset, with 0 and with 7
  adapters already resident.
* memory: the stacks' bytes per resident adapter (``AdapterSet.nbytes``).
* ``--servers``: our server with 8 ``--adapter`` against ``mlx_lm.server`` (whose requests
  name an ``adapters`` path; it reloads the model to switch), the same 8 concurrent requests.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

from common import OUT, ROOT, checkpoint, converted, model_parser

RANK = 8


def make_adapters(folder, n: int, tag: str) -> dict:
    """``n`` random rank-8 adapters on every matmul layer of the model in ``folder`` (written once)."""
    import mlx.core as mx
    import numpy as np
    from mlx.utils import tree_flatten, tree_unflatten

    from mlx_lfm2.model.lora import apply_lora, trainable_adapters
    from mlx_lfm2.weights.adapters import adapter_config, save_adapters
    from mlx_lfm2.weights.loader import load_model

    out = {}
    for i in range(n):
        path = OUT / f"adapters-{tag}-r{RANK}" / f"a{i}"
        if not (path / "adapters.safetensors").exists():
            model = load_model(folder, fuse=False)
            apply_lora(model, -1, rank=RANK, scale=1.0)
            trainable_adapters(model)
            rng = np.random.default_rng(i)
            model.update(tree_unflatten([(k, mx.array(0.05 * rng.standard_normal(v.shape).astype(np.float32)))
                                         for k, v in tree_flatten(model.trainable_parameters())]))
            save_adapters(model, path, adapter_config(model, "lora", -1, {"rank": RANK, "scale": 1.0}))
        out[f"a{i}"] = path
    return out


def decode(folder, adapters: dict, steps: int, runs: int) -> dict:
    import mlx.core as mx

    from mlx_lfm2 import load
    from mlx_lfm2.engine.batch import BatchGenerator
    from mlx_lfm2.model.lora_rows import select

    model, _ = load(folder, adapters=adapters)
    names = list(adapters)[:8]
    prompts = [[(97 * i + 13 * j) % 8000 + 100 for j in range(24)] for i in range(8)]  # ids any vocab holds
    modes = {"base": [None] * 8, "1 adapter": [names[0]] * 8, "8 adapters": names}

    def batched(rows):
        gen = BatchGenerator(model, max_batch=8)
        for p, a in zip(prompts, rows):
            gen.insert(p, max_tokens=steps + 8, adapter=a)
        while len(gen.rows) < 8:
            gen.step()
        gen.step()
        tic = time.perf_counter()
        n = sum(len(gen.step()) for _ in range(steps))
        return n / (time.perf_counter() - tic)

    def separate(rows):  # one forward per adapter group of one row, as without per-row adapters
        caches = [model.make_cache() for _ in rows]
        ys = []
        for p, a, c in zip(prompts, rows, caches):
            select(model, [a])
            ys.append(model(mx.array(p)[None], cache=c)[:, -1:].argmax(-1))
        mx.eval(ys)
        tic = time.perf_counter()
        for _ in range(steps):
            for i, (a, c) in enumerate(zip(rows, caches)):
                select(model, [a])
                ys[i] = model(ys[i], cache=c)[:, -1:].argmax(-1)
            mx.eval(ys)
        return 8 * steps / (time.perf_counter() - tic)

    results = {m: [] for m in [*modes, "8 adapters, separate forwards"]}
    for r in range(runs):
        order = list(modes) if r % 2 == 0 else list(modes)[::-1]
        for m in order:
            results[m].append(batched(modes[m]))
        results["8 adapters, separate forwards"].append(separate(names))
    med = {m: round(statistics.median(v), 2) for m, v in results.items()}
    aset = model.adapter_set
    return {"tok_s": med, "ratio_8_over_1": round(med["8 adapters"] / med["1 adapter"], 3),
            "ratio_8_over_base": round(med["8 adapters"] / med["base"], 3),
            "forwards_per_step": {"per-row adapters": 1, "one forward per adapter": 8},
            "graph_nodes_per_forward": {m: graph_nodes(model, rows, prompts) for m, rows in modes.items()},
            "bytes_per_adapter_mb": round(aset.nbytes(names[0]) / 2**20, 2),
            "stacks_mb": round(aset.nbytes() / 2**20, 2), "slots": aset.capacity}


def graph_nodes(model, rows, prompts) -> int:
    """Primitives in one decode forward's graph (what a GPU launches; the CPU hides their cost)."""
    import io
    import re

    import mlx.core as mx

    from mlx_lfm2.model.lora_rows import select

    cache = model.make_cache()
    select(model, rows)
    y = model(mx.array(prompts), cache=cache)[:, -1:].argmax(-1)
    mx.eval(y)
    f = io.StringIO()
    mx.export_to_dot(f, model(y, cache=cache))
    return len(re.findall(r'label\s*=\s*"[A-Z]', f.getvalue()))


def hot_load(folder, adapters: dict, runs: int) -> dict:
    """A rank-8 adapter made resident next to 0 or 7 others (``--max-adapters 8``, the server's
    default): read + check + hash (``read_resident``, the arrays evaluated), then ``add``. The
    first add grows the stacks (0: makes them; 7: from 7 to 8 adapters, a copy); later ones
    (after an unload) write the freed slot in place. The file read alone is timed too."""
    import mlx.core as mx

    from mlx_lfm2 import load
    from mlx_lfm2.weights.adapters import read_resident

    file = adapters["a7"] / "adapters.safetensors"
    out = {}
    for already in (0, 7):
        model, _ = load(folder, adapters={n: adapters[n] for n in list(adapters)[:already]})
        aset, reads, adds, files = model.adapter_set, [], [], []
        aset.limit = 8
        for r in range(runs + 1):
            tic = time.perf_counter()
            file.read_bytes()
            files.append(1000 * (time.perf_counter() - tic))
            tic = time.perf_counter()
            arrays, scale, info = read_resident(aset, adapters["a7"])
            mx.eval([x for ab in arrays.values() for x in ab])
            mid = time.perf_counter()
            aset.add(f"new{r}", arrays, scale, info)
            adds.append(1000 * (time.perf_counter() - mid))
            reads.append(1000 * (mid - tic))
            aset.remove(f"new{r}")
        out[f"{already} resident"] = {"file_read_ms": round(statistics.median(files), 1),
                                      "read_check_hash_ms": round(statistics.median(reads), 1),
                                      "first_add_ms (stacks made or grown)": round(adds[0], 1),
                                      "add_ms (a free slot, in place)": round(statistics.median(adds[1:]), 1)}
    size = sum(f.stat().st_size for f in adapters["a7"].iterdir())
    return {**out, "adapter_file_mb": round(size / 2**20, 2)}


def servers(folder, adapters: dict, max_tokens: int = 24) -> dict:
    """Our server and mlx_lm.server, the same 8 concurrent requests on 8 adapters, once each."""
    import subprocess
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import free_port

    names = list(adapters)[:8]
    msgs = [[{"role": "user", "content": f"Row {i} asks about the weather."}] for i in range(8)]

    def run(cmd, body):
        port = free_port()
        log = open(OUT / f"server-{cmd[0]}.log", "w")
        proc = subprocess.Popen([sys.executable, "-m", *cmd, "--port", str(port)], stdout=log, stderr=log)
        url = f"http://127.0.0.1:{port}"
        try:
            for _ in range(600):
                try:
                    httpx.get(url + "/v1/models", timeout=1)
                    break
                except httpx.HTTPError:
                    time.sleep(0.2)
            tic = time.perf_counter()
            with ThreadPoolExecutor(8) as pool:
                replies = list(pool.map(lambda i: httpx.post(url + "/v1/chat/completions", json=body(i),
                                                             timeout=600).json(), range(8)))
            wall = time.perf_counter() - tic
            tokens = sum(r["usage"]["completion_tokens"] for r in replies)
            return {"wall_s": round(wall, 2), "tokens": tokens, "aggregate_tok_s": round(tokens / wall, 2)}
        finally:
            proc.kill()
            proc.wait()
            log.close()

    common = dict(max_tokens=max_tokens, temperature=0)
    ours = run(["mlx_lfm2.server", "--model", str(folder), "--prompt-cache-bytes", "0",
                *[x for n in names for x in ("--adapter", f"{n}={adapters[n]}")]],
               lambda i: {"model": names[i], "messages": msgs[i], **common})
    theirs = run(["mlx_lm.server", "--model", str(folder)],
                 lambda i: {"model": str(folder), "adapters": str(adapters[names[i]]), "messages": msgs[i], **common})
    return {"ours": ours, "mlx_lm": theirs, "ratio": round(ours["aggregate_tok_s"] / theirs["aggregate_tok_s"], 2)}


def main() -> None:
    p = model_parser(__doc__)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--servers", action="store_true")
    a = p.parse_args()
    moe = converted(checkpoint(a.preset, a.layers), a.bits)
    moe_adapters = make_adapters(moe, 8, f"{a.preset}-{a.layers}L-q{a.bits}")
    out = {"preset": a.preset, "layers": a.layers, "bits": a.bits, "rank": RANK,
           "decode_8_rows": decode(moe, moe_adapters, a.steps, a.runs)}
    dense = checkpoint("tiny-dense", 16, hidden_size=1024, intermediate_size=4608, num_attention_heads=16,
                       num_key_value_heads=8)  # LFM2-350M's shapes
    out["hot_load"] = {a.preset: hot_load(moe, moe_adapters, a.runs),
                       "dense-350M-shapes": hot_load(dense, make_adapters(dense, 8, "dense350m"), a.runs)}
    if a.servers:  # float32: mlx-lm's expert LoRA needs float32 gather_mm on this CPU backend
        f32 = checkpoint(a.preset, a.layers, dtype="float32", vocab_size=65536)  # the real tokenizer's ids
        out["servers"] = {"model": f"{a.preset} {a.layers}L float32",
                          **servers(f32, make_adapters(f32, 8, f"{a.preset}-{a.layers}L-f32"))}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
