"""Model configuration: one dataclass for every LFM2 checkpoint.

Reads both generations of hub config keys (old: ``full_attn_idxs``, ``block_ff_dim``,
``tie_embedding``, ``rope_theta``, ``block_norm_eps``; new: ``layer_types``,
``intermediate_size``, ``tie_word_embeddings``, ``rope_parameters``, ``norm_eps``) and
mlx-lm's converted folders (same keys plus a ``quantization`` block). Field names are the
Hugging Face ones so a config.json maps onto it without a translation table.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

SUPPORTED_MODEL_TYPES = ("lfm2", "lfm2_moe")


class ConfigError(ValueError):
    """A config.json that does not describe a model we can build."""


@dataclass
class ModelArgs:
    model_type: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    layer_types: list[str]
    intermediate_size: int  # dense SwiGLU width, after any auto-adjust
    norm_eps: float = 1e-5
    rope_theta: float = 1_000_000.0
    conv_bias: bool = False
    conv_L_cache: int = 3
    tie_word_embeddings: bool = True
    max_position_embeddings: int = 128_000
    bos_token_id: Optional[int] = 1
    eos_token_id: Any = 7
    pad_token_id: Optional[int] = 0
    # Mixture of experts (lfm2_moe only); num_dense_layers = num_hidden_layers for lfm2.
    num_dense_layers: int = 0
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    use_expert_bias: bool = False
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    # mlx-lm style quantization block, e.g. {"group_size": 64, "bits": 4, "<path>": {...}}
    quantization: Optional[dict] = None
    extra: dict = field(default_factory=dict, repr=False)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def is_attention(self, i: int) -> bool:
        return self.layer_types[i] == "full_attention"

    def is_moe(self, i: int) -> bool:
        return self.model_type == "lfm2_moe" and i >= self.num_dense_layers

    @classmethod
    def from_dict(cls, cfg: dict) -> "ModelArgs":
        cfg = dict(cfg)
        model_type = cfg.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"unsupported model_type {model_type!r}: mlx_lfm2 runs "
                f"{' and '.join(SUPPORTED_MODEL_TYPES)} checkpoints (LiquidAI LFM2 family)"
            )

        def need(*names):
            for n in names:
                if cfg.get(n) is not None:
                    return _positive(n, cfg[n])
            raise ConfigError(f"config.json has no {' / '.join(names)} (model_type {model_type})")

        n_layers = need("num_hidden_layers")
        hidden = need("hidden_size", "block_dim")
        heads = need("num_attention_heads", "num_heads")
        kv_heads = _positive("num_key_value_heads", cfg.get("num_key_value_heads") or heads)

        layer_types = _layer_types(cfg, n_layers)
        ff = need("intermediate_size", "block_ff_dim")
        if model_type == "lfm2" and cfg.get("block_auto_adjust_ff_dim", True):
            ff = _auto_adjusted_ff(cfg, ff)

        rope = cfg.get("rope_parameters") or {}
        rope_theta = rope.get("rope_theta", cfg.get("rope_theta", 1_000_000.0))
        tie = cfg.get("tie_word_embeddings", cfg.get("tie_embedding", True))
        eps = cfg.get("norm_eps", cfg.get("block_norm_eps", 1e-5))

        args = dict(
            model_type=model_type,
            vocab_size=need("vocab_size"),
            hidden_size=hidden,
            num_hidden_layers=n_layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            layer_types=layer_types,
            intermediate_size=ff,
            norm_eps=float(eps),
            rope_theta=float(rope_theta),
            conv_bias=bool(cfg.get("conv_bias", False)),
            conv_L_cache=_positive("conv_L_cache", cfg.get("conv_L_cache", 3)),
            tie_word_embeddings=bool(tie),
            max_position_embeddings=_positive("max_position_embeddings", cfg.get("max_position_embeddings", 128_000)),
            bos_token_id=cfg.get("bos_token_id", 1),
            eos_token_id=cfg.get("eos_token_id", 7),
            pad_token_id=cfg.get("pad_token_id", 0),
            quantization=cfg.get("quantization"),
        )
        args.update(_moe_fields(cfg, need) if model_type == "lfm2_moe" else dict(num_dense_layers=n_layers))
        if hidden % heads or heads % kv_heads:
            raise ConfigError(
                f"hidden_size {hidden} must divide into {heads} heads, "
                f"and heads into {kv_heads} kv heads"
            )
        known = {f.name for f in dataclasses.fields(cls)}
        args["extra"] = {k: v for k, v in cfg.items() if k not in known}
        return cls(**args)


def _positive(key: str, value, least: int = 1) -> int:
    """A count from config.json: a whole number, at least ``least``, or ConfigError naming ``key``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) or value < least:
        bound = "above 0" if least == 1 else f"{least} or more"
        raise ConfigError(f"config.json: {key!r} must be a whole number {bound}, not {value!r}")
    return int(value)


def _layer_types(cfg: dict, n_layers: int) -> list[str]:
    """``layer_types``, or the old ``full_attn_idxs`` (absent: every layer attends)."""
    layer_types = cfg.get("layer_types")
    if layer_types is not None and not isinstance(layer_types, list):
        raise ConfigError(f"config.json: 'layer_types' must be a list, not {type(layer_types).__name__}")
    if layer_types is None:
        idxs = cfg.get("full_attn_idxs")
        idxs = list(range(n_layers)) if idxs is None else idxs
        if not isinstance(idxs, list):
            raise ConfigError(f"config.json: 'full_attn_idxs' must be a list, not {type(idxs).__name__}")
        layer_types = ["full_attention" if i in idxs else "conv" for i in range(n_layers)]
    layer_types = list(layer_types)
    if len(layer_types) != n_layers or set(layer_types) - {"conv", "full_attention"}:
        raise ConfigError(
            f"layer_types must list 'conv' or 'full_attention' for each of the "
            f"{n_layers} layers, got {layer_types}"
        )
    return layer_types


def _auto_adjusted_ff(cfg: dict, ff: int) -> int:
    """Dense LFM2's FFN width: the same arithmetic as transformers' Lfm2MLP (rounding only
    with a multiplier)."""
    ff = int(2 * ff / 3)
    mult = cfg.get("block_ffn_dim_multiplier", 1.0)
    if mult is not None:
        multiple_of = int(cfg.get("block_multiple_of", 256))
        ff = int(mult * ff)
        ff = multiple_of * ((ff + multiple_of - 1) // multiple_of)
    return ff


def _moe_fields(cfg: dict, need) -> dict:
    """The LFM2-MoE fields (``need(name)``: a required key's value)."""
    moe = dict(
        num_dense_layers=_positive("num_dense_layers", cfg.get("num_dense_layers", 2), least=0),
        num_experts=need("num_experts"),
        num_experts_per_tok=need("num_experts_per_tok"),
        moe_intermediate_size=need("moe_intermediate_size"),
        use_expert_bias=bool(cfg.get("use_expert_bias", True)),
        norm_topk_prob=bool(cfg.get("norm_topk_prob", True)),
        routed_scaling_factor=float(cfg.get("routed_scaling_factor", 1.0)),
    )
    if not 0 < moe["num_experts_per_tok"] <= moe["num_experts"]:
        raise ConfigError("num_experts_per_tok must be between 1 and num_experts")
    return moe
