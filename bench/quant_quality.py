"""Quantization quality: top-1 agreement and KL(full || quantized) of next-token distributions.

On a random checkpoint with the real per-layer shapes of LFM2-24B-A2B (fewer layers, an untied
head), each quantized folder is compared with the unquantized model over the same random tokens.

    python bench/quant_quality.py --layers 4 --tokens 256 --bits 4 8 --recipes uniform mixed_8
"""

import argparse
import json

import mlx.core as mx
import numpy as np

from common import checkpoint, converted


def compare(reference: np.ndarray, other: np.ndarray) -> dict:
    """reference/other: logits [N, V] (float64)."""
    lp = reference - np.logaddexp.reduce(reference, axis=-1, keepdims=True)
    lq = other - np.logaddexp.reduce(other, axis=-1, keepdims=True)
    kl = (np.exp(lp) * (lp - lq)).sum(-1)
    return {"top1_agreement": float((reference.argmax(-1) == other.argmax(-1)).mean()),
            "kl_mean": float(kl.mean()), "kl_p99": float(np.percentile(kl, 99)),
            "reference_entropy": float(-(np.exp(lp) * lp).sum(-1).mean())}


def logits(folder, ids, **kw) -> np.ndarray:
    from mlx_lfm2.weights.loader import load_model

    model = load_model(folder, **kw)
    out = model(mx.array(ids)).astype(mx.float32)
    return np.array(out, dtype=np.float64).reshape(-1, out.shape[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="24b-a2b")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--bits", type=int, nargs="+", default=[4, 8])
    p.add_argument("--recipes", nargs="+", default=["uniform"])
    p.add_argument("--heads", nargs="+", default=["tied", "untied"],
                   help="tied: the real architecture (random weights make it near one-hot on the input "
                        "token); untied: a random head with LM-like entropy, the demanding case")
    a = p.parse_args()
    ids = np.random.default_rng(0).integers(10, 8000, (1, a.tokens))
    rows = []
    for head in a.heads:
        src = checkpoint(a.preset, a.layers, **({"tie_word_embeddings": False} if head == "untied" else {}))
        ref = logits(src, ids, dtype=mx.float32)
        for recipe in a.recipes:
            for bits in a.bits:
                folder = converted(src, bits, recipe=recipe)
                size = sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 1e9
                rows.append({"head": head, "bits": bits, "recipe": recipe, "size_gb": size,
                             **compare(ref, logits(folder, ids))})
    print(json.dumps({"bench": "quant_quality", "preset": a.preset, "layers": a.layers, "tokens": a.tokens,
                      "results": rows}))


if __name__ == "__main__":
    main()
