"""Tiny models for training tests: the real LFM2 template, pre-tokenizer and special tokens,
but a byte-level vocabulary of 270 ids, so a 512-row head keeps each step in milliseconds
(the real 65,536-row head dominates a tiny model's cost)."""

import json
from pathlib import Path

from conftest import reference_dir, tiny_config
from mlx_lfm2.weights.random_checkpoint import write_checkpoint

SPECIALS = 14  # <|pad|> ... <|tool_response_end|>, the ids the template and the tools use


def byte_level_tokenizer(out: Path) -> None:
    real = json.loads((reference_dir() / "tokenizer.json").read_text())
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = sorted(ByteLevel.alphabet())
    real["added_tokens"] = real["added_tokens"][:SPECIALS]
    real["model"]["vocab"] = {**{t["content"]: t["id"] for t in real["added_tokens"]},
                              **{c: SPECIALS + i for i, c in enumerate(alphabet)}}
    real["model"]["merges"] = []
    (out / "tokenizer.json").write_text(json.dumps(real))
    template = (reference_dir() / "chat_template.jinja").read_text()
    (out / "chat_template.jinja").write_text(template)
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|startoftext|>", "eos_token": "<|im_end|>",
        "pad_token": "<|pad|>", "add_bos_token": True, "chat_template": template}))


def small_model(out: Path, kind: str = "tiny-moe", **overrides) -> Path:
    """A random ``kind`` checkpoint (float32) with the byte-level tokenizer, vocab 512."""
    extra = dict(block_dim=64, block_multiple_of=32, block_ffn_dim_multiplier=1.0) if kind == "tiny-dense" else {}
    write_checkpoint(out, tiny_config(kind, vocab_size=512, **extra, **overrides), dtype="float32")
    byte_level_tokenizer(out)
    return out
