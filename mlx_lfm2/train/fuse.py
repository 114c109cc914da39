"""``python -m mlx_lfm2.fuse``: merge an adapter into its base and write a model folder.

    python -m mlx_lfm2.fuse --model BASE --adapter-path ADAPTER --save-path OUT [--dequantize]

Each adapted layer becomes base + delta; a quantized base is quantized again with the
layer's own bits and group size (``--dequantize``: the whole model in float instead).
Re-quantizing can erase a small delta (mlx-lm #1172), so the merge is measured before
anything is written: logits on a probe, fused against unfused, next to how far the adapter
moves them from the base. When the fused model keeps less than ``--min-kept`` of that
movement the command refuses, prints the numbers and writes nothing.

The output folder is mlx-lm's layout (config.json with its quantization block, mlx-lm's
parameter names, tokenizer files, a README.md naming the base and the adapter): mlx-lm and
LM Studio load it.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from ..model.experts import SwitchLinear
from ..model.lora import adapter_layers, adapters_off, merge
from ..weights.layouts import to_mlx_lm_name
from ..command import parser
from ..weights.loader import TOKENIZER_FILES, links_outside, load, resolve
from ..weights.publish import compatible_config

PROBE = ("<|im_start|>user\nSummarise the report and call the right tool.<|im_end|>\n"
         "<|im_start|>assistant\nThe report says revenue grew 12% while costs fell.")


def probe_logits(model, ids: mx.array) -> mx.array:
    out = model(ids).astype(mx.float32)
    mx.eval(out)
    return out


def rms(x: mx.array) -> float:
    return float(mx.sqrt(mx.mean(x * x)))


def requantize(model, quantized: dict) -> None:
    """Quantize the merged layers again, each with its base layer's settings."""
    if quantized:
        nn.quantize(model, class_predicate=lambda p, m: quantized.get(p, False))


def dequantize_all(model) -> None:
    """Every quantized layer (merged or not) as a float layer."""
    from ..model.lora import dequantized

    swaps = []
    for path, m in model.named_modules():
        if "scales" not in m:
            continue
        w = dequantized(m)
        if w.ndim == 3:
            new = SwitchLinear(w.shape[2], w.shape[1], w.shape[0])
        elif hasattr(m, "as_linear"):
            new = nn.Embedding(w.shape[0], w.shape[1])
        else:
            new = nn.Linear(w.shape[1], w.shape[0], bias="bias" in m)
            if "bias" in m:
                new.bias = m["bias"]
        new.weight = w
        swaps.append((path, new))
    if swaps:
        model.update_modules(tree_unflatten(swaps))


def fuse(model, ids: mx.array, dequantize: bool) -> dict:
    """Merge in place; returns the probe's numbers."""
    with adapters_off(model):
        base = probe_logits(model, ids)
    unfused = probe_logits(model, ids)
    quantized = {p: {"group_size": m.linear.group_size, "bits": m.linear.bits, "mode": m.linear.mode}
                 for p, m in adapter_layers(model) if "scales" in m.linear}
    merge(model)
    if dequantize:
        dequantize_all(model)
    else:
        requantize(model, quantized)
    fused = probe_logits(model, ids)
    effect, error = rms(unfused - base), rms(fused - unfused)
    return {"effect": effect, "error": error, "kept": 1 - error / effect if effect > 0 else 1.0,
            "requantized": 0 if dequantize else len(quantized)}


