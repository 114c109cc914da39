"""Converted folders every loader opens: old+new config keys, a hub model card, --upload-repo."""

import dataclasses
import json

import mlx.core as mx
import numpy as np
import pytest

from conftest import REFERENCE, tiny_config
from mlx_lfm2 import convert
from mlx_lfm2.model.config import ModelArgs
from mlx_lfm2.weights import conversion
from mlx_lfm2.weights.loader import load_model
from mlx_lfm2.weights.publish import compatible_config

IDS = np.random.default_rng(0).integers(0, 1000, (1, 20))


def mlx_logits(model):
    return np.array(model(mx.array(IDS)).astype(mx.float32))


@pytest.mark.slow
def test_a_transformers_5_dense_checkpoint_converts_into_a_folder_mlx_lm_loads(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    mlx_lm_utils = pytest.importorskip("mlx_lm.utils")
    cfg = transformers.Lfm2Config(vocab_size=1024, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                                  num_key_value_heads=2, intermediate_size=96,
                                  layer_types=["conv", "full_attention", "conv", "full_attention"])
    torch.manual_seed(0)
    hf = transformers.Lfm2ForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path / "hf")
    saved = json.loads((tmp_path / "hf/config.json").read_text())
    assert "block_dim" not in saved and "block_ff_dim" not in saved and saved["layer_types"]
    with pytest.raises(TypeError, match="block_dim"):  # what mlx-lm says to the source folder as is
        mlx_lm_utils.load_model(tmp_path / "hf")

    out = convert(tmp_path / "hf", tmp_path / "mlx", dtype="float32", progress=False)
    written = json.loads((out / "config.json").read_text())
    assert written["block_dim"] == 64 and written["block_ff_dim"] == 96 and written["full_attn_idxs"] == [1, 3]
    assert written["intermediate_size"] == 96 and written["layer_types"] == saved["layer_types"]
    with torch.no_grad():
        reference = hf(torch.tensor(IDS)).logits.numpy()
    theirs, _ = mlx_lm_utils.load_model(out)
    np.testing.assert_allclose(mlx_logits(theirs), reference, atol=2e-4, rtol=0)
    np.testing.assert_allclose(mlx_logits(load_model(out)), reference, atol=2e-4, rtol=0)
    # and transformers still reads the folder's config as the same model
    again = transformers.Lfm2Config.from_pretrained(out)
    assert again.intermediate_size == 96 and again.layer_types == saved["layer_types"]


def test_old_and_new_config_keys_describe_the_same_model_to_every_reader():
    lfm2 = pytest.importorskip("mlx_lm.models.lfm2")
    old = json.loads((REFERENCE / "config.json").read_text()) if (REFERENCE / "config.json").exists() else None
    new = tiny_config("tiny-dense")  # new-style keys only, as transformers 5 writes them
    new.pop("block_auto_adjust_ff_dim")
    for cfg in filter(None, [old, new]):
        both = compatible_config(cfg)
        same = lambda a: dataclasses.replace(a, extra={})  # noqa: E731 (extra: the keys as written)
        assert same(ModelArgs.from_dict(both)) == same(ModelArgs.from_dict(cfg))
        theirs = lfm2.ModelArgs.from_dict(both)
        ours = ModelArgs.from_dict(both)
        assert theirs.full_attn_idxs == [i for i in range(ours.num_hidden_layers) if ours.is_attention(i)]
        assert theirs.block_dim == ours.hidden_size and theirs.rope_theta == ours.rope_theta
        assert both["intermediate_size"] == both["block_ff_dim"] and compatible_config(both) == both
    moe = tiny_config("tiny-moe")
    assert "block_dim" not in compatible_config(moe)  # lfm2_moe never had block_* keys


@pytest.fixture
def hub_source(checkpoint, monkeypatch):
    """A repo id that resolves to a local random checkpoint (no network)."""
    folder = checkpoint(tiny_config("tiny-moe", hidden_size=128, moe_intermediate_size=64), tokenizer=True)
    monkeypatch.setattr(conversion, "resolve", lambda path, revision=None, flag="--model": folder)
    return "LiquidAI/LFM2-Tiny-Test"


def params(hub_source) -> int:
    folder = conversion.resolve(hub_source)
    return sum(w.size for f in folder.glob("*.safetensors") for w in mx.load(str(f)).values())


