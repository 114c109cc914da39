"""Continuous batching: aggregate decode tok/s, time to first token and inter-token latency at
1, 2, 4, 8, 16 concurrent streams, through our server and vs mlx-lm's BatchGenerator.

Three engines, each in a fresh process per round, rounds alternating (medians, ratios):
* ``server``: ``python -m mlx_lfm2.server --max-batch 16``, N streaming clients at once
  (/v1/completions over HTTP, SSE), plus the join test: a request's TTFT alone, then while
  7 others decode.
* ``mlx_lfm2``: our ``BatchGenerator`` in-process (no HTTP), N prompts inserted together.
* ``mlx_lm``: mlx-lm's ``BatchGenerator``, the same prompts (token ids) and limits.

Every engine gets greedy decoding with EOS suppressed. Decode tok/s is the steady state: all
streams' tokens in the window from the moment every stream is decoding until each has made
``--steps`` more, over its length (then the streams hang up); inter-token latency is the
median gap in that window; TTFT is from request (or insert) to first token, so with N streams
it includes waiting for the others' prefills.

    python bench/batching.py --preset 24b-a2b-narrow --layers 8 --bits 4 --runs 3
"""

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import threading
import time

from common import ROOT, alternating_medians, checkpoint, converted, model_parser, ratios, run_json

_words: list = []


def prompt_text(i: int, words: int, nonce: str) -> str:
    """Distinct per (nonce, i), so no prompt extends another one the server has cached."""
    rng = random.Random(f"{nonce}-{i}")
    return "".join(rng.choice(_words) for _ in range(words))


def load_words(tok, rows: int) -> None:
    """Whole-word pieces whose ids fit the random model's smaller embedding (``rows``), so the
    text round-trips to ids it accepts."""
    for t in range(300, rows):
        w = tok.decode([t])
        if w.startswith(" ") and w[1:].isalpha() and tok.encode(w, add_special_tokens=False) == [t]:
            _words.append(w)


class Window:
    """Steady-state numbers, measured from the moment every stream is decoding until each has
    made ``steps`` more tokens: decode tok/s of all streams over that wall time and over the
    engine's CPU time (``cpu``: seconds so far; on a loaded machine the second is the steadier),
    the median gap between a stream's tokens (inter-token latency), the median time to first
    token (from each stream's start)."""

    def __init__(self, n: int, steps: int, cpu):
        self.times, self.steps, self.cpu = [[] for _ in range(n)], steps, cpu
        self.t0 = self.c0 = None

    def done(self) -> bool:
        """Call after new token times were appended; True once the window is complete."""
        if self.t0 is None:
            if not all(self.times):
                return False
            self.t0, self.c0 = time.perf_counter(), self.cpu()
        return all(sum(1 for x in t if x > self.t0) >= self.steps for t in self.times)

    def result(self, starts: list) -> dict:
        t1, c1 = time.perf_counter(), self.cpu()
        n = sum(1 for t in self.times for x in t if x > self.t0)
        gaps = [b - a for t in self.times for a, b in zip(t, t[1:]) if a >= self.t0]
        return {"decode_tps": n / (t1 - self.t0), "decode_tok_per_cpu_s": n / max(c1 - self.c0, 1e-9),
                "ttft_s": statistics.median(t[0] - s for t, s in zip(self.times, starts)),
                "itl_ms": 1000 * statistics.median(gaps)}


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system, all threads) a process has used."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# --- in-process engines (run as: batching.py --worker ENGINE FOLDER ...) ----------------------