def write_folder(model, base: Path, adapter: Path, out: Path, dequantize: bool, numbers: dict) -> None:
    """The fused model as an mlx-lm folder, written beside ``out`` and renamed into place."""
    config = json.loads((base / "config.json").read_text())
    config = {k: v for k, v in compatible_config(config).items() if k not in ("quantization_config",)}
    if dequantize:
        config.pop("quantization", None)
    elif config.get("quantization"):
        config["quantization_config"] = config["quantization"]
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    tmp.mkdir(parents=True)
    try:
        weights = {to_mlx_lm_name(k, model.model_type): v for k, v in tree_flatten(model.parameters())}
        mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata={"format": "mlx"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        for name in TOKENIZER_FILES:
            if (base / name).exists():
                shutil.copyfile(base / name, tmp / name)
        (tmp / "README.md").write_text(card(base, adapter, dequantize, numbers, config))
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def card(base: Path, adapter: Path, dequantize: bool, n: dict, config: dict) -> str:
    adapter_cfg = json.loads((adapter / "adapter_config.json").read_text())
    q = config.get("quantization")
    weights = "float (dequantized)" if dequantize or not q else f"{q['bits']}-bit, group size {q['group_size']}"
    return (f"---\nlibrary_name: mlx\npipeline_tag: text-generation\ntags: [mlx, {config['model_type']}, "
            f"liquid, mlx_lfm2, lora]\n---\n# {base.name} + {adapter.name} (fused)\n\n"
            f"- base model: `{base}`\n- adapter: `{adapter}` ({adapter_cfg.get('fine_tune_type', 'lora')}, "
            f"rank {adapter_cfg.get('lora_parameters', {}).get('rank')}, last "
            f"{adapter_cfg.get('num_layers')} layers)\n- weights: {weights}\n"
            f"- probe: the adapter moves logits by rms {n['effect']:.4g}; fused vs unfused differ by rms "
            f"{n['error']:.4g} ({100 * n['kept']:.1f}% of the adapter's effect kept)\n\n"
            f"Made with `python -m mlx_lfm2.fuse`. Loads with `mlx_lfm2.load`, `mlx_lm.load` and LM Studio.\n")


def main(argv=None) -> int:
    p = parser("mlx_lfm2.fuse", __doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="the base model folder or hub repo the adapter was trained on")
    p.add_argument("--adapter-path", default="adapters", help="adapter folder (mlx-lm's layout or PEFT's)")
    p.add_argument("--save-path", default="fused_model", help="output folder (must not exist)")
    p.add_argument("--dequantize", action="store_true", help="write float weights (no re-quantization)")
    p.add_argument("--min-kept", type=float, default=0.5,
                   help="refuse when the fused model keeps less than this share of the adapter's effect")
    a = p.parse_args(argv)
    out = Path(a.save_path).expanduser().resolve()
    if out.exists():
        print(f"error: {out} exists; choose a new --save-path (nothing is overwritten)", file=sys.stderr)
        return 2
    base = resolve(a.model)
    outside = links_outside(base, [base / n for n in TOKENIZER_FILES])
    if outside:  # the tokenizer files are copied into the output: never from outside the base
        print(f"error: {outside[0]} resolves to {outside[0].resolve()}, outside the model folder {base}; "
              "copy the file into the folder to fuse it (nothing written)", file=sys.stderr)
        return 2
    model, tokenizer = load(base, adapter_path=a.adapter_path, fuse=False)
    ids = mx.array([tokenizer.encode(PROBE)])
    numbers = fuse(model, ids, a.dequantize)
    print(f"probe ({ids.shape[1]} tokens): the adapter moves logits by rms {numbers['effect']:.4g}; "
          f"fused vs unfused differ by rms {numbers['error']:.4g} ({100 * numbers['kept']:.1f}% of the effect "
          f"kept; {numbers['requantized']} layers re-quantized)")
    if numbers["kept"] < a.min_kept:
        print(f"error: re-quantizing the merged layers loses the adapter (keeps {100 * numbers['kept']:.1f}% < "
              f"{100 * a.min_kept:.0f}%); nothing written. Use --dequantize for float weights, or train with a "
              "larger learning rate / scale", file=sys.stderr)
        return 1
    write_folder(model, base, Path(a.adapter_path), out, a.dequantize, numbers)
    print(f"wrote {out}")
    return 0
