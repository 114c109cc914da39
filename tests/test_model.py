"""The MLX model against transformers (PyTorch, fp32) and against itself with caches."""

import json

import mlx.core as mx
import numpy as np
import pytest

from conftest import REFERENCE, tiny_config
from mlx_lfm2.weights.loader import load_model

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def hf_logits(folder, ids):
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(torch.tensor(ids)).logits.numpy()


def old_style_350m(layers=16):
    """The real LFM2-350M config.json (old-style keys), shrunk to a tiny width."""
    cfg = json.loads((REFERENCE / "config.json").read_text())
    cfg.update(block_dim=64, hidden_size=64, conv_dim=64, conv_dim_out=64, block_ff_dim=192,
               num_attention_heads=4, num_heads=4, num_key_value_heads=2, vocab_size=512,
               block_multiple_of=32, block_ffn_dim_multiplier=1.5)
    return cfg


def moe(**kw):
    return tiny_config("tiny-moe", **kw)


CONFIGS = {
    "moe-attention-first-no-dense": moe(num_dense_layers=0, layer_types=["full_attention", "conv", "conv", "full_attention"]),
    "moe-attention-last-2-dense": moe(num_dense_layers=2, layer_types=["conv", "conv", "conv", "full_attention"]),
    "moe-no-bias-no-norm-scaled": moe(use_expert_bias=False, norm_topk_prob=False, routed_scaling_factor=2.5),
    "moe-expert-bias-norm-scaled": moe(routed_scaling_factor=0.7, num_experts_per_tok=3),
    "moe-conv-bias-untied": moe(conv_bias=True, tie_word_embeddings=False),
    "dense-new-keys": tiny_config("tiny-dense"),
    "dense-untied-conv-bias": tiny_config("tiny-dense", conv_bias=True, tie_word_embeddings=False),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_match_transformers(checkpoint, name):
    folder = checkpoint(CONFIGS[name])
    ids = np.random.default_rng(1).integers(0, 128, (2, 13))
    ours = np.array(load_model(folder)(mx.array(ids)))
    ref = hf_logits(folder, ids)
    assert ours.shape == ref.shape == (2, 13, CONFIGS[name]["vocab_size"])
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


def test_old_style_350m_config_matches_transformers(tmp_path):
    if not (REFERENCE / "config.json").exists():
        pytest.skip(f"no reference config at {REFERENCE}")
    from mlx_lfm2.weights.random_checkpoint import write_checkpoint

    cfg = old_style_350m()
    folder = write_checkpoint(tmp_path, cfg, dtype="float32")
    model = load_model(folder)
    # auto-adjust: int(2 * 192 / 3) = 128, * 1.5 = 192, rounded up to a multiple of 32
    assert model.layers[0].feed_forward.w1.weight.shape == (192, 64)
    assert [l.is_attention for l in model.layers] == [i in cfg["full_attn_idxs"] for i in range(16)]
    ids = np.random.default_rng(2).integers(0, 512, (2, 11))
    np.testing.assert_allclose(np.array(model(mx.array(ids))), hf_logits(folder, ids), atol=1e-4, rtol=0)


def test_checkpoint_writer_matches_transformers_layout(tmp_path):
    """Our random writer emits exactly the keys and shapes transformers' save_pretrained does."""
    from safetensors import safe_open

    from mlx_lfm2.weights.random_checkpoint import write_checkpoint

    cfg = moe(conv_bias=True, tie_word_embeddings=False)
    ours = write_checkpoint(tmp_path / "ours", cfg, dtype="float32")
    hf = transformers.AutoModelForCausalLM.from_config(
        transformers.AutoConfig.from_pretrained(ours), dtype=torch.float32)
    hf.save_pretrained(tmp_path / "hf")

    def shapes(folder):
        with safe_open(str(folder / "model.safetensors"), "np") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}

    assert shapes(ours) == shapes(tmp_path / "hf")


@pytest.mark.parametrize("kind", ["tiny-moe", "tiny-dense"])
def test_decode_with_cache_equals_full_forward(checkpoint, kind):
    model = load_model(checkpoint(tiny_config(kind)))
    ids = mx.array(np.random.default_rng(3).integers(0, 1000, (2, 64)))
    full = model(ids)
    cache = model.make_cache()
    steps = mx.concatenate([model(ids[:, t : t + 1], cache=cache) for t in range(64)], axis=1)
    np.testing.assert_allclose(np.array(steps), np.array(full), atol=1e-4, rtol=0)
    assert all(c.offset == 64 for c in cache)


def test_chunked_prefill_equals_full_forward(checkpoint):
    model = load_model(checkpoint(tiny_config("tiny-moe")))
    ids = mx.array(np.random.default_rng(4).integers(0, 1000, (1, 300)))
    cache = model.make_cache()
    parts = [model(ids[:, a:b], cache=cache) for a, b in [(0, 7), (7, 200), (200, 201), (201, 300)]]
    np.testing.assert_allclose(np.array(mx.concatenate(parts, axis=1)), np.array(model(ids)), atol=1e-4, rtol=0)


