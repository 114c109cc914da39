"""Shared by the benchmark scripts: checkpoints on disk, subprocess runs, medians."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Where benches keep their checkpoints between runs; tests point it at a temporary folder.
OUT = Path(os.environ.get("MLX_LFM2_BENCH_OUT", ROOT / "bench" / "out"))
REFERENCE = ROOT / "tests" / "fixtures" / "LFM2-350M"
sys.path.insert(0, str(ROOT))


def model_parser(doc: str, preset: str = "24b-a2b-narrow", layers: int = 8, runs: int = 3):
    """An argument parser with the options every bench shares: which random checkpoint, how
    quantized, how many alternating runs."""
    import argparse

    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--preset", default=preset)
    p.add_argument("--layers", type=int, default=layers)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--runs", type=int, default=runs)
    return p


def checkpoint(preset: str, layers: int, dtype: str = "bfloat16", **overrides) -> Path:
    """A random hub checkpoint, written once and reused (``overrides``: config keys)."""
    from mlx_lfm2.weights.random_checkpoint import PRESETS, write_checkpoint

    tag = "".join(f"-{k}{v}" for k, v in sorted(overrides.items()))
    folder = OUT / f"{preset}-{layers}L-{dtype}{tag}"
    if not (folder / "config.json").exists():
        write_checkpoint(folder, {**PRESETS[preset](layers), **overrides}, dtype=dtype,
                         tokenizer_from=REFERENCE if REFERENCE.exists() else None)
    return folder


def converted(src: Path, bits: int, group_size: int = 64, recipe: str = "uniform") -> Path:
    from mlx_lfm2 import convert

    folder = OUT / f"{src.name}-q{bits}-g{group_size}-{recipe}"
    if not (folder / "config.json").exists():
        convert(src, folder, quantize=True, q_bits=bits, q_group_size=group_size, quant_recipe=recipe,
                force=True, progress=False)
    return folder


def run_json(args: list[str], timeout: int = 3600) -> dict:
    """Run a python module/script in a fresh process; its last stdout line is JSON."""
    p = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if p.returncode != 0:
        raise RuntimeError(f"{args} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def alternating_medians(runners: dict, runs: int) -> dict:
    """Call each engine's runner (``name -> () -> dict of numbers``) ``runs`` times, reversing
    the order every other round; the median of each number per engine."""
    results = {e: [] for e in runners}
    for i in range(runs):
        for e in list(runners)[:: 1 if i % 2 == 0 else -1]:
            results[e].append(runners[e]())
    return {e: {k: statistics.median(r[k] for r in rs) for k, v in rs[0].items() if isinstance(v, (int, float))}
            for e, rs in results.items()}


def ratios(med: dict, over: str) -> dict:
    """Each other engine's medians divided by ``over``'s, for the numbers both report."""
    return {e: {k: v / med[over][k] for k, v in m.items() if isinstance(v, (int, float)) and med[over].get(k)}
            for e, m in med.items() if e != over}


def peak_rss_gb() -> float:
    """This process's peak resident memory. (Linux's ru_maxrss survives exec, so a child
    would report at least its parent's peak; VmHWM does not.)"""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1e6
    except OSError:
        pass
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1e9 if sys.platform == "darwin" else rss / 1e6