def worker(engine: str, folder: str, levels: list, steps: int, words: int, nonce: str) -> dict:
    sys.path.insert(0, str(ROOT))
    if engine == "mlx_lfm2":
        from mlx_lfm2 import load
        from mlx_lfm2.engine.batch import BatchGenerator
        from mlx_lfm2.engine.request import sampling_for

        model, tok = load(folder)
        bias = sampling_for(0, logit_bias={t: -1e9 for t in tok.eos_token_ids})

        def run(prompts):  # yields, after each step, the stream index of every token it made
            gen = BatchGenerator(model, max_batch=len(prompts))
            uids = [gen.insert(p, max_tokens=1 << 20, **bias) for p in prompts]
            while True:
                yield [uids.index(t.uid) for t in gen.step()]
    else:
        from mlx_lm import load
        from mlx_lm.generate import BatchGenerator
        from mlx_lm.sample_utils import make_logits_processors

        model, tok = load(folder)
        procs = make_logits_processors({t: -1e9 for t in tok.eos_token_ids})

        def run(prompts):
            gen = BatchGenerator(model, max_tokens=1 << 20, stop_tokens=[[t] for t in tok.eos_token_ids],
                                 logits_processors=procs, completion_batch_size=len(prompts),
                                 prefill_batch_size=len(prompts))
            uids = gen.insert(prompts, [1 << 20] * len(prompts))
            try:
                while True:
                    yield [uids.index(r.uid) for r in gen.next_generated()]
            finally:
                gen.close()

    load_words(tok, model.args.vocab_size)
    out = {}
    for n in [1] + levels:  # the first is a warm-up
        prompts = [tok.encode(prompt_text(i, words, f"{nonce}{n}")) for i in range(n)]
        w, start = Window(n, steps, time.process_time), time.perf_counter()
        steps_iter = run(prompts)
        for made in steps_iter:
            now = time.perf_counter()
            for i in made:
                w.times[i].append(now)
            if w.done():
                steps_iter.close()
                break
        out.update({f"{k}@{n}": v for k, v in w.result([start] * n).items()})
    return out


# --- the server -----------------------------------------------------------------------------

def stream(base: str, prompt: str, tokens: int, eos: list, rec: dict, stop: threading.Event = None):
    import httpx

    body = {"prompt": prompt, "max_tokens": tokens, "temperature": 0, "stream": True,
            "logit_bias": {str(t): -100 for t in eos}}
    rec.update(start=time.perf_counter(), times=[])
    with httpx.stream("POST", base + "/v1/completions", json=body, timeout=600) as r:
        for line in r.iter_lines():
            if stop is not None and stop.is_set():
                return
            if line.startswith("data: ") and '"text":""' not in line.replace(" ", "") and line != "data: [DONE]":
                rec["times"].append(time.perf_counter())


def concurrent(base: str, prompts: list, steps: int, eos: list, pid: int) -> dict:
    """N streams at once (one chunk ~ one token); hung up once the window is measured."""
    stop, recs = threading.Event(), [{} for _ in prompts]
    w = Window(len(prompts), steps, lambda: process_cpu(pid))
    threads = [threading.Thread(target=stream, args=(base, p, 1 << 20, eos, r, stop), daemon=True)
               for p, r in zip(prompts, recs)]
    for t in threads:
        t.start()
    while True:
        w.times = [list(r.get("times", ())) for r in recs]
        if w.done():
            break
        time.sleep(0.01)
    m = w.result([r["start"] for r in recs])
    stop.set()
    for t in threads:
        t.join()
    return m


def join_ttft(base: str, words: int, eos: list, nonce: str, others: int = 7) -> float:
    """TTFT of a request sent while ``others`` streams decode (0: alone)."""
    stop, recs = threading.Event(), [{} for _ in range(others)]
    threads = [threading.Thread(target=stream, args=(base, prompt_text(100 + i, words, nonce), 1 << 20, eos, r, stop),
                                daemon=True) for i, r in enumerate(recs)]
    for t in threads:
        t.start()
    while not all(len(r.get("times", ())) >= 2 for r in recs):
        time.sleep(0.01)
    rec = {}
    stream(base, prompt_text(999, words, nonce), 2, eos, rec)  # 7 others' prompts: as long
    stop.set()
    for t in threads:
        t.join()
    return rec["times"][0] - rec["start"]


