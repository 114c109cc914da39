"""LoRA / DoRA layers and adapter folders: round trips with mlx-lm, both ways, same logits."""

import json

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten

from conftest import tiny_config
from mlx_lfm2 import load
from mlx_lfm2.model.lora import (LoRASwitchLinear, adapters_off, apply_lora, merge, stacked_delta,
                                 trainable_adapters, lora_delta)
from mlx_lfm2.weights.adapters import AdapterError, adapter_config, save_adapters
from mlx_lfm2.weights.loader import load_model

mlx_lm_utils = pytest.importorskip("mlx_lm.utils")
mlx_lm_tuner = pytest.importorskip("mlx_lm.tuner.utils")

IDS = mx.array(np.random.default_rng(3).integers(0, 1000, (2, 70)))  # 140 tokens: sorted experts too


def randomize_adapters(model, seed=0):
    """Non-zero B (a fresh LoRA is the identity, which would hide a wrong name or layout)."""
    rng = np.random.default_rng(seed)
    model.update(tree_unflatten([(k, mx.array(0.02 * rng.standard_normal(v.shape).astype(np.float32)))
                                 for k, v in tree_flatten(model.trainable_parameters())]))


@pytest.fixture(scope="module")
def folders(checkpoint, tmp_path_factory):
    from mlx_lfm2.weights.conversion import convert

    # mlx-lm's lfm2 needs the old block_* keys too
    dense = checkpoint(tiny_config("tiny-dense", block_dim=64, block_multiple_of=32, block_ffn_dim_multiplier=1.0),
                       tokenizer=True)
    moe = checkpoint(tiny_config("tiny-moe"), tokenizer=True)
    q4 = convert(moe, tmp_path_factory.mktemp("q") / "q4", quantize=True, q_group_size=32, dtype="float32",
                 progress=False)
    return {"dense": dense, "moe": moe, "moe-4bit": q4}


@pytest.mark.parametrize("name,kind", [("dense", "lora"), ("moe", "lora"), ("moe-4bit", "lora"),
                                       ("dense", "dora")])
def test_mlx_lm_loads_our_adapter_with_the_same_logits(folders, tmp_path, name, kind):
    model = load_model(folders[name])
    apply_lora(model, 3, rank=4, scale=10.0, dora=kind == "dora")
    trainable_adapters(model)
    randomize_adapters(model)
    save_adapters(model, tmp_path, adapter_config(model, kind, 3, {"rank": 4, "scale": 10.0}))
    names = mx.load(str(tmp_path / "adapters.safetensors"))
    assert not any("experts" in k for k in names)  # mlx-lm's names, never ours
    theirs, _ = mlx_lm_utils.load_model(folders[name])
    mlx_lm_tuner.load_adapters(theirs, str(tmp_path))
    ours = model(IDS)
    with adapters_off(model):
        base = model(IDS)
    assert float(mx.abs(ours - base).max()) > 1e-2  # the adapter changes the logits
    np.testing.assert_allclose(np.array(ours), np.array(theirs(IDS)), atol=2e-4, rtol=0)


@pytest.mark.parametrize("name,kind", [("dense", "lora"), ("moe", "lora"), ("moe-4bit", "lora"),
                                       ("dense", "dora")])
def test_we_load_mlx_lm_adapter_with_the_same_logits(folders, tmp_path, name, kind):
    theirs, _ = mlx_lm_utils.load_model(folders[name])
    theirs.freeze()
    lora = {"rank": 4, "scale": 5.0, "dropout": 0.0}
    mlx_lm_tuner.linear_to_lora_layers(theirs, 2, lora, use_dora=kind == "dora")
    randomize_adapters(theirs, seed=1)
    mx.save_safetensors(str(tmp_path / "adapters.safetensors"), dict(tree_flatten(theirs.trainable_parameters())))
    (tmp_path / "adapter_config.json").write_text(json.dumps(
        {"fine_tune_type": kind, "num_layers": 2, "lora_parameters": lora}))
    model, _ = load(folders[name], adapter_path=tmp_path)
    np.testing.assert_allclose(np.array(model(IDS)), np.array(theirs(IDS)), atol=2e-4, rtol=0)


