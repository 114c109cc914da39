"""Random-weight checkpoints in the exact hub layout, of any shape, without torch.

Tests and benchmarks share these: ``tiny-*`` presets run in milliseconds, ``24b-a2b``
has the real per-layer shapes of LFM2-24B-A2B (choose fewer layers with ``--layers``),
``24b-a2b-narrow`` keeps its expert count and top-k at a width the CPU backend can
benchmark in minutes. Tensors are generated and written one at a time into a single
``model.safetensors`` (as the hub ships 24B-A2B), so size is bounded by disk, not RAM.

    python -m mlx_lfm2.random_checkpoint OUT --preset 24b-a2b --layers 8 [--tokenizer DIR]
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path
from typing import Optional

import numpy as np

from ..model.config import ModelArgs
from .loader import TOKENIZER_FILES



def _moe(layers: int, dense: int, attn: list[int], **kw) -> dict:
    cfg = dict(
        model_type="lfm2_moe", architectures=["Lfm2MoeForCausalLM"], vocab_size=65536,
        hidden_size=2048, num_attention_heads=32, num_key_value_heads=8,
        num_hidden_layers=layers, num_dense_layers=dense, num_experts=64, num_experts_per_tok=4,
        intermediate_size=11776, moe_intermediate_size=1536, norm_topk_prob=True,
        use_expert_bias=True, routed_scaling_factor=1.0, norm_eps=1e-5, conv_bias=False,
        conv_L_cache=3, rope_parameters={"rope_theta": 1e6, "rope_type": "default"},
        tie_word_embeddings=True, max_position_embeddings=128000,
        bos_token_id=1, eos_token_id=7, pad_token_id=0,
        layer_types=["full_attention" if i in attn else "conv" for i in range(layers)],
    )
    cfg.update(kw)
    return cfg


def _attn_positions(layers: int, n_attn: int) -> list[int]:
    """Spread attention layers like the real models (never the first layer)."""
    return sorted({round((i + 1) * layers / (n_attn + 1)) for i in range(n_attn)})


PRESETS = {
    "24b-a2b": lambda n=40: _moe(n, 2, _attn_positions(n, max(1, n // 4))),
    "24b-a2b-narrow": lambda n=8: _moe(
        n, 2, _attn_positions(n, max(1, n // 4)), hidden_size=512, num_attention_heads=8,
        num_key_value_heads=2, intermediate_size=1536, moe_intermediate_size=384, vocab_size=8192),
    "8b-a1b": lambda n=24: _moe(
        n, 2, _attn_positions(n, max(1, n // 4)), num_experts=32, intermediate_size=7168,
        moe_intermediate_size=1792),
    "tiny-moe": lambda n=4: _moe(
        n, 1, [1, 3][: max(1, n // 2)], hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=96, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2),
    "tiny-dense": lambda n=4: dict(
        model_type="lfm2", architectures=["Lfm2ForCausalLM"], vocab_size=65536, hidden_size=64,
        num_hidden_layers=n, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
        block_auto_adjust_ff_dim=False, norm_eps=1e-5, conv_bias=False, conv_L_cache=3,
        rope_parameters={"rope_theta": 1e6, "rope_type": "default"}, tie_word_embeddings=True,
        layer_types=["full_attention" if i % 2 else "conv" for i in range(n)],
        bos_token_id=1, eos_token_id=7, pad_token_id=0, max_position_embeddings=128000),
}


def hub_tensors(args: ModelArgs) -> list[tuple[str, tuple]]:
    """(name, shape) of every tensor in a hub checkpoint of this config, in hub order."""
    D, Dh, F = args.hidden_size, args.head_dim, args.intermediate_size
    t = [("model.embed_tokens.weight", (args.vocab_size, D)), ("model.embedding_norm.weight", (D,))]
    for i in range(args.num_hidden_layers):
        p = f"model.layers.{i}."
        t += [(p + "operator_norm.weight", (D,)), (p + "ffn_norm.weight", (D,))]
        if args.is_attention(i):
            a = p + "self_attn."
            t += [(a + "q_proj.weight", (args.num_attention_heads * Dh, D)),
                  (a + "k_proj.weight", (args.num_key_value_heads * Dh, D)),
                  (a + "v_proj.weight", (args.num_key_value_heads * Dh, D)),
                  (a + "out_proj.weight", (D, args.num_attention_heads * Dh)),
                  (a + "q_layernorm.weight", (Dh,)), (a + "k_layernorm.weight", (Dh,))]
        else:
            c = p + "conv."
            t += [(c + "in_proj.weight", (3 * D, D)), (c + "out_proj.weight", (D, D)),
                  (c + "conv.weight", (D, 1, args.conv_L_cache))]
            if args.conv_bias:
                t += [(c + "in_proj.bias", (3 * D,)), (c + "out_proj.bias", (D,)), (c + "conv.bias", (D,))]
        f = p + "feed_forward."
        if args.is_moe(i):
            E, Fe = args.num_experts, args.moe_intermediate_size
            t.append((f + "gate.weight", (E, D)))
            if args.use_expert_bias:
                t.append((f + "expert_bias", (E,)))
            for e in range(E):
                t += [(f"{f}experts.{e}.w1.weight", (Fe, D)), (f"{f}experts.{e}.w2.weight", (D, Fe)),
                      (f"{f}experts.{e}.w3.weight", (Fe, D))]
        else:
            t += [(f + "w1.weight", (F, D)), (f + "w2.weight", (D, F)), (f + "w3.weight", (F, D))]
    if not args.tie_word_embeddings:
        t.append(("lm_head.weight", (args.vocab_size, D)))
    return t


def _random(rng: np.random.Generator, name: str, shape: tuple) -> np.ndarray:
    if name.endswith("expert_bias"):
        return (0.1 * rng.standard_normal(shape, dtype=np.float32)).astype(np.float32)
    if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
        return 1.0 + 0.1 * rng.standard_normal(shape, dtype=np.float32)
    if name.endswith(".bias"):
        return 0.02 * rng.standard_normal(shape, dtype=np.float32)
    if "embed_tokens" in name:
        return rng.standard_normal(shape, dtype=np.float32)
    if name == "lm_head.weight":
        # Logits ~ N(0, 16): next-token entropy of a few nats, like a trained model's. (A tied
        # head instead puts nearly all mass on the input token, which hides quantization error.)
        return 4 * rng.standard_normal(shape, dtype=np.float32) / np.float32(np.sqrt(shape[-1]))
    return rng.standard_normal(shape, dtype=np.float32) / np.float32(np.sqrt(shape[-1]))  # fan-in


OUTLIER_GAIN = 20.0


def _outlier_channels(a: np.ndarray, name: str, n: int) -> np.ndarray:
    """The inputs of every projection get ``n`` outlier channels, the same ones in every layer
    (as the few "massive activation" features of trained LLMs): the block norms' weights there
    are ``OUTLIER_GAIN`` times larger."""
    if n and name.endswith(("operator_norm.weight", "ffn_norm.weight")):
        a = a.copy()
        a[np.linspace(0, a.shape[0] - 1, n).astype(int)] *= OUTLIER_GAIN
    return a


ANISOTROPIC_SHARE = 0.75  # of each embedding's variance, in the shared directions


def _anisotropic(a: np.ndarray, name: str, rank: int, rng: np.random.Generator) -> np.ndarray:
    """Embeddings that share ``rank`` directions (most of their variance in them), as trained
    LLMs' hidden states are anisotropic: every layer's inputs are then correlated, the
    structure GPTQ's error compensation exploits (white inputs leave it nothing)."""
    if not rank or "embed_tokens" not in name:
        return a
    basis = rng.standard_normal((rank, a.shape[-1]), dtype=np.float32)
    shared = rng.standard_normal((a.shape[0], rank), dtype=np.float32) @ basis
    return (np.sqrt(1 - ANISOTROPIC_SHARE) * a + np.sqrt(ANISOTROPIC_SHARE / rank) * shared).astype(np.float32)


