"""load(): folders, shards, hub ids and every way a checkpoint can be wrong."""

import json
import shutil
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest

from conftest import tiny_config
from mlx_lfm2 import load
from mlx_lfm2.model.config import ConfigError
from mlx_lfm2.weights.loader import load_model, resolve
from mlx_lfm2.weights.layouts import WeightsError


@pytest.fixture
def folder(checkpoint, tmp_path):
    src = checkpoint(tiny_config("tiny-moe"), tokenizer=True)
    dst = tmp_path / "model"
    shutil.copytree(src, dst)
    return dst


def rewrite(folder, change):
    weights = mx.load(str(folder / "model.safetensors"))
    change(weights)
    mx.save_safetensors(str(folder / "model.safetensors"), weights)


def test_load_returns_model_and_tokenizer(folder):
    model, tok = load(folder)
    assert model(mx.array([[1, 2, 3]])).shape == (1, 3, 65536)
    assert tok.encode("hi")[0] == tok.bos_token_id == 1


def test_sharded_checkpoint_with_index_loads_the_same(folder, tmp_path):
    weights = mx.load(str(folder / "model.safetensors"))
    names = sorted(weights)
    half = len(names) // 2
    sharded = tmp_path / "sharded"
    shutil.copytree(folder, sharded)
    (sharded / "model.safetensors").unlink()
    wmap = {}
    for i, part in enumerate([names[:half], names[half:]]):
        fname = f"model-{i + 1:05d}-of-00002.safetensors"
        mx.save_safetensors(str(sharded / fname), {k: weights[k] for k in part})
        wmap.update({k: fname for k in part})
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wmap}))
    ids = mx.array([[5, 6, 7, 8]])
    np.testing.assert_array_equal(np.array(load_model(sharded)(ids)), np.array(load_model(folder)(ids)))
    (sharded / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(WeightsError, match="model-00002-of-00002.safetensors.*missing"):
        load_model(sharded)


def test_unknown_model_type_is_a_clear_error(folder):
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(cfg, model_type="llama")))
    with pytest.raises(ConfigError, match="unsupported model_type 'llama'"):
        load(folder)


def test_missing_weight_names_the_key(folder):
    rewrite(folder, lambda w: w.pop("model.layers.1.self_attn.k_layernorm.weight"))
    with pytest.raises(WeightsError, match=r"model\.layers\.1\.self_attn\.k_layernorm\.weight"):
        load_model(folder)


def test_missing_expert_names_the_layer(folder):
    rewrite(folder, lambda w: w.pop("model.layers.2.feed_forward.experts.5.w2.weight"))
    with pytest.raises(WeightsError, match=r"model\.layers\.2\.feed_forward\.experts: experts \[5\] of w2"):
        load_model(folder)


def test_misshaped_weight_names_key_and_shapes(folder):
    rewrite(folder, lambda w: w.__setitem__("model.layers.0.conv.out_proj.weight", mx.zeros((64, 32))))
    with pytest.raises(WeightsError, match=r"conv\.out_proj\.weight has shape \(64, 32\).*\(64, 64\)"):
        load_model(folder)


def test_unexpected_weight_is_an_error(folder):
    rewrite(folder, lambda w: w.__setitem__("model.layers.0.surprise.weight", mx.zeros((2,))))
    with pytest.raises(WeightsError, match="surprise"):
        load_model(folder)


def test_truncated_safetensors_is_a_clear_error(folder):
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="corrupt or truncated"):
        load_model(folder)


def test_missing_config_and_missing_folder(folder, tmp_path):
    (folder / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load(folder)
    with pytest.raises(FileNotFoundError, match="neither a model folder nor a hub repo id"):
        load(tmp_path / "does" / "not" / "exist")


def test_hub_repo_ids_go_through_huggingface_hub(monkeypatch, folder):
    import huggingface_hub

    seen = {}

    def fake_snapshot_download(repo_id, revision=None, allow_patterns=None):
        seen.update(repo_id=repo_id, allow_patterns=allow_patterns)
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    assert resolve("LiquidAI/LFM2-24B-A2B") == folder
    assert seen["repo_id"] == "LiquidAI/LFM2-24B-A2B"
    assert "*.safetensors" in seen["allow_patterns"] and "*.bin" not in seen["allow_patterns"]

    def offline(*a, **k):
        raise OSError("no network")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(FileNotFoundError, match=r"could not get LiquidAI/Nope from the Hugging Face hub: the hub "
                                                r"cannot be reached \(OSError: no network\)\..*--model FOLDER"):
        resolve("LiquidAI/Nope")


def test_import_does_not_pull_torch_or_transformers():
    code = ("import sys, mlx_lfm2; from mlx_lfm2 import load, generate, stream_generate, "
            "parse_tool_calls, convert; import mlx_lfm2.cli.chat, mlx_lfm2.serve.app; "
            "bad = {'torch', 'transformers', 'mlx_lm'} & set(sys.modules); "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