def test_expert_rank_and_keys_round_trip(folders, tmp_path):
    model = load_model(folders["moe"])
    keys = ["self_attn.q_proj", "feed_forward.experts.w1", "feed_forward.experts.w2"]
    apply_lora(model, -1, rank=4, keys=keys, expert_rank=2)
    trainable_adapters(model)
    randomize_adapters(model)
    cfg = adapter_config(model, "lora", -1, {"rank": 4, "expert_rank": 2, "keys": keys})
    assert cfg["lora_parameters"]["keys"] == ["feed_forward.switch_mlp.down_proj",
                                              "feed_forward.switch_mlp.gate_proj", "self_attn.q_proj"]
    save_adapters(model, tmp_path, cfg)
    again = load_model(folders["moe"], adapter_path=tmp_path)
    assert again.layers[3].feed_forward.experts.w1.lora_a.shape == (8, 2, 64)
    np.testing.assert_allclose(np.array(again(IDS)), np.array(model(IDS)), atol=1e-5, rtol=0)


def test_merge_equals_the_adapted_model(folders):
    model = load_model(folders["moe"])
    apply_lora(model, 2, rank=4)
    trainable_adapters(model)
    randomize_adapters(model)
    want = model(IDS)
    assert merge(model) > 0 and not any(isinstance(m, LoRASwitchLinear) for _, m in model.named_modules())
    np.testing.assert_allclose(np.array(model(IDS)), np.array(want), atol=1e-4, rtol=0)


def test_stacked_delta_equals_each_adapter_alone():
    """The per-row form a mixed batch will use: row i with adapter rows[i] (0: a zero adapter)."""
    rng = np.random.default_rng(0)
    x = mx.array(rng.standard_normal((4, 5, 16)).astype(np.float32))
    a = mx.array(rng.standard_normal((3, 16, 2)).astype(np.float32)).at[0].multiply(0)
    b = mx.array(rng.standard_normal((3, 2, 8)).astype(np.float32))
    scale, rows = mx.array([1.0, 2.0, 0.5]), mx.array([2, 0, 1, 2])
    got = stacked_delta(x, a, b, scale, rows)
    for i, r in enumerate(rows.tolist()):
        np.testing.assert_allclose(np.array(got[i]), np.array(lora_delta(x[i], a[r], b[r], float(scale[r]))),
                                   atol=1e-5)


@pytest.mark.parametrize("change,message", [
    (lambda d: (d / "adapters.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}"),
     "adapters.safetensors"),
    (lambda d: (d / "adapter_config.json").write_text('{"fine_tune_type": "lora", "num_layers": 2, '
                                                     '"lora_parameters": {"rank": 3, "scale": 1.0}}'),
     "lora_a: shape (64, 4), the model's is (64, 3)"),
    (lambda d: (d / "adapter_config.json").write_text('{"fine_tune_type": "qlora"}'), "fine_tune_type 'qlora'"),
    (lambda d: (d / "adapter_config.json").unlink(), "has no adapter_config.json"),
])
def test_bad_adapter_folders_are_clear_errors(folders, tmp_path, change, message):
    model = load_model(folders["dense"])
    apply_lora(model, 2, rank=4)
    save_adapters(model, tmp_path, adapter_config(model, "lora", 2, {"rank": 4, "scale": 1.0}))
    change(tmp_path)
    with pytest.raises(AdapterError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_model(folders["dense"], adapter_path=tmp_path)


def make_adapter(folder, out, b_scale=0.02, seed=0):
    model = load_model(folder)
    mx.random.seed(seed)
    apply_lora(model, 2, rank=4, scale=1.0)
    trainable_adapters(model)
    rng = np.random.default_rng(seed)
    model.update(tree_unflatten([(k, mx.array(b_scale * rng.standard_normal(v.shape).astype(np.float32)))
                                 if k.endswith("lora_b") else (k, v)
                                 for k, v in tree_flatten(model.trainable_parameters())]))
    save_adapters(model, out, adapter_config(model, "lora", 2, {"rank": 4, "scale": 1.0}))
    return model


def run_fuse(*args):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "mlx_lfm2.fuse", *map(str, args)], capture_output=True, text=True)