def test_bfloat16_runs_and_stays_finite(checkpoint):
    model = load_model(checkpoint(tiny_config("tiny-moe"), dtype="bfloat16"))
    assert model.layers[0].feed_forward.w1.weight.dtype == mx.bfloat16
    assert model.layers[1].feed_forward.expert_bias.dtype == mx.float32
    ids = mx.array(np.random.default_rng(5).integers(0, 1000, (2, 40)))
    cache = model.make_cache()
    out = model(ids[:, :20], cache=cache)
    for t in range(20, 40):
        out = model(ids[:, t : t + 1], cache=cache)
    assert out.dtype == mx.bfloat16
    assert bool(mx.all(mx.isfinite(out)))


def test_long_prefill_sorts_tokens_by_expert_and_matches_unsorted(checkpoint):
    """Above the sort threshold the expert path reorders tokens; results must not change."""
    from mlx_lfm2.model import experts

    model = load_model(checkpoint(tiny_config("tiny-moe")))
    ids = mx.array(np.random.default_rng(6).integers(0, 1000, (1, 100)))
    sorted_out = model(ids)
    old = experts.SORT_THRESHOLD
    try:
        experts.SORT_THRESHOLD = 10**9
        unsorted_out = model(ids)
    finally:
        experts.SORT_THRESHOLD = old
    np.testing.assert_allclose(np.array(sorted_out), np.array(unsorted_out), atol=1e-5, rtol=0)


def test_matches_mlx_lm_on_hub_checkpoint(checkpoint):
    mlx_lm_utils = pytest.importorskip("mlx_lm.utils")
    folder = checkpoint(tiny_config("tiny-moe"))
    theirs, _ = mlx_lm_utils.load_model(folder)
    ids = mx.array(np.random.default_rng(7).integers(0, 1000, (2, 20)))
    np.testing.assert_allclose(np.array(load_model(folder)(ids)), np.array(theirs(ids)), atol=1e-4, rtol=0)


def test_the_attention_mask_is_built_once_per_forward_call(checkpoint):
    """The backbone asks one cache for the mask and hands it to every attention layer."""
    from mlx_lfm2.model.cache import KVCache

    model = load_model(checkpoint(tiny_config("tiny-moe", num_hidden_layers=6, layer_types=[
        "conv", "full_attention", "conv", "full_attention", "full_attention", "conv"])))
    cache, asked = model.make_cache(), []
    for c in cache:
        if isinstance(c, KVCache):
            c.make_mask = lambda L, c=c: asked.append(L) or KVCache.make_mask(c, L)
    ids = mx.array([[3, 4, 5, 6]])
    mx.eval(model(ids, cache=cache), model(ids[:, :1], cache=cache))
    assert asked == [4, 1]


def test_the_model_package_imports_nothing_from_the_engine_or_the_batch_caches():
    """model/ sits below engine/: its modules import only each other (the batch caches, which
    only the engine drives, are imported by none of them)."""
    import ast

    from conftest import ROOT

    found = {}
    for f in sorted((ROOT / "mlx_lfm2" / "model").glob("*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level:
                target = "." * node.level + node.module
                if node.level > 1 or target == ".batch_cache":
                    found.setdefault(f.name, []).append(target)
            elif isinstance(node, (ast.Import, ast.ImportFrom)) and "mlx_lfm2" in ast.unparse(node):
                found.setdefault(f.name, []).append(ast.unparse(node))
    assert found == {}


def test_a_block_called_alone_attends_causally_as_in_the_model(checkpoint):
    """Layer-by-layer callers (calibration, sensitivity) call a block without the backbone: its
    default mask must be the causal one the backbone would build."""
    model = load_model(checkpoint(tiny_config("tiny-moe")))
    ids = mx.array([[3, 4, 5, 6, 7]])
    h = model.model.embed(ids)
    for layer in model.layers:
        h = layer(h)
    np.testing.assert_allclose(np.array(model.head(model.model.embedding_norm(h))), np.array(model(ids)), atol=1e-5)


def test_one_process_model_has_the_pipeline_stage_interface_as_identities(checkpoint):
    """A decode loop calls share_prompt / share_token on any model; alone, nothing is shared."""
    from mlx_lfm2.model.pipeline import PipelineModel

    model = load_model(checkpoint(tiny_config("tiny-dense")))
    prompt, y = mx.array([1, 2, 3]), mx.array([4])
    assert model.share_prompt(prompt) is prompt and model.share_token(y, True) == (y, None)
    assert not model.shares_tokens and PipelineModel.shares_tokens
