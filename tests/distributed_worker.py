"""Run under ``mlx.launch`` by tests/test_distributed.py: greedy decode of each model folder.

    python tests/distributed_worker.py OUT_DIR FOLDER...
writes OUT_DIR/rank{r}.json: one entry per folder with the tokens, the sampled tokens' logprobs
(real on rank 0 only), this rank's peak memory and weight bytes, and its layer range.
"""

import json
import sys
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from mlx_lfm2.engine.decode import generate_step
from mlx_lfm2.weights.loader import load_model

PROMPT = [1, 5, 9, 200, 33, 7, 81, 4, 60, 2]


def run(folder: str, max_tokens: int = 10, prefill_step: int = 4) -> dict:
    """Greedy tokens after PROMPT; the same code runs in the single-process reference."""
    mx.clear_cache()
    mx.reset_peak_memory()
    model = load_model(folder)
    weights = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    tokens, logprobs = [], []
    for t, lp in generate_step(mx.array(PROMPT, mx.uint32), model, model.make_cache(),
                               max_tokens=max_tokens, prefill_step_size=prefill_step):
        tokens.append(t)
        logprobs.append(lp[t].item())
    owned = getattr(model, "owned", range(len(model.layers)))
    return dict(tokens=tokens, logprobs=logprobs, peak=mx.get_peak_memory(), weights=weights,
                layers=[owned.start, owned.stop])


def mismatched_prompts(folder: str) -> str:
    """Ranks fed prompts of different lengths: the error every rank raises (not a hang)."""
    model = load_model(folder)
    prompt = mx.array(PROMPT[: 3 + mx.distributed.init().rank()], mx.uint32)
    try:
        list(generate_step(prompt, model, model.make_cache(), max_tokens=2))
    except RuntimeError as e:
        return str(e)
    return ""


def main():
    out = Path(sys.argv[1])
    results = {f: run(f) for f in sys.argv[2:]}
    results["mismatch"] = mismatched_prompts(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{mx.distributed.init().rank()}.json").write_text(json.dumps(results))


if __name__ == "__main__":
    main()