def _bf16_bytes(a: np.ndarray) -> bytes:
    u = a.astype(np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16).tobytes()


def write_checkpoint(out: Path, config: dict, seed: int = 0, dtype: str = "bfloat16",
                     tokenizer_from: Optional[Path] = None, outliers: int = 0, lm_like_head: bool = False,
                     anisotropy: int = 0) -> Path:
    """Write ``config.json`` and one ``model.safetensors`` of random weights into ``out``
    (``outliers``: that many outlier activation channels, see ``_outlier_channels``;
    ``lm_like_head``: embeddings small enough (std 4/sqrt(D)) that a tied head gives next-token
    distributions of a few nats, like a trained model's, instead of one-hot on the input token;
    ``anisotropy``: embeddings sharing that many directions, see ``_anisotropic``)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    args = ModelArgs.from_dict(config)
    tensors = hub_tensors(args)
    itemsize = {"bfloat16": 2, "float32": 4}[dtype]
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in tensors:
        # The router bias is a float32 buffer in the real checkpoints too.
        size = 4 if name.endswith("expert_bias") else itemsize
        n = int(np.prod(shape)) * size
        kind = "F32" if size == 4 else "BF16"
        header[name] = {"dtype": kind, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    rng = np.random.default_rng(seed)
    with open(out / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for name, shape in tensors:
            a = _anisotropic(_outlier_channels(_random(rng, name, shape), name, outliers), name, anisotropy, rng)
            if lm_like_head and "embed_tokens" in name:
                a *= np.float32(4 / np.sqrt(shape[-1]))
            f.write(a.tobytes() if header[name]["dtype"] == "F32" else _bf16_bytes(a))
    config = dict(config, torch_dtype=dtype)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    if tokenizer_from is not None:
        for name in TOKENIZER_FILES:
            if (Path(tokenizer_from) / name).exists():
                shutil.copyfile(Path(tokenizer_from) / name, out / name)
    return out


def main(argv=None):
    from ..command import parser

    p = parser("mlx_lfm2.random_checkpoint", "Write a random-weight LFM2 checkpoint in the hub's layout, of any "
               "shape, for trying the commands offline, tests and benchmarks (no download, no torch).\n"
               "tiny-* presets load in milliseconds; 24b-a2b has LFM2-24B-A2B's real layer shapes (choose fewer "
               "--layers); 24b-a2b-narrow keeps its experts and top-k at a width a CPU runs in minutes.")
    p.add_argument("out", type=Path, help="folder to write (created if needed): config.json and model.safetensors, "
                   "plus the tokenizer files with --tokenizer")
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny-moe", help="model shape")
    p.add_argument("--layers", type=int, help="number of layers (default: the preset's)")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16", help="weight dtype")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    p.add_argument("--tokenizer", type=Path, help="copy tokenizer files (and the chat template) from this folder, "
                   "e.g. tests/fixtures/LFM2-350M (default: none)")
    a = p.parse_args(argv)
    cfg = PRESETS[a.preset](a.layers) if a.layers else PRESETS[a.preset]()
    write_checkpoint(a.out, cfg, a.seed, a.dtype, a.tokenizer)
    print(f"wrote {a.out} ({(a.out / 'model.safetensors').stat().st_size / 1e9:.2f} GB)")


if __name__ == "__main__":
    main()
