"""What the pipeline hop costs: 2 ranks (mlx.launch, ring backend, 127.0.0.1) vs 1 process.

Runs alternate between one process and two launched ranks (fresh processes each), medians.
Per run: prefill of a prompt in chunks, then greedy decode; the worker counts the bytes each
rank hands to mx.distributed (send, all_sum) per decoded token and per prefill chunk, and times
bare hops (send+recv round trip of one token's activations, all_sum of the shared token and of
one token's activations) so the cost on a real link can be computed:

    added per token ~= hop latency + bytes/token / bandwidth   (Thunderbolt ~5 GB/s, 10 GbE ~1.2)

    python bench/distributed.py --preset 24b-a2b-narrow --layers 8 --bits 4 --runs 3
    python bench/distributed.py --hops-only --runs 5      # bare hops: send+recv, all_sum
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import ROOT, alternating_medians, checkpoint, converted

LINKS = {"thunderbolt_5GBps": 5e9, "10GbE_1.25GBps": 1.25e9}


def worker(folder: str, prompt_len: int, tokens: int, chunk: int) -> dict:
    import mlx.core as mx

    from mlx_lfm2.engine import decode as generation
    from mlx_lfm2.model import pipeline
    from mlx_lfm2.weights.loader import load_model

    sent = {"bytes": 0}
    dist = mx.distributed

    class Counting:  # counts what this rank hands to the wire, as the graph is built
        def __getattr__(self, name):
            return getattr(dist, name)

        def send(self, x, *a, **k):
            sent["bytes"] += x.nbytes
            return dist.send(x, *a, **k)

        def all_sum(self, x, *a, **k):
            sent["bytes"] += x.nbytes
            return dist.all_sum(x, *a, **k)

    if tokens == 0:  # --hops-only
        model = load_model(folder)
        return {**hops(model), "rank": model.rank, "peak_gb": 0, "bytes_per_token": 0, "bytes_per_chunk": 0}
    mx.distributed = Counting()  # on mlx.core itself for this run; restored below
    try:
        model = load_model(folder)
        prompt = mx.array([(7 * i + 3) % 1000 + 10 for i in range(prompt_len)], mx.uint32)
        for _ in range(2):  # warm-up, then the measured run
            cache = model.make_cache()
            before = sent["bytes"]
            t0 = time.perf_counter()
            generation.prefill(model, prompt[:chunk], cache, chunk)
            chunk_bytes = sent["bytes"] - before
            generation.prefill(model, prompt[chunk:-1], cache, chunk)
            prefill_s = time.perf_counter() - t0
            before, times = sent["bytes"], []
            t = time.perf_counter()
            for _tok, _ in generation.generate_step(prompt[-1:], model, cache, max_tokens=tokens):
                times.append(time.perf_counter() - t)
                t = time.perf_counter()
            decode_bytes = sent["bytes"] - before
    finally:
        mx.distributed = dist
    out = dict(prefill_tps=(prompt_len - 1) / prefill_s, decode_ms=1e3 * statistics.median(times[1:]),
               bytes_per_token=decode_bytes / tokens, bytes_per_chunk=chunk_bytes, peak_gb=mx.get_peak_memory() / 1e9)
    if isinstance(model, pipeline.PipelineModel):
        out.update(hops(model))
        out["rank"] = model.rank
    return out


def hops(model, n: int = 200) -> dict:
    """Bare hop latencies between the two ranks (medians over n, microseconds)."""
    import mlx.core as mx

    g, D = model.group, model.args.hidden_size
    h = mx.zeros((1, 1, D), model.compute_dtype or model.wire_dtype)
    tok = mx.zeros((2,), mx.int32)
    other = 1 - model.rank

    def timed(fn):
        ts = []
        for _ in range(n):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
        return 1e6 * statistics.median(ts)

    def round_trip():
        if model.rank == 0:
            mx.eval(mx.distributed.send(h, other, group=g))
            mx.eval(mx.distributed.recv_like(h, other, group=g))
        else:
            mx.eval(mx.distributed.recv_like(h, other, group=g))
            mx.eval(mx.distributed.send(h, other, group=g))

    return dict(round_trip_us=timed(round_trip),
                all_sum_token_us=timed(lambda: mx.eval(mx.distributed.all_sum(tok, group=g, stream=mx.cpu))),
                all_sum_hidden_us=timed(lambda: mx.eval(mx.distributed.all_sum(h, group=g, stream=mx.cpu))))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(folder: Path, ranks: int, a) -> dict:
    args = [str(Path(__file__).resolve()), "--worker", str(folder), "--prompt", str(a.prompt),
            "--tokens", str(a.tokens), "--chunk", str(a.chunk)]
    cmd = [sys.executable, *args]
    if ranks > 1:
        launcher = Path(sys.executable).parent / "mlx.launch"
        cmd = [str(launcher), "-n", str(ranks), "--backend", "ring", "-p", str(free_port()), "--", *cmd]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if a.streams:
        env["MLX_LFM2_CPU_STREAMS"] = str(a.streams)
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, cwd=ROOT, env=env)
    if p.returncode != 0:
        raise RuntimeError(f"{cmd} failed:\n{p.stdout[-2000:]}{p.stderr[-3000:]}")
    rows = [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]
    by_rank = {r.get("rank", 0): r for r in rows}
    out = dict(by_rank[0])  # rank 0 has the logits: its timings are the user's
    out["bytes_per_token"] = sum(r["bytes_per_token"] for r in rows)  # all ranks' sends: the wire
    out["bytes_per_chunk"] = sum(r["bytes_per_chunk"] for r in rows)
    for r, row in by_rank.items():
        out[f"peak_gb_rank{r}"] = row["peak_gb"]
        out[f"bytes_per_token_rank{r}"] = row["bytes_per_token"]
        out[f"bytes_per_chunk_rank{r}"] = row["bytes_per_chunk"]
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--preset", default="24b-a2b-narrow")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--bits", type=int, default=4, help="0: float weights")
    p.add_argument("--model", type=Path, help="an existing model folder instead of a random one")
    p.add_argument("--prompt", type=int, default=257)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--chunk", type=int, default=128)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--streams", type=int, help="CPU streams per process (MLX_LFM2_CPU_STREAMS): 1 keeps "
                   "2 ranks on one 2-core box from competing for cores")
    p.add_argument("--out", default="distributed.json", help="file name under bench/results")
    p.add_argument("--hops-only", action="store_true", help="only the bare hop latencies (2 ranks)")
    a = p.parse_args()
    if a.worker:
        print(json.dumps(worker(a.worker, a.prompt, a.tokens, a.chunk)), flush=True)
        return
    folder = a.model or checkpoint(a.preset, a.layers)
    if a.bits and not a.model:
        folder = converted(folder, a.bits)
    if a.hops_only:  # bare hop latencies only, several launches: on a busy box the best says most
        a.tokens = 0
        rows = [run(folder, 2, a) for _ in range(a.runs)]
        keys = ("round_trip_us", "all_sum_token_us", "all_sum_hidden_us")
        result = {k: {"per_run_median": [round(r[k]) for r in rows], "best": round(min(r[k] for r in rows))}
                  for k in keys}
        result |= dict(machine=f"{platform.machine()} {os.cpu_count()} cores, loopback", load_avg=os.getloadavg()[0])
        print(json.dumps(result))
        (ROOT / "bench" / "results" / "distributed_hops.json").write_text(json.dumps(result, indent=1) + "\n")
        return
    med = alternating_medians({"1 process": lambda: run(folder, 1, a), "2 ranks": lambda: run(folder, 2, a)}, a.runs)
    one, two = med["1 process"], med["2 ranks"]
    added_ms = two["decode_ms"] - one["decode_ms"]
    result = dict(
        model=str(folder.name), machine=f"{platform.machine()} {os.cpu_count()} cores, loopback",
        load_avg=os.getloadavg()[0], settings=vars(a) | {"model": str(a.model), "worker": None}, medians=med,
        added_ms_per_token=added_ms,
        wire_ms_per_token={k: 1e3 * two["bytes_per_token"] / bw for k, bw in LINKS.items()},
        wire_ms_per_chunk={k: 1e3 * two["bytes_per_chunk"] / bw for k, bw in LINKS.items()},
    )
    print(json.dumps(result, indent=1))
    out = ROOT / "bench" / "results" / a.out
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"decode: {one['decode_ms']:.1f} ms/token alone, {two['decode_ms']:.1f} on 2 ranks "
          f"(+{added_ms:.2f} ms); rank 0 sends {two['bytes_per_token_rank0']:.0f} B/token, "
          f"rank 1 {two['bytes_per_token_rank1']:.0f} B/token, {two['bytes_per_chunk_rank1']:.0f} B per "
          f"{a.chunk}-token prefill chunk; hops: round trip {two['round_trip_us']:.0f} us, "
          f"all_sum(token) {two['all_sum_token_us']:.0f} us, all_sum(hidden) {two['all_sum_hidden_us']:.0f} us")


if __name__ == "__main__":
    main()
