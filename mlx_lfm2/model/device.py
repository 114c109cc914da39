"""Every choice that depends on the device, in one place.

The model has one copy of each block; what differs between MLX's CPU backend and a GPU
(Metal, CUDA) is decided by the functions below, all of which read ``kind()``:

=================================  ==============================  ===========================
choice                             CPU                             GPU
=================================  ==============================  ===========================
activations of quantized models    float32 (quantized matmuls      the weights' dtype
                                   ~8x faster than bfloat16 here)
large quantized matmuls            one slice of rows per CPU       one op
                                   stream (ops on different
                                   streams run in parallel)
decode experts (few pairs)         take the K chosen experts'      ``gather_qmm`` reads them
                                   weights, then ``gather_qmm``    in place: no copy
                                   (its per-call scale handling
                                   then covers K experts, not E)
``gather_mm`` (unquantized)        float32 inputs                  any float
gate + up (experts, dense FFN);    separate matmuls (fusing        one matmul each, weights
attention q + k + v                gained nothing here)            concatenated at load time
one-token decode                   plain ops                       ``mx.compile``d pieces:
                                                                   fewer launches
prompt chunk                       128 tokens                      2048 tokens
=================================  ==============================  ===========================

The choices that swap in other layers (split quantized matmuls, fused matmuls, compiled
pieces) are applied once, after loading, by ``layers.specialize``; the others are read where
they apply. ``kind()`` is ``mx.default_device()``'s type unless overridden:
``MLX_LFM2_DEVICE=gpu`` or ``with assume("gpu"):`` make every check answer "gpu" while the ops
still run on the real device, so a CPU-only machine can build (and check) the GPU path's graph
and numbers.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Callable, Optional

import mlx.core as mx

KINDS = ("cpu", "gpu")
_assumed: Optional[str] = os.environ.get("MLX_LFM2_DEVICE") or None
if _assumed not in (None, *KINDS):
    raise ValueError(f"MLX_LFM2_DEVICE must be one of {KINDS}, not {_assumed!r}")


def kind() -> str:
    """"cpu" or "gpu": the device the choices below are made for."""
    if _assumed is not None:
        return _assumed
    return "cpu" if mx.default_device().type == mx.cpu else "gpu"


@contextmanager
def assume(k: str):
    """Make the choices for device ``k`` inside the block (ops still run where they run)."""
    global _assumed
    if k not in KINDS:
        raise ValueError(f"device kind must be one of {KINDS}, not {k!r}")
    old, _assumed = _assumed, k
    try:
        yield
    finally:
        _assumed = old


def on_cpu() -> bool:
    return kind() == "cpu"


def runtime() -> str:
    """Where MLX's ops really run, whatever ``kind`` the choices assume: "cpu", "metal", "cuda",
    or "cuda-old" (engine/memory.py's ``Shapes.backend``: which attention kernels exist). A CUDA
    device that does not say its compute capability counts as one before Ampere (its attention
    then charged unfused: the safe side)."""
    if mx.default_device().type == mx.cpu:
        return "cpu"
    if not (hasattr(mx, "cuda") and mx.cuda.is_available()):
        return "metal"
    major = mx.device_info().get("compute_capability_major", 0)
    return "cuda" if isinstance(major, int) and major >= 8 else "cuda-old"


# --- the choices -------------------------------------------------------------------------


def linalg_device():
    """Where MLX's linear algebra (Cholesky, inverses) runs: its CPU, on every backend (MLX
    implements ``mx.linalg`` there only)."""
    return mx.cpu


def compute_dtype(quantized: bool) -> Optional[mx.Dtype]:
    """Activation dtype for a model (None: the weights'). On the CPU, quantized matmuls with
    float32 inputs run ~8x faster than with bfloat16 ones (scales stay bfloat16)."""
    return mx.float32 if quantized and on_cpu() else None


def prefill_step() -> int:
    """Prompt tokens per prefill chunk. On the CPU, 128-token chunks prefill as fast as
    512-token ones (real 24B-A2B layer shapes: 5.94 tok/s both) with a third less transient
    memory; GPUs want large chunks (mlx-lm's 2048)."""
    return 128 if on_cpu() else 2048


def take_experts_first(pairs: int, num_experts: int) -> bool:
    """Copy the chosen experts' weights before ``gather_qmm`` (CPU decode only): MLX's CPU
    kernel converts scales and biases per call, so K experts cost less than all E. A GPU
    reads the chosen experts in place; a copy would be an extra pass over every byte."""
    return on_cpu() and pairs <= num_experts // 4


def float32_gather_mm(dtype: mx.Dtype) -> bool:
    """MLX's CPU ``gather_mm`` is float32-only past a few rows; GPUs take any float."""
    return on_cpu() and dtype != mx.float32


def split_matmuls() -> bool:
    """Quantized linear layers (and the tied head) split their rows across CPU streams
    (``split``); a GPU runs each as one op."""
    return on_cpu()


def fuse_matmuls() -> bool:
    """One matmul for gate and up (experts and dense FFNs) and one for q, k and v (weights
    concatenated at load): fewer launches on a GPU; on the CPU the fused expert matmul measured
    no faster (33.7 vs 33.5 ms, real shapes), so the CPU keeps the checkpoint's layout."""
    return not on_cpu()


def compile_decode() -> bool:
    """``mx.compile`` the fixed-shape pieces of a one-token step (GPU): elementwise chains
    fuse into one kernel each, so a step launches fewer kernels."""
    return not on_cpu()


# --- CPU streams -------------------------------------------------------------------------

MIN_WEIGHTS = 1 << 17  # below this a split costs more than it saves
_streams: list = []


def cpu_streams() -> list:
    """One CPU stream per core (at most 8; ``MLX_LFM2_CPU_STREAMS`` overrides), [] off the CPU."""
    if not on_cpu() or mx.default_device().type != mx.cpu:
        return []
    if not _streams:
        n = int(os.environ.get("MLX_LFM2_CPU_STREAMS", min(os.cpu_count() or 1, 8)))
        _streams.extend([mx.default_stream(mx.cpu)] + [mx.new_stream(mx.cpu) for _ in range(n - 1)])
    return _streams if len(_streams) > 1 else []


def split(part: Callable[[int, int], mx.array], n: int, work: int, axis: int = -1) -> mx.array:
    """``part(lo, hi)`` over ``[0, n)`` in one slice per CPU stream, concatenated on ``axis``.

    MLX's CPU backend runs each op on one thread, but ops on different streams run at the
    same time, so a large quantized matmul is cut into one slice of output rows per core
    (1.8x on two cores for a 1536x2048 4-bit mat-vec). Elsewhere: ``part(0, n)``.
    """
    streams = cpu_streams()
    if not streams or work < MIN_WEIGHTS or n < 2 * len(streams):
        return part(0, n)
    k = len(streams)
    bounds = [n * i // k for i in range(k + 1)]
    outs = []
    for s, lo, hi in zip(streams, bounds, bounds[1:]):
        with mx.stream(s):
            outs.append(part(lo, hi))
    return mx.concatenate(outs, axis=axis)
