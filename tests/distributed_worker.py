"""Run under ``mlx.launch`` by tests/test_distributed.py: greedy tokens and memory of one rank.

    python tests/distributed_worker.py FOLDER OUT_DIR [--prompt 1,2,3] [--max-tokens N]
writes OUT_DIR/rank{r}.json: {"tokens", "peak", "weights", "layers", "size"}.
"""

import argparse
import json
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from mlx_lfm2.engine.generation import generate_step
from mlx_lfm2.weights.loader import load_model


def main():
    p = argparse.ArgumentParser()
    p.add_argument("folder")
    p.add_argument("out", type=Path)
    p.add_argument("--prompt", default="1,5,9,200,33,7,81,4")
    p.add_argument("--max-tokens", type=int, default=12)
    p.add_argument("--prefill-step", type=int, default=3)
    a = p.parse_args()
    mx.reset_peak_memory()
    model = load_model(a.folder)
    weights = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    prompt = mx.array([int(t) for t in a.prompt.split(",")], mx.uint32)
    tokens = [t for t, _ in generate_step(prompt, model, model.make_cache(), max_tokens=a.max_tokens,
                                          prefill_step_size=a.prefill_step)]
    group = mx.distributed.init()
    owned = getattr(model, "owned", range(len(model.layers)))
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / f"rank{group.rank()}.json").write_text(json.dumps(dict(
        tokens=tokens, peak=mx.get_peak_memory(), weights=weights, layers=[owned.start, owned.stop],
        size=group.size())))


if __name__ == "__main__":
    main()