def server_round(folder, levels, steps, words, join_words, nonce) -> dict:
    import httpx

    from mlx_lfm2.text.tokenizer import load_tokenizer

    sys.path.insert(0, str(ROOT / "tests"))
    from test_server import free_port

    tok = load_tokenizer(folder)
    eos = list(tok.eos_token_ids)
    load_words(tok, json.loads((folder / "config.json").read_text())["vocab_size"])
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "mlx_lfm2.server", "--model", str(folder), "--port", str(port),
                             "--max-batch", "16", "--queue-size", "64"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        while True:
            try:
                if httpx.get(base + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        out = {}
        for n in [1] + levels:  # the first is a warm-up
            m = concurrent(base, [prompt_text(i, words, f"{nonce}{n}") for i in range(n)], steps, eos, proc.pid)
            out.update({f"{k}@{n}": v for k, v in m.items()})
        out["join_ttft_alone_s"] = join_ttft(base, join_words, eos, nonce + "a", others=0)
        out["join_ttft_with_7_s"] = join_ttft(base, join_words, eos, nonce + "b", others=7)
        return out
    finally:
        proc.terminate()
        proc.wait(30)


def main():
    p = model_parser(__doc__)
    p.add_argument("--steps", type=int, default=8, help="tokens per stream in the measured window")
    p.add_argument("--words", type=int, default=12, help="prompt length in words (one token each)")
    p.add_argument("--levels", type=int, nargs="*", default=[1, 2, 4, 8, 16])
    p.add_argument("--peer-levels", type=int, nargs="*", default=[1, 8],
                   help="mlx-lm's levels (its bfloat16 CPU decode is ~10x slower: keep them few)")
    p.add_argument("--join-words", type=int, default=60, help="prompt of the request that joins a batch")
    p.add_argument("--engines", nargs="*", default=["server", "mlx_lfm2", "mlx_lm"])
    p.add_argument("--worker", nargs=2, metavar=("ENGINE", "FOLDER"), help=argparse.SUPPRESS)
    p.add_argument("--nonce", default="r", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        print(json.dumps(worker(a.worker[0], a.worker[1], a.levels, a.steps, a.words, a.nonce)))
        return
    folder = converted(checkpoint(a.preset, a.layers), a.bits)
    common = ["--steps", str(a.steps), "--words", str(a.words)]
    rounds = iter(range(1000))

    def runner(engine):
        def run():
            nonce = f"r{next(rounds)}"
            if engine == "server":
                out = server_round(folder, a.levels, a.steps, a.words, a.join_words, nonce)
            else:
                levels = a.peer_levels if engine == "mlx_lm" else a.levels
                out = run_json(["bench/batching.py", "--worker", engine, str(folder), "--nonce", nonce,
                                "--levels", *map(str, levels), *common])
            print(json.dumps({"round": nonce, "engine": engine, **out}), file=sys.stderr, flush=True)
            return out
        return run

    med = alternating_medians({e: runner(e) for e in a.engines}, a.runs)
    derived = {}
    for e, m in med.items():
        one = m.get("decode_tps@1")
        one_cpu = m.get("decode_tok_per_cpu_s@1")
        derived[e] = {f"scaling@{n}": m[f"decode_tps@{n}"] / one for n in a.levels if one and f"decode_tps@{n}" in m}
        derived[e].update({f"cpu_scaling@{n}": m[f"decode_tok_per_cpu_s@{n}"] / one_cpu for n in a.levels
                           if one_cpu and f"decode_tok_per_cpu_s@{n}" in m})
        if "mlx_lm" in med and e != "mlx_lm" and "decode_tps@8" in m:
            derived[e]["over_mlx_lm@8"] = m["decode_tps@8"] / med["mlx_lm"]["decode_tps@8"]
            derived[e]["cpu_over_mlx_lm@8"] = m["decode_tok_per_cpu_s@8"] / med["mlx_lm"]["decode_tok_per_cpu_s@8"]
    if "server" in med:
        s = med["server"]
        derived["server"]["join_ttft_ratio"] = s["join_ttft_with_7_s"] / s["join_ttft_alone_s"]
    print(json.dumps({"bench": "batching", "preset": a.preset, "layers": a.layers, "bits": a.bits, "runs": a.runs,
                      "steps": a.steps, "machine": f"{platform.machine()} {platform.system()}", "median": med,
                      "derived": derived,
                      "ratio_over_mlx_lm": ratios(med, "mlx_lm") if "mlx_lm" in med else None}))


if __name__ == "__main__":
    main()
