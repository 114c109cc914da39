"""Structured output: per-token overhead of a JSON-schema constraint, and schema compile time.

Decode runs alternate in one process between: no constraint; the 30-field schema without a
token budget ("free": the grammar's mask only), with a budget it never reaches ("tracked": the
completion kept up to date each token), with ``--tokens`` as its budget ("closing": its shortest
completion, ~210 tokens, does not fit, so the budget finds that out and lets go); the nested
schema of tests/fixtures with its shortest completion (22 tokens) + 3 as the budget ("tight":
every step within the budget window, the model's top choices each checked for room to finish,
the matcher waiting for the logits); and the 30-field schema with the mask computed before the
forward is started ("serial": what the overlap saves). Medians; each constrained variant's
per-token time over the unconstrained run of the same round (median of those ratios); the
matcher's own CPU time per token (mask and advance) and the budget's.

    python bench/structured.py --preset 24b-a2b --layers 4 --bits 4 --tokens 16 --runs 3
"""

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

from common import alternating_medians, checkpoint, converted, model_parser

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = Path(os.environ.get("LFM2_REFERENCE", ROOT / "tests" / "fixtures" / "LFM2-350M"))
TRICKY = json.loads((ROOT / "tests" / "fixtures" / "tricky_schemas.json").read_text(encoding="utf-8"))
PROMPT = [{"role": "user", "content": "Extract the order details from the email below as JSON."}]


def wide_schema(fields: int = 30) -> dict:
    """An extraction-style object of ``fields`` required fields of mixed kinds."""
    kinds = [{"type": "string", "maxLength": 40}, {"type": "integer", "minimum": 0},
             {"type": "number"}, {"type": "boolean"}, {"enum": ["low", "medium", "high"]},
             {"type": "array", "items": {"type": "string"}, "maxItems": 5},
             {"anyOf": [{"type": "string"}, {"type": "null"}]}]
    props = {f"field_{i}": kinds[i % len(kinds)] for i in range(fields)}
    return {"type": "object", "properties": props, "required": list(props), "additionalProperties": False}


def compile_ms(tok, schema, runs: int = 20) -> dict:
    """Schema -> matcher (with its first completion) -> first mask, median of ``runs``
    (llguidance's tokenizer view is built once per tokenizer and timed apart); and the
    completion of the empty reply alone (``closing.Closer.complete``)."""
    from mlx_lfm2.text import constraints

    t = time.perf_counter()
    constraints.grammar_tokenizer(tok)
    setup = time.perf_counter() - t
    times, closing = [], []
    for _ in range(runs):
        t = time.perf_counter()
        c = constraints.make_constraint(tok, json_schema=schema)
        c.allowed(65536)
        times.append(time.perf_counter() - t)
        t = time.perf_counter()
        c.closer.complete(c.matcher)
        closing.append(time.perf_counter() - t)
    return {"compile_ms": statistics.median(times) * 1e3, "tokenizer_setup_s": setup,
            "shortest_completion_ms": statistics.median(closing) * 1e3, "shortest_completion_tokens": len(c.plan)}


class _NoOverlap:
    """mlx.core, but ``async_eval`` does nothing: the constraint computes its mask before the
    forward starts, as a processor that did not start it would."""

    def __init__(self, mx):
        self._mx = mx

    def __getattr__(self, name):
        return (lambda *a: None) if name == "async_eval" else getattr(self._mx, name)


def main():
    p = model_parser(__doc__, preset="24b-a2b", layers=4, runs=5)
    p.add_argument("--tokens", type=int, default=48)
    a = p.parse_args()
    import mlx.core as mx

    from mlx_lfm2 import stream_generate
    from mlx_lfm2.engine import request
    from mlx_lfm2.text import constraints
    from mlx_lfm2.text.tokenizer import load_tokenizer
    from mlx_lfm2.weights.loader import load_model

    tok = load_tokenizer(REFERENCE)
    compiled = {"wide30": compile_ms(tok, wide_schema(30)),
                **{k: compile_ms(tok, s) for k, s in TRICKY.items()}}
    model = load_model(converted(checkpoint(a.preset, a.layers), a.bits))
    no_eos = {t: -1e9 for t in tok.eos_token_ids}  # the unconstrained run goes the full length
    mask_s, budget_s = [], []  # seconds in the matcher (advance + mask), in the budget
    rounds = {}  # variant -> its result in each round

    def timed(method, into):
        def call(self, *args):
            t = time.perf_counter()
            out = method(self, *args)
            into.append(time.perf_counter() - t)
            return out
        return call

    constraints.Constraint.advance = timed(constraints.Constraint.advance, mask_s)
    constraints.Constraint.allowed = timed(constraints.Constraint.allowed, mask_s)
    constraints.Constraint.budget = timed(constraints.Constraint.budget, budget_s)
    build = request.make_constraint

    def runner(name, serial=False, budget="given", tokens=None, **constraint):
        def with_budget(*args, max_tokens=None, **kw):  # None: no budget; "ample": one never reached
            return build(*args, max_tokens={"given": max_tokens, "none": None, "ample": 10**6}[budget], **kw)

        def run():
            mask_s.clear()
            budget_s.clear()
            constraints.mx = _NoOverlap(mx) if serial else mx
            request.make_constraint = with_budget
            *_, last = stream_generate(model, tok, PROMPT, max_tokens=tokens or a.tokens, temperature=0.0,
                                       logit_bias=None if constraint else no_eos, **constraint)
            constraints.mx, request.make_constraint = mx, build
            out = {"ms_per_token": 1e3 / last.generation_tps, "tokens": last.generation_tokens,
                   "matcher_ms_per_token": sum(mask_s) * 1e3 / last.generation_tokens,
                   "budget_ms_per_token": sum(budget_s) * 1e3 / last.generation_tokens}
            print(name, out, file=sys.stderr, flush=True)
            rounds.setdefault(name, []).append(out)
            return out
        return run

    wide = {"json_schema": wide_schema(30)}
    shortest = lambda schema: len(constraints.make_constraint(tok, json_schema=schema).plan)  # noqa: E731
    runners = {"plain": runner("plain"), "wide30_free": runner("wide30_free", budget="none", **wide),
               "wide30_tracked": runner("wide30_tracked", budget="ample", **wide),
               "wide30_closing": runner("wide30_closing", **wide),
               "nested_tight": runner("nested_tight", tokens=shortest(TRICKY["nested"]) + 3, json_schema=TRICKY["nested"]),
               "wide30_serial": runner("wide30_serial", serial=True, budget="none", **wide)}
    for r in runners.values():  # warm-up
        r()
    rounds.clear()
    med = alternating_medians(runners, a.runs)
    # Each variant over the plain run of the same round, so slow swings of load cancel.
    paired = {k: statistics.median(c["ms_per_token"] / p["ms_per_token"] - 1 for c, p in zip(rounds[k], rounds["plain"]))
              for k in runners if k != "plain"}
    print(json.dumps({
        "bench": "structured", "preset": a.preset, "layers": a.layers, "bits": a.bits, "tokens": a.tokens,
        "runs": a.runs, "machine": f"{platform.machine()} {platform.system()} {os.cpu_count()} cores",
        "load_avg": os.getloadavg(), "compile": compiled, "median": med, "overhead_vs_plain_paired": paired,
        "matcher_share_of_step": {k: m["matcher_ms_per_token"] / med["plain"]["ms_per_token"] for k, m in med.items()},
    }))

if __name__ == "__main__":
    main()
