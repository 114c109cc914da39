"""Metrics' cost on decode speed: the same server app with and without its observer (the
per-request record, log line, counters and histograms, and each token's timing), side by side.

Both apps run in this process over one loaded model (one scheduler), on loopback; rounds
alternate which goes first; each request streams a greedy completion (of token ids) of
``--max-tokens`` with EOS suppressed, and its decode tok/s is its tokens after the first over
the time from the first to the last (the client's clock). Reported: medians per app, the ratio,
and the observer's own work per token and per request timed alone (what the HTTP numbers,
noisy on a shared CPU, cannot resolve below a few percent).

    python bench/metrics_overhead.py --layers 4 --runs 5 --max-tokens 64
"""

import json
import platform
import statistics
import threading
import time

from common import alternating_medians, checkpoint, converted, model_parser


def serve(app) -> str:
    import uvicorn

    from conftest import free_port

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.02)
    return f"http://127.0.0.1:{port}"


def stream_tps(base: str, max_tokens: int, stops: list) -> dict:
    import httpx

    body = {"model": "m", "prompt": list(range(10, 42)), "stream": True,
            "max_tokens": max_tokens, "temperature": 0, "logit_bias": {str(t): -100 for t in stops}}
    times = []
    with httpx.stream("POST", base + "/v1/completions", json=body, timeout=600) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                data = json.loads(line[6:])
                if "error" in data:
                    raise RuntimeError(f"the server: {data['error']}")
                choices = data["choices"]
                if choices and choices[0].get("text"):
                    times.append(time.perf_counter())
    return {"decode_tps": (len(times) - 1) / (times[-1] - times[0]), "chunks": len(times)}


def observer_cost(max_tokens: int, n: int = 20000) -> dict:
    """Seconds of the observer's work: one token's timing, one request's record (log line and
    histograms over ``max_tokens`` gaps), timed alone."""
    from mlx_lfm2.serve.metrics import JobTiming, Metrics, Record, log_line
    from mlx_lfm2.serve.models import Models

    t = JobTiming()
    tic = time.perf_counter()
    for _ in range(n):
        t.token("x")
    per_token = (time.perf_counter() - tic) / n
    t = JobTiming()
    for _ in range(max_tokens):
        t.token("x")

    class J:  # a finished job as the observer reads it
        prompt_tokens, cached_tokens, model, timing = 20, 0, "m", t

    metrics = Metrics(Models({}, build=None))
    record = Record("req-1", "POST /v1/chat/completions", status=200, jobs=[J()])
    tic = time.perf_counter()
    for _ in range(50):
        log_line(record)
        metrics.observe(record)
    return {"per_token_s": per_token, "per_request_s": (time.perf_counter() - tic) / 50}


def main():
    p = model_parser(__doc__, layers=4, runs=5)
    p.add_argument("--max-tokens", type=int, default=64)
    a = p.parse_args()
    import sys

    sys.path.insert(0, str(__import__("common").ROOT / "tests"))
    from mlx_lfm2 import load
    from mlx_lfm2.serve.app import create_app
    from mlx_lfm2.serve.models import Models
    from mlx_lfm2.serve.scheduler import Scheduler

    src = checkpoint(a.preset, a.layers)
    folder = converted(src, a.bits) if a.bits else src
    model, tokenizer = load(str(folder))
    stops = sorted(t for t in tokenizer.eos_token_ids if t < model.args.vocab_size)
    models = Models.single(Scheduler(model, tokenizer, "m", disk=None))  # one worker owns the model
    bases = {"with_metrics": serve(create_app(models)), "no_metrics": serve(create_app(models, observe=False))}
    for base in bases.values():  # warm-up: compile, caches
        stream_tps(base, 8, stops)
    med = alternating_medians({k: (lambda b=b: stream_tps(b, a.max_tokens, stops)) for k, b in bases.items()}, a.runs)
    cost = observer_cost(a.max_tokens)
    step = 1 / med["no_metrics"]["decode_tps"]
    result = {"preset": a.preset, "layers": a.layers, "bits": a.bits, "max_tokens": a.max_tokens, "runs": a.runs,
              "machine": platform.machine(), "medians": med,
              "ratio_with_over_without": med["with_metrics"]["decode_tps"] / med["no_metrics"]["decode_tps"],
              "observer_per_token_s": cost["per_token_s"], "observer_per_request_s": cost["per_request_s"],
              "observer_share_of_a_decode_step": (cost["per_token_s"] + cost["per_request_s"] / a.max_tokens) / step}
    print(f"decode tok/s with metrics {med['with_metrics']['decode_tps']:.1f}, without {med['no_metrics']['decode_tps']:.1f} "
          f"(ratio {result['ratio_with_over_without']:.3f}); the observer's own work: "
          f"{cost['per_token_s'] * 1e6:.2f} us a token + {cost['per_request_s'] * 1e6:.0f} us a request = "
          f"{result['observer_share_of_a_decode_step'] * 100:.3f}% of a decode step")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
