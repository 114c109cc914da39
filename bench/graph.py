"""Ops per decoded token: mlx_lfm2's GPU and CPU paths and mlx-lm, from ``mx.export_to_dot``.

    python bench/graph.py --preset 24b-a2b-narrow --layers 8 --bits 4

One decode step (token 17 after a 16-token prompt, batch 1) is built lazily and exported with
``mx.export_to_dot``: the logits and every cache array the step wrote (the conv states are not
ancestors of the logits); every primitive node in that graph is one op. Both engines load the same
quantized folder. How the nodes are counted:

* ``nodes``: every primitive. A compiled function is what ``mx.compile`` made of it: each
  fused elementwise chain is ONE ``Compiled...`` node (one kernel), the other ops in it stay
  themselves. mlx-lm's compiled ``swiglu`` is counted the same way. This is the count the issue
  quotes (1,002 for our GPU path against mlx-lm's 792 before this change).
* ``nodes_fast_as_one``: as ``nodes``, but ``mx.fast.rms_norm`` and ``mx.fast.rope`` as one
  node each, as on Metal and CUDA. A CPU-only MLX build expands them into their fallbacks (~14
  and ~31 ops), and ``mx.compile`` fuses those fallbacks' elementwise ops, which a GPU cannot do
  around its single RMSNorm / RoPE kernel; so each is swapped for a one-op stand-in of the same
  shape that ``mx.compile`` cannot fuse either (the graph is built, never evaluated).
  ``scaled_dot_product_attention`` (~6 ops) and the embedding row's ``mx.dequantize`` (~52) keep
  their fallbacks: a stand-in would drop some of their inputs from the graph, and both engines
  run them identically, so they add the same ops to both (which moves the ratio towards 1).
* ``launches``: ``nodes_fast_as_one`` without the ops that make views and launch no kernel
  (Broadcast, Reshape, ExpandDims, Squeeze, Slice, Transpose, Split, Flatten, Unflatten,
  StopGradient).
* ``uncompiled``: as ``nodes_fast_as_one`` with ``mx.disable_compile()``: every compiled
  function counted as the ops it expands to (both engines).

The GPU path is built on this CPU-only machine with ``device.assume("gpu")``: the device checks
answer "gpu", so the graph has the GPU path's shape; the ops would run on the CPU.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import re
import sys
import tempfile
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import checkpoint, converted  # noqa: E402

VIEWS = {"Broadcast", "Reshape", "ExpandDims", "Squeeze", "Slice", "Transpose", "Split", "Flatten",
         "Unflatten", "StopGradient"}
# The stand-ins' ops, named back after what they stand for.
STAND_INS = {"Softmax": "RMSNorm", "Sort": "RoPE"}


def graph_ops(*outputs: mx.array) -> collections.Counter:
    """Primitive nodes of the (unevaluated) graph behind ``outputs``, by kind."""
    with tempfile.NamedTemporaryFile("r", suffix=".dot") as f:
        mx.export_to_dot(f.name, *outputs)
        return collections.Counter(re.findall(r'label ="([^"]+)"', f.read()))


@contextlib.contextmanager
def fast_ops_as_one():
    """Swap ``mx.fast.rms_norm`` / ``rope`` for one-op stand-ins of the same shape and dtype
    (their other inputs are weights and offsets: sources, not ops)."""
    saved = mx.fast.rms_norm, mx.fast.rope
    mx.fast.rms_norm = lambda x, w, eps: mx.softmax(x, axis=-1)
    mx.fast.rope = lambda x, *a, **k: mx.sort(x, axis=-1)
    try:
        yield
    finally:
        mx.fast.rms_norm, mx.fast.rope = saved


def summary(ops: collections.Counter, fast_as_one: bool) -> dict:
    if fast_as_one:
        ops = collections.Counter({STAND_INS.get(k, k): v for k, v in ops.items()})
    return {"ops": sum(ops.values()), "launches": sum(v for k, v in ops.items() if k not in VIEWS),
            "kinds": dict(ops.most_common())}


def load_engine(engine: str, folder: Path):
    """``(model, cache)`` for ``mlx_lm``, ``mlx_lfm2_gpu`` or ``mlx_lfm2_cpu``."""
    if engine == "mlx_lm":
        from mlx_lm.models.cache import make_prompt_cache
        from mlx_lm.utils import load_model

        model, _ = load_model(folder)
        return model, make_prompt_cache(model)
    from mlx_lfm2.weights.loader import load_model

    model = load_model(folder)
    return model, model.make_cache()


def cache_arrays(cache: list) -> list:
    """The arrays a cache object holds (ours: keys/values/conv_state; mlx-lm's: the same, or
    an ``ArraysCache``'s list)."""
    out = []
    for c in cache:
        for v in vars(c).values():
            out += [a for a in (v if isinstance(v, list) else [v]) if isinstance(a, mx.array)]
    return out


@contextlib.contextmanager
def compile_disabled():
    mx.disable_compile()
    try:
        yield
    finally:
        mx.enable_compile()


def decode_step_ops(engine: str, folder: Path, prompt: int = 16, fast_as_one: bool = False,
                    compiled: bool = True) -> collections.Counter:
    """The ops of one decode step after a ``prompt``-token prefill (a fresh model each time, so
    compiled functions are traced under the counting mode)."""
    from mlx_lfm2.model import device

    kind = {"mlx_lfm2_gpu": "gpu", "mlx_lfm2_cpu": "cpu"}.get(engine)
    with device.assume(kind) if kind else contextlib.nullcontext():
        model, cache = load_engine(engine, folder)
        mx.eval(model(mx.arange(10, 10 + prompt)[None], cache=cache))
        mx.eval([c.state for c in cache])
        with fast_ops_as_one() if fast_as_one else contextlib.nullcontext(), \
                contextlib.nullcontext() if compiled else compile_disabled():
            logits = model(mx.array([[10 + prompt]]), cache=cache)
            return graph_ops(logits, *cache_arrays(cache))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="24b-a2b-narrow")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--folder", type=Path, help="a model folder instead of --preset/--layers/--bits")
    a = p.parse_args()
    folder = a.folder or converted(checkpoint(a.preset, a.layers), a.bits)
    engines = ["mlx_lfm2_gpu", "mlx_lfm2_cpu", "mlx_lm"]
    modes = {"nodes": {}, "nodes_fast_as_one": {"fast_as_one": True},
             "uncompiled": {"fast_as_one": True, "compiled": False}}
    out = {e: {m: summary(decode_step_ops(e, folder, **kw), m != "nodes") for m, kw in modes.items()}
           for e in engines}
    ratio = {m: {k: out["mlx_lfm2_gpu"][m][k] / out["mlx_lm"][m][k] for k in ("ops", "launches")} for m in modes}
    print(f"{'ops per decoded token':40s}" + "".join(f"{e:>14s}" for e in engines) + f"{'gpu / mlx-lm':>14s}")
    rows = [("nodes", "ops", "nodes"), ("nodes_fast_as_one", "ops", "RMSNorm/RoPE as one"),
            ("nodes_fast_as_one", "launches", "RMSNorm/RoPE as one, launches"),
            ("uncompiled", "ops", "RMSNorm/RoPE as one, compile off")]
    for m, k, label in rows:
        print(f"{label:40s}" + "".join(f"{out[e][m][k]:>14d}" for e in engines) + f"{ratio[m][k]:>14.2f}")
    for e in engines:
        print(f"\n{e} (fast ops as one): " + ", ".join(f"{k} {v}" for k, v in out[e]["nodes_fast_as_one"]["kinds"].items()))
    print(json.dumps({"bench": "graph", "folder": str(folder), "per_decoded_token": out, "gpu_over_mlx_lm": ratio}))


if __name__ == "__main__":
    main()