def test_fuse_writes_a_folder_mlx_lm_loads_with_the_adapted_logits(folders, tmp_path):
    adapted = make_adapter(folders["moe"], tmp_path / "a", b_scale=0.5)
    r = run_fuse("--model", folders["moe"], "--adapter-path", tmp_path / "a", "--save-path", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    assert "100.0% of the effect kept" in r.stdout
    want = np.array(adapted(IDS))
    np.testing.assert_allclose(np.array(load_model(tmp_path / "out")(IDS)), want, atol=1e-4)
    theirs, _ = mlx_lm_utils.load(str(tmp_path / "out"))
    np.testing.assert_allclose(np.array(theirs(IDS)), want, atol=1e-4)
    card = (tmp_path / "out/README.md").read_text()
    assert str(folders["moe"]) in card and str(tmp_path / "a") in card
    assert run_fuse("--model", folders["moe"], "--adapter-path", tmp_path / "a",
                    "--save-path", tmp_path / "out").returncode == 2  # never overwrites


def test_fuse_refuses_when_requantizing_loses_the_adapter(folders, tmp_path):
    make_adapter(folders["moe-4bit"], tmp_path / "a", b_scale=1e-4)
    r = run_fuse("--model", folders["moe-4bit"], "--adapter-path", tmp_path / "a", "--save-path", tmp_path / "out")
    assert r.returncode == 1 and "loses the adapter" in r.stderr and "fused vs unfused differ by rms" in r.stdout
    assert not (tmp_path / "out").exists()
    r = run_fuse("--model", folders["moe-4bit"], "--adapter-path", tmp_path / "a", "--save-path", tmp_path / "out",
                 "--dequantize")
    assert r.returncode == 0, r.stderr
    assert "quantization" not in json.loads((tmp_path / "out/config.json").read_text())


def test_fuse_refuses_a_base_whose_tokenizer_links_outside_it(folders, tmp_path):
    import shutil

    base = tmp_path / "base"
    shutil.copytree(folders["moe"], base)
    secret = tmp_path / "elsewhere/tokenizer.json"
    secret.parent.mkdir()
    shutil.move(base / "tokenizer.json", secret)
    (base / "tokenizer.json").symlink_to(secret)
    make_adapter(base, tmp_path / "a", b_scale=0.5)
    r = run_fuse("--model", base, "--adapter-path", tmp_path / "a", "--save-path", tmp_path / "out")
    assert r.returncode == 2 and "outside the model folder" in r.stderr and str(secret) in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()


def test_generate_cli_applies_the_adapter(folders, tmp_path):
    import subprocess
    import sys

    from mlx_lfm2 import generate

    make_adapter(folders["moe"], tmp_path / "a", b_scale=2.0)
    model, tok = load(folders["moe"], adapter_path=tmp_path / "a")
    base, _ = load(folders["moe"])
    chat = [{"role": "user", "content": "Hello!"}]  # the CLI applies the chat template
    want = generate(model, tok, chat, max_tokens=8, temperature=0)
    assert want != generate(base, tok, chat, max_tokens=8, temperature=0)
    out = subprocess.run([sys.executable, "-m", "mlx_lfm2.generate", "--model", str(folders["moe"]), "--adapter-path",
                          str(tmp_path / "a"), "-p", "Hello!", "-m", "8", "--temp", "0", "--verbose", "F"],
                         capture_output=True, text=True)
    assert out.stdout == want + "\n", out.stderr


def test_peft_export_runs_in_transformers_peft_and_imports_back(folders, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from mlx_lfm2.weights.peft import save_peft

    model = load_model(folders["dense"])
    apply_lora(model, 2, rank=4, scale=2.0)
    trainable_adapters(model)
    randomize_adapters(model, seed=4)
    save_peft(model, tmp_path / "peft", base_model=str(folders["dense"]))
    ids = np.array(IDS)[:, :30]
    want = np.array(model(mx.array(ids)))
    hf = transformers.AutoModelForCausalLM.from_pretrained(folders["dense"], dtype=torch.float32)
    hf = peft.PeftModel.from_pretrained(hf, str(tmp_path / "peft")).eval()
    with torch.no_grad():
        theirs = hf(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(theirs, want, atol=2e-4, rtol=0)
    again = load_model(folders["dense"], adapter_path=tmp_path / "peft")
    np.testing.assert_allclose(np.array(again(mx.array(ids))), want, atol=1e-5, rtol=0)


def test_server_serves_the_adapted_model(folders, tmp_path):
    openai = pytest.importorskip("openai")
    from conftest import start_server
    from mlx_lfm2 import generate

    make_adapter(folders["moe"], tmp_path / "a", b_scale=2.0)
    model, tok = load(folders["moe"], adapter_path=tmp_path / "a")
    chat = [{"role": "user", "content": "Hello!"}]
    want = generate(model, tok, chat, max_tokens=8, temperature=0)
    proc, base, _ = start_server(folders["moe"], "--adapter-path", str(tmp_path / "a"))
    try:
        client = openai.OpenAI(base_url=base + "/v1", api_key="x")
        got = client.chat.completions.create(model="m", messages=chat, max_tokens=8, temperature=0)
        assert got.choices[0].message.content == want
    finally:
        proc.kill()
        proc.wait()