def card(folder):
    from huggingface_hub import ModelCard

    return ModelCard.load(folder / "README.md")


def test_the_folder_carries_a_hub_model_card(hub_source, tmp_path):
    out = convert(hub_source, tmp_path / "q4", quantize=True, quant_recipe="mixed_8", progress=False)
    c = card(out)
    meta = c.data.to_dict()
    assert meta["library_name"] == "mlx" and "mlx" in meta["tags"] and meta["pipeline_tag"] == "text-generation"
    assert meta["base_model"] == hub_source
    q = meta["quantization"]
    bpw = q.pop("bits_per_weight")
    per_path = json.loads((out / "config.json").read_text())["quantization"]
    assert q == {"bits": 4, "group_size": 64, "mode": "affine", "recipe": "mixed_8", "method": "rtn",
                 "per_path": sum(isinstance(v, dict) for v in per_path.values())}
    stored = sum(f.stat().st_size for f in out.glob("*.safetensors"))  # weights + headers
    assert 4.5 < bpw < stored * 8 / params(hub_source)
    cmd = f"python convert.py --hf-path {hub_source} --mlx-path {out} -q --q-mode affine --q-bits 4 --q-group-size 64"
    assert meta["conversion_command"].startswith(cmd) and cmd in c.text
    assert "experts at 4 bits, the rest at 8" in c.text and c.text.lstrip().startswith("# q4\n")
    # a local source is no hub repo: no base_model, and the folder says what it is
    local = card(convert(conversion.resolve(hub_source), tmp_path / "bf16", progress=False))
    assert "base_model" not in local.data.to_dict() and "unquantized bfloat16 weights" in local.text


class StubHub:
    calls = []
    fail = False

    def create_repo(self, **kw):
        StubHub.calls.append(("create_repo", kw))
        if StubHub.fail:
            raise RuntimeError("401 Unauthorized")
        return f"https://huggingface.co/{kw['repo_id']}"

    def upload_folder(self, **kw):
        from pathlib import Path

        StubHub.calls.append(("upload_folder", {**kw, "files": sorted(p.name for p in Path(kw["folder_path"]).iterdir())}))


def test_convert_cli_uploads_through_huggingface_hub(hub_source, tmp_path, monkeypatch, capsys):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", StubHub)
    StubHub.calls = []
    out = tmp_path / "up"
    conversion.main(["--hf-path", hub_source, "--mlx-path", str(out), "-q", "--upload-repo", "me/tiny-4bit"])
    (create, kw1), (upload, kw2) = StubHub.calls
    assert create == "create_repo" and kw1["repo_id"] == "me/tiny-4bit" and kw1["exist_ok"] and not kw1["private"]
    assert upload == "upload_folder" and kw2["repo_id"] == "me/tiny-4bit" and kw2["folder_path"] == str(out)
    assert {"README.md", "config.json", "model.safetensors", "tokenizer.json"} <= set(kw2["files"])
    c = card(out)
    assert 'load("me/tiny-4bit")' in c.text and c.data.base_model == hub_source
    assert c.data.to_dict()["conversion_command"] == (
        f"python convert.py --hf-path {hub_source} --mlx-path {out} -q --upload-repo me/tiny-4bit")
    assert "uploaded to https://huggingface.co/me/tiny-4bit" in capsys.readouterr().out

    StubHub.fail, StubHub.calls = True, []
    try:
        with pytest.raises(SystemExit, match="upload to me/tiny-4bit failed .*401.* the folder is complete"):
            conversion.main(["--hf-path", hub_source, "--mlx-path", str(tmp_path / "up2"), "--upload-repo",
                             "me/tiny-4bit"])
    finally:
        StubHub.fail = False
    assert (tmp_path / "up2" / "README.md").exists()


def test_upload_refuses_a_folder_with_a_link_outside_it(tmp_path, monkeypatch):
    import huggingface_hub
    from mlx_lfm2.weights.publish import upload_to_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", StubHub)
    StubHub.calls = []
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (tmp_path / "token").write_text("hf_secret")
    (folder / "notes.txt").symlink_to(tmp_path / "token")
    with pytest.raises(ValueError, match="not uploading .*notes.txt is a symlink to a file outside it"):
        upload_to_hub(folder, "me/tiny")
    assert StubHub.calls == []
