"""Quantization quality: KL(unquantized || quantized) and top-1 agreement of next-token
distributions on held-out text, bits per weight and conversion time, for each of our methods
and mlx-lm's, on the same random checkpoints.

Models (random weights, tied heads as the real models have, embeddings drawn small enough that
the head gives next-token distributions of a few nats: a plain random tied head puts nearly
all its mass on the input token and hides quantization error):
  narrow           24b-a2b-narrow (64 experts, top-4, width 512), 6 layers
  outliers         the same with 8 outlier activation channels (block norm weights x20 there),
                   the structure of trained LLMs that activation-aware methods exploit
  structured       outliers, and embeddings sharing 16 directions (75% of their variance): every
                   layer's inputs correlated, as trained LLMs' anisotropic hidden states are,
                   the structure GPTQ's error compensation exploits
  tiny-outliers    tests/test_quantize.py's MoE model (hidden 128, 1 dense + 3 MoE layers of 8
                   experts, top-2) with 4 outlier channels; tiny-structured: and anisotropy 8
  24b              real LFM2-24B-A2B per-layer shapes, 3 layers (2 dense + 1 MoE)
  dense            dense LFM2 at LFM2-350M shapes, 4 layers; dense-outliers: 2 of them (one conv, one
                   attention) with 8 outlier channels

Held-out text: the rows of the bundled calibration sample that calibration never sees (every
4th); mlx-lm's calibrated tools get the other rows as their calibration file, so both sides
fit on the same text.

    python bench/quant_quality.py --models narrow outliers --methods all
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import mlx.core as mx
import numpy as np

from common import OUT, REFERENCE, ROOT

MODELS = {
    "narrow": dict(preset="24b-a2b-narrow", layers=6, vocab_size=65536),
    "outliers": dict(preset="24b-a2b-narrow", layers=6, vocab_size=65536, outliers=8),
    "structured": dict(preset="24b-a2b-narrow", layers=6, vocab_size=65536, outliers=8, anisotropy=16),
    "tiny-outliers": dict(preset="tiny-moe", layers=4, hidden_size=128, intermediate_size=256,
                          moe_intermediate_size=64, outliers=4),
    "tiny-structured": dict(preset="tiny-moe", layers=4, hidden_size=128, intermediate_size=256,
                            moe_intermediate_size=64, outliers=4, anisotropy=8),
    "24b": dict(preset="24b-a2b", layers=3),
    "dense": dict(preset="tiny-dense", layers=4, hidden_size=1024, intermediate_size=4608, num_attention_heads=16,
                  num_key_value_heads=8),
    "dense-outliers": dict(preset="tiny-dense", layers=2, hidden_size=1024, intermediate_size=4608,
                           num_attention_heads=16, num_key_value_heads=8, outliers=8),
}
OURS = {  # name -> convert() keywords
    "rtn": {}, "rtn-mxfp4": dict(q_mode="mxfp4"), "rtn-nvfp4": dict(q_mode="nvfp4"), "rtn-mxfp8": dict(q_mode="mxfp8"),
    "awq": dict(q_method="awq"), "awq-mxfp4": dict(q_method="awq", q_mode="mxfp4"),
    "awq-nvfp4": dict(q_method="awq", q_mode="nvfp4"),
    "dynamic-4.5": dict(target_bpw=4.5), "dynamic-awq-4.5": dict(target_bpw=4.5, q_method="awq"),
    "dynamic-awq-4.25": dict(target_bpw=4.25, q_method="awq"),
    "gptq": dict(q_method="gptq"), "awq-gptq": dict(q_method="awq-gptq"),
    "dynamic-awq-gptq-4.5": dict(target_bpw=4.5, q_method="awq-gptq"),
}
MLX_LM = {  # name -> command (after python -m)
    "mlx_lm.convert": ["mlx_lm", "convert", "-q"],
    "mlx_lm.convert-mxfp4": ["mlx_lm", "convert", "-q", "--q-mode", "mxfp4"],
    "mlx_lm.convert-nvfp4": ["mlx_lm", "convert", "-q", "--q-mode", "nvfp4"],
    "mlx_lm.convert-mxfp8": ["mlx_lm", "convert", "-q", "--q-mode", "mxfp8"],
    "mlx_lm.dynamic_quant-4.5": ["mlx_lm", "dynamic_quant", "--target-bpw", "4.5"],
    "mlx_lm.awq": ["mlx_lm", "awq", "--num-samples", "4", "--sequence-length", "512"],
    "mlx_lm.dwq": ["mlx_lm", "dwq", "--num-samples", "20", "--max-seq-length", "257", "--batch-size", "2"],
    # mlx-lm's gptq quantizes the layers it knows (Linear, SwitchLinear) at --bits and every other
    # quantizable module, the embedding (= the tied head) included, at --fallback-bits (default 6):
    # with a large vocabulary that is most of the weights, hence its 6.18 bits at 2 layers. The
    # -4.5 row puts the fallback at 4 bits too: 4.5 bits per weight, the same as plain 4-bit.
    "mlx_lm.gptq": ["mlx_lm", "gptq", "--num-samples", "4", "--sequence-length", "512"],
    "mlx_lm.gptq-4.5": ["mlx_lm", "gptq", "--num-samples", "4", "--sequence-length", "512", "--fallback-bits", "4"],
}


def source(name: str, layers: Optional[int] = None) -> Path:
    from mlx_lfm2.weights.random_checkpoint import PRESETS, write_checkpoint

    spec = dict(MODELS[name])
    preset, outliers, anisotropy = spec.pop("preset"), spec.pop("outliers", 0), spec.pop("anisotropy", 0)
    layers = layers or spec.pop("layers")
    spec.pop("layers", None)
    folder = OUT / f"qq-{name}-{layers}L"
    if not (folder / "config.json").exists():
        write_checkpoint(folder, {**PRESETS[preset](layers), **spec}, tokenizer_from=REFERENCE, outliers=outliers,
                         lm_like_head=True, anisotropy=anisotropy)
    return folder


def calibration_home(tokenizer) -> Path:
    """A HOME for mlx-lm's calibrated tools: its calibration file (~/.cache/mlx-lm/calibration_v5.txt,
    normally downloaded) and a dwq dataset, both the calibration rows of the bundled sample."""
    from mlx_lfm2.weights.calibrate import BUNDLED, HELD_OUT_EVERY, rows

    home = OUT / "mlx-lm-home"
    texts = [t for i, (_, t) in enumerate(rows(BUNDLED)) if i % HELD_OUT_EVERY != HELD_OUT_EVERY - 1]
    (home / ".cache/mlx-lm").mkdir(parents=True, exist_ok=True)
    (home / ".cache/mlx-lm/calibration_v5.txt").write_text("\n\n".join(texts))
    (home / "dwq").mkdir(exist_ok=True)
    (home / "dwq/train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return home


def float32_copy(src: Path) -> Path:
    """The checkpoint with float32 weights: mlx-lm's calibrated tools run the model in its
    weights' dtype, and MLX's CPU gather_mm (the experts) takes only float32."""
    import shutil

    dst = src.with_name(src.name + "-f32")
    if not (dst / "config.json").exists():
        dst.mkdir(exist_ok=True)
        for f in src.iterdir():
            if f.suffix != ".safetensors":
                shutil.copyfile(f, dst / f.name)
        mx.save_safetensors(str(dst / "model.safetensors"),
                            {k: v.astype(mx.float32) for k, v in mx.load(str(src / "model.safetensors")).items()})
    return dst


def to_bfloat16(folder: Path) -> None:
    """Cast a folder's float tensors (scales, biases, norms) to bfloat16, as the tool writes
    them from bfloat16 weights; the quantized values and per-path choices are unchanged."""
    for f in folder.glob("*.safetensors"):
        t = mx.load(str(f))
        mx.save_safetensors(str(f), {k: v.astype(mx.bfloat16) if v.dtype == mx.float32 else v for k, v in t.items()},
                            metadata={"format": "mlx"})


def run_mlx_lm(name: str, src: Path, out: Path, home: Path) -> str:
    """Run one mlx-lm tool; '' on success, else the reason it failed. A calibrated tool on a
    model with experts runs on a float32 copy, its output cast back to bfloat16."""
    moe = json.loads((src / "config.json").read_text()).get("num_experts")
    f32 = moe and "convert" not in name
    if f32:
        src = float32_copy(src)
    cmd = [sys.executable, "-m", *MLX_LM[name]]
    cmd += ["--hf-path" if "convert" in name else "--model", str(src), "--mlx-path", str(out)]
    if name == "mlx_lm.dwq":
        cmd += ["--data-path", str(home / "dwq")]
    env = dict(os.environ, HOME=str(home), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=home, env=env, timeout=3600)
    if p.returncode == 0 and (out / "config.json").exists():
        if f32:
            to_bfloat16(out)
        return ""
    lines = [l for l in (p.stderr + p.stdout).strip().splitlines() if l.strip()]
    return lines[-1][:300] if lines else f"exit {p.returncode}"


def held_out_ids(src: Path, tokens: int) -> np.ndarray:
    from mlx_lfm2.text.tokenizer import load_tokenizer
    from mlx_lfm2.weights.calibrate import load_calibration

    cfg = json.loads((src / "config.json").read_text())
    return load_calibration(load_tokenizer(src), cfg["vocab_size"], tokens=64, held_out_tokens=tokens).held_out


def logits(folder: Path, ids: np.ndarray, **kw) -> np.ndarray:
    from mlx_lfm2.weights.loader import load_model

    model = load_model(folder, compute_dtype=mx.float32, **kw)
    out = [np.array(model(mx.array(row[None])).astype(mx.float32), dtype=np.float64)[0] for row in ids]
    return np.concatenate(out)


def compare(reference: np.ndarray, other: np.ndarray) -> dict:
    lp = reference - np.logaddexp.reduce(reference, axis=-1, keepdims=True)
    lq = other - np.logaddexp.reduce(other, axis=-1, keepdims=True)
    kl = (np.exp(lp) * (lp - lq)).sum(-1)
    return {"kl": float(kl.mean()), "kl_p99": float(np.percentile(kl, 99)),
            "top1": float((reference.argmax(-1) == other.argmax(-1)).mean())}


def bits_per_weight(folder: Path, params: int) -> float:
    return sum(v.nbytes for f in folder.glob("*.safetensors") for v in mx.load(str(f)).values()) * 8 / params


def bench_model(name: str, methods: list[str], ours_only: bool, layers: Optional[int], tokens: int,
                held_out: int) -> list[dict]:
    from mlx_lfm2 import convert
    from mlx_lfm2.text.tokenizer import load_tokenizer

    src = source(name, layers)
    params = sum(v.size for v in mx.load(str(src / "model.safetensors")).values())
    ids = held_out_ids(src, held_out)
    ref = logits(src, ids, dtype=mx.bfloat16)
    home = calibration_home(load_tokenizer(src))
    rows = []
    for method in methods:
        out = OUT / f"{src.name}-{method}"
        if out.exists():
            subprocess.run(["rm", "-rf", str(out)], check=True)
        t = time.perf_counter()
        error = ""
        if method in OURS:
            convert(src, out, quantize=True, progress=False, calibration_tokens=tokens, **OURS[method])
        elif not ours_only:
            error = run_mlx_lm(method, src, out, home)
        else:
            continue
        row = {"model": name, "method": method, "seconds": round(time.perf_counter() - t, 1)}
        if error:
            row["error"] = error
        else:
            row.update(bits_per_weight=round(bits_per_weight(out, params), 3), **compare(ref, logits(out, ids)))
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def summary(rows: list[dict]) -> list[dict]:
    """Per model, each of our rows against the best mlx-lm row at no more bits per weight, and
    at ~4.5 bits per weight against plain 4-bit round-to-nearest."""
    out = []
    for model in sorted({r["model"] for r in rows}):
        ok = [r for r in rows if r["model"] == model and "kl" in r]
        theirs = [r for r in ok if r["method"].startswith("mlx_lm")]
        rtn = next((r for r in ok if r["method"] == "rtn"), None)
        for r in ok:
            if r["method"].startswith("mlx_lm"):
                continue
            peers = [p for p in theirs if p["bits_per_weight"] <= r["bits_per_weight"] + 0.02]
            best = min(peers, key=lambda p: p["kl"], default=None)
            out.append({"model": model, "method": r["method"], "bpw": r["bits_per_weight"], "kl": r["kl"],
                        "best_mlx_lm_at_same_or_more_bpw": best and best["method"],
                        "kl_ratio_to_best_mlx_lm": best and r["kl"] / best["kl"],
                        "kl_ratio_to_rtn": rtn and r["kl"] / rtn["kl"]})
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["narrow", "outliers"], choices=sorted(MODELS))
    p.add_argument("--methods", nargs="+", default=["all"], help=f"'all' or from {[*OURS, *MLX_LM]}")
    p.add_argument("--ours-only", action="store_true")
    p.add_argument("--layers", type=int, help="instead of each model's default")
    p.add_argument("--calibration-tokens", type=int, default=1024, help="for our calibrated methods")
    p.add_argument("--held-out-tokens", type=int, default=512, help="positions the KL is measured on")
    a = p.parse_args()
    methods = [*OURS, *MLX_LM] if a.methods == ["all"] else a.methods
    rows = [r for m in a.models for r in bench_model(m, methods, a.ours_only, a.layers, a.calibration_tokens,
                                                   a.held_out_tokens)]
    print(json.dumps({"bench": "quant_quality", "results": rows, "summary": summary(rows)}))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
