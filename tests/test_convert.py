"""convert(): mlx-lm-compatible folders, quantized inference, atomic and safe writes."""

import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from conftest import tiny_config
from mlx_lfm2 import convert, load
from mlx_lfm2.weights.conversion import ConversionError, ShardWriter
from mlx_lfm2.model.experts import QuantizedSwitchLinear
from mlx_lfm2.weights.loader import load_model

# Widths that group sizes divide, so every matrix (experts included) is quantized.
QCFG = tiny_config("tiny-moe", hidden_size=128, intermediate_size=256, moe_intermediate_size=64)
IDS = mx.array(np.random.default_rng(0).integers(0, 5000, (2, 24)))


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    from mlx_lfm2.weights.random_checkpoint import write_checkpoint
    from conftest import reference_dir

    return write_checkpoint(tmp_path_factory.mktemp("src"), QCFG, dtype="float32", tokenizer_from=reference_dir())


def logits(model):
    return np.array(model(IDS).astype(mx.float32))


def leftovers(parent):
    return [p.name for p in parent.iterdir() if ".partial-" in p.name or ".old-" in p.name]


def test_quantized_folder_loads_in_mlx_lm_with_equal_logits(source, tmp_path):
    mlx_lm_utils = pytest.importorskip("mlx_lm.utils")
    out = convert(source, tmp_path / "q4", quantize=True, dtype="float32", progress=False)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization"]["bits"] == 4 and cfg["quantization"]["group_size"] == 64
    assert cfg["quantization"]["model.layers.1.feed_forward.gate"] == {"group_size": 64, "bits": 8}
    assert cfg["quantization_config"] == cfg["quantization"]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert "model.layers.1.feed_forward.switch_mlp.gate_proj.scales" in index["weight_map"]
    assert "model.layers.0.feed_forward.gate_proj.weight" in index["weight_map"]
    assert index["weight_map"]["model.layers.1.feed_forward.expert_bias"]
    assert (out / "tokenizer.json").exists() and (out / "chat_template.jinja").exists()

    ours, tok = load(out)
    experts = ours.layers[1].feed_forward.experts
    assert isinstance(experts.w1, QuantizedSwitchLinear) and experts.w1.bits == 4
    assert ours.layers[1].feed_forward.gate.bits == 8
    assert ours.layers[1].feed_forward.expert_bias.dtype == mx.float32
    theirs, _ = mlx_lm_utils.load_model(out)
    np.testing.assert_allclose(logits(ours), logits(theirs), atol=1e-4, rtol=0)
    # and it is close to, but not the same as, the unquantized model
    full = logits(load_model(source))
    assert 0 < np.abs(logits(ours) - full).mean() < 0.5 * np.abs(full).mean()


def test_mlx_lm_converted_folder_loads_in_mlx_lfm2(source, tmp_path):
    mlx_lm_utils = pytest.importorskip("mlx_lm.utils")
    from mlx_lm.convert import convert as mlx_lm_convert

    out = tmp_path / "mlxlm-q4"
    mlx_lm_convert(str(source), str(out), quantize=True, dtype="float32")
    theirs, _ = mlx_lm_utils.load_model(out)
    ours, _ = load(out)
    assert isinstance(ours.layers[2].feed_forward.experts.w2, QuantizedSwitchLinear)
    np.testing.assert_allclose(logits(ours), logits(theirs), atol=1e-4, rtol=0)


def test_unquantized_bf16_conversion_matches_loading_the_hub_folder(source, tmp_path):
    out = convert(source, tmp_path / "bf16", progress=False, max_shard_gb=0.0005)
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1
    assert not (out / "model.safetensors").exists()
    np.testing.assert_array_equal(logits(load_model(out)), logits(load_model(source, dtype=mx.bfloat16)))


def test_mixed_recipe_keeps_the_dense_path_at_higher_bits(source, tmp_path):
    out = convert(source, tmp_path / "mixed", quantize=True, q_bits=3, quant_recipe="mixed_8",
                  dtype="float32", progress=False)
    model, _ = load(out)
    assert model.layers[1].feed_forward.experts.w1.bits == 3
    assert model.layers[2].conv.in_proj.bits == 8 and model.layers[1].self_attn.q_proj.bits == 8 and model.model.embed_tokens.bits == 8


def test_existing_target_is_refused_unless_forced(source, tmp_path):
    target = tmp_path / "out"
    convert(source, target, progress=False)
    (target / "config.json").write_text((target / "config.json").read_text() + " ")  # mark the old one
    with pytest.raises(FileExistsError, match="--force"):
        convert(source, target, progress=False)
    assert (target / "config.json").read_text().endswith(" ")
    convert(source, target, force=True, progress=False)  # a converted model folder: replaced
    assert not (target / "config.json").read_text().endswith(" ")
    assert leftovers(tmp_path) == []


def _user_folder(path):
    path.mkdir(parents=True)
    (path / "thesis.tex").write_text("four years of work")
    return path


def test_force_replaces_only_a_converted_model_folder(source, tmp_path, monkeypatch):
    """--force pointed at anything else is refused with the reason; every file stays."""
    from mlx_lfm2.weights.conversion import main

    source = shutil.copytree(source, tmp_path / "checkpoints" / "src")
    work = _user_folder(tmp_path / "work")
    monkeypatch.chdir(work)
    looks_like_a_model = _user_folder(tmp_path / "almost")
    shutil.copy(source / "config.json", looks_like_a_model)
    (looks_like_a_model / "model.safetensors").write_bytes(b"")
    home = _user_folder(tmp_path / "home")
    monkeypatch.setenv("HOME", str(home))
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    cases = [(".", "current folder"), (str(source), "source checkpoint"),
             (str(source.parent), "contains the source checkpoint"), (str(looks_like_a_model), "thesis.tex"),
             (str(work / ".." / "work"), "current folder"), (str(home), "home folder"), ("/", "contains"),
             (str(work / "thesis.tex"), "not a folder")]
    for target, reason in cases:
        with pytest.raises(ConversionError, match=reason):
            convert(source, target, force=True, progress=False)
    with pytest.raises(SystemExit, match="error: refusing to replace .*current folder"):
        main(["--hf-path", str(source), "--mlx-path", ".", "--force"])
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    assert leftovers(tmp_path) == [] and leftovers(source.parent) == []


def test_leftovers_of_a_killed_run_are_cleaned_by_the_next(source, tmp_path):
    import os
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    for name in (f".out.partial-{dead}", f".out.old-{dead}", f".out.partial-{os.getppid()}", f".other.partial-{dead}"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"x")
    (tmp_path / "out").mkdir()  # the killed run's new folder had landed: the .old is garbage
    shutil.copy(source / "config.json", tmp_path / "out")
    (tmp_path / "out" / "model.safetensors").write_bytes(b"")
    convert(source, tmp_path / "out", force=True, progress=False)
    # the dead run's folders are gone; a running process's and another target's are not ours to touch
    assert sorted(leftovers(tmp_path)) == [f".other.partial-{dead}", f".out.partial-{os.getppid()}"]


def test_an_old_target_stranded_by_a_kill_is_put_back(source, tmp_path):
    dead = 2 ** 22 + 12345  # above the default pid_max: no such process
    first = convert(source, tmp_path / "first", progress=False)
    os_rename = __import__("os").rename
    os_rename(first, tmp_path / f".out.old-{dead}")  # killed between the two renames
    with pytest.raises(FileExistsError):  # the old folder is back in place, so this needs --force
        convert(source, tmp_path / "out", progress=False)
    assert (tmp_path / "out" / "config.json").exists() and leftovers(tmp_path) == []


def test_interrupted_conversion_leaves_nothing(source, tmp_path, monkeypatch):
    real_add, calls = ShardWriter.add, {"n": 0}

    def add_then_die(self, tensors):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        real_add(self, tensors)

    monkeypatch.setattr(ShardWriter, "add", add_then_die)
    with pytest.raises(KeyboardInterrupt):
        convert(source, tmp_path / "out", quantize=True, progress=False)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_bad_inputs_stop_with_clear_errors_and_no_output(source, tmp_path):
    from mlx_lfm2.model.config import ConfigError
    from mlx_lfm2.weights.layouts import WeightsError

    bad = tmp_path / "bad"
    shutil.copytree(source, bad)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) - 1000])
    with pytest.raises(WeightsError, match="truncated"):
        convert(bad, tmp_path / "o1", progress=False)

    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps(dict(cfg, model_type="qwen3_moe")))
    with pytest.raises(ConfigError, match="unsupported model_type 'qwen3_moe'"):
        convert(bad, tmp_path / "o2", progress=False)

    shutil.copyfile(source / "config.json", bad / "config.json")
    (bad / "model.safetensors").unlink()
    (bad / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "model-00001-of-00002.safetensors"}}))
    with pytest.raises(WeightsError, match="missing"):
        convert(bad, tmp_path / "o3", progress=False)

    with pytest.raises(ValueError, match="affine quantization takes bits 2/3/4/5/6/8, not 7"):
        convert(source, tmp_path / "o4", quantize=True, q_bits=7, progress=False)
    with pytest.raises(ValueError, match="mxfp4 quantization takes group size 32, not 64"):
        convert(source, tmp_path / "o4", quantize=True, q_mode="mxfp4", q_group_size=64, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad"]


def test_already_quantized_source_is_refused(source, tmp_path):
    q = convert(source, tmp_path / "q", quantize=True, progress=False)
    with pytest.raises(ConversionError, match="already quantized"):
        convert(q, tmp_path / "qq", quantize=True, progress=False)


def test_cli_converts_and_reports_errors(source, tmp_path, capsys):
    from mlx_lfm2.weights.conversion import main

    main(["--hf-path", str(source), "--mlx-path", str(tmp_path / "cli"), "-q", "--q-bits", "8"])
    assert json.loads((tmp_path / "cli/config.json").read_text())["quantization"]["bits"] == 8
    with pytest.raises(SystemExit, match="exists"):
        main(["--hf-path", str(source), "--mlx-path", str(tmp_path / "cli")])


def test_cpu_stream_split_matches_single_stream(source, tmp_path, monkeypatch):
    """Quantized matmuls shared across CPU streams give the single-op result."""
    from mlx_lfm2.model import device as parallel

    if len(parallel.cpu_streams()) < 2:
        monkeypatch.setattr(parallel, "_streams", [mx.default_stream(mx.cpu), mx.new_stream(mx.cpu)])
    from mlx_lfm2.model.layers import SplitQuantizedEmbedding, SplitQuantizedLinear

    model, _ = load(convert(source, tmp_path / "q", quantize=True, progress=False))
    assert model.compute_dtype == mx.float32  # quantized on the CPU: float32 activations
    assert isinstance(model.layers[0].op.out_proj, SplitQuantizedLinear)  # swapped in by layers.specialize
    assert isinstance(model.model.embed_tokens, SplitQuantizedEmbedding)
    ids = mx.array(np.random.default_rng(1).integers(0, 5000, (1, 40)))  # sorted (prefill) expert path
    monkeypatch.setattr(parallel, "MIN_WEIGHTS", 1 << 62)
    single = [np.array(model(ids)), np.array(model(ids[:, :1]))]
    monkeypatch.setattr(parallel, "MIN_WEIGHTS", 0)
    split = [np.array(model(ids)), np.array(model(ids[:, :1]))]
    for a, b in zip(single, split):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=0)


def test_compute_dtype_defaults(source, tmp_path):
    assert load_model(source).compute_dtype is None
    q = convert(source, tmp_path / "q", quantize=True, progress=False)
    assert load_model(q).compute_dtype == mx.float32
    model = load_model(q, compute_dtype=None)
    assert model(IDS).dtype == mx.bfloat16


def test_quantization_error_orders_by_bits_and_8_bit_stays_close(tmp_path):
    """Quality on the real expert count and top-k at a narrow width (see bench/quant_quality.py).

    Random weights have no robust structure: 8-bit's ~0.5% weight error becomes ~3% of the
    logit spread, so top-1 flips at near-ties (agreement ~0.9 at an entropy of ~3 nats, the
    same for mlx-lm's identical quantizer). The bounds below catch a broken quantization path."""
    from mlx_lfm2.weights.random_checkpoint import PRESETS, write_checkpoint

    def compare(reference, other) -> dict:  # KL(reference || other), top-1 agreement, entropy
        lp = reference - np.logaddexp.reduce(reference, axis=-1, keepdims=True)
        lq = other - np.logaddexp.reduce(other, axis=-1, keepdims=True)
        return {"kl_mean": float((np.exp(lp) * (lp - lq)).sum(-1).mean()),
                "top1_agreement": float((reference.argmax(-1) == other.argmax(-1)).mean()),
                "reference_entropy": float(-(np.exp(lp) * lp).sum(-1).mean())}

    cfg = dict(PRESETS["24b-a2b-narrow"](4), tie_word_embeddings=False)  # LM-like entropy
    src = write_checkpoint(tmp_path / "src", cfg, dtype="bfloat16")
    ids = mx.array(np.random.default_rng(2).integers(10, 8000, (1, 128)))
    ref = np.array(load_model(src, dtype=mx.float32)(ids), dtype=np.float64)[0]
    got = {}
    for bits in (8, 4):
        q = convert(src, tmp_path / f"q{bits}", quantize=True, q_bits=bits, progress=False)
        got[bits] = compare(ref, np.array(load_model(q)(ids), dtype=np.float64)[0])
    assert 1.0 < got[8]["reference_entropy"] < 8.0  # a spread distribution, not one-hot
    assert got[8]["top1_agreement"] >= 0.85 and got[8]["kl_mean"] < 0.05
    assert got[4]["top1_agreement"] < got[8]["top1_agreement"]
    assert got[8]["kl_mean"] * 10 < got[4]["kl_mean"] < 2.0


def test_an_interrupted_conversion_resumes_where_it_stopped(source, tmp_path, monkeypatch):
    from mlx_lfm2.weights import conversion

    dead = 2 ** 22 + 4321  # above the default pid_max: no such process
    whole = convert(source, tmp_path / "whole", quantize=True, progress=False, max_shard_gb=1e-9)
    real, calls = conversion._convert_group, []

    def interrupted(module, prefix, *a, **kw):
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C (or a kill) in the third layer group
        calls.append(prefix)
        return real(module, prefix, *a, **kw)

    monkeypatch.setattr(conversion, "_convert_group", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert(source, tmp_path / "out", quantize=True, progress=False, max_shard_gb=1e-9)
    (partial,) = [p for p in tmp_path.iterdir() if ".partial-" in p.name]
    partial.rename(tmp_path / f".out.partial-{dead}")  # as a killed process leaves it
    monkeypatch.setattr(conversion, "_convert_group", real)
    # Different options: nothing to resume from, the stale folder is removed.
    convert(source, tmp_path / "other", quantize=True, q_bits=8, progress=False, max_shard_gb=1e-9)
    assert (tmp_path / f".out.partial-{dead}").exists()  # another target's: untouched

    resumed = []
    monkeypatch.setattr(conversion, "_convert_group",
                        lambda module, prefix, *a, **kw: resumed.append(prefix) or real(module, prefix, *a, **kw))
    out = convert(source, tmp_path / "out", quantize=True, progress=False, max_shard_gb=1e-9)
    assert not set(resumed) & set(calls) and len(resumed) + len(calls) == len(conversion._groups(
        [k for f in source.glob("*.safetensors") for k in mx.load(str(f))], QCFG["num_hidden_layers"]))
    assert leftovers(tmp_path) == [] and not (out / "progress.json").exists()
    assert json.loads((out / "config.json").read_text()) == json.loads((whole / "config.json").read_text())
    assert (json.loads((out / "model.safetensors.index.json").read_text())
            == json.loads((whole / "model.safetensors.index.json").read_text()))
    np.testing.assert_array_equal(logits(load_model(out)), logits(load_model(whole)))


def test_a_partial_folder_from_other_options_is_not_resumed(source, tmp_path, monkeypatch):
    from mlx_lfm2.weights import conversion

    dead = 2 ** 22 + 4322
    stale = tmp_path / f".out.partial-{dead}"
    stale.mkdir()
    (stale / "progress.json").write_text(json.dumps(dict(options={"q_bits": 3}, done=["model.layers.0."],
                                                         overrides={}, shards=[], total=0)))
    convert(source, tmp_path / "out", quantize=True, progress=False)
    assert leftovers(tmp_path) == []
    np.testing.assert_array_equal(
        logits(load_model(tmp_path / "out")),
        logits(load_model(convert(source, tmp_path / "ref", quantize=True, progress=False))))


def test_a_source_linking_outside_itself_is_refused_and_nothing_is_copied(source, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("not for the hub")
    linked = tmp_path / "linked"
    shutil.copytree(source, linked)
    (linked / "chat_template.jinja").unlink()
    (linked / "chat_template.jinja").symlink_to(secret)
    with pytest.raises(ConversionError, match="chat_template.jinja resolves to .*secret.txt, outside the source"):
        convert(linked, tmp_path / "out", progress=False)
    (linked / "chat_template.jinja").unlink()
    shutil.copyfile(source / "chat_template.jinja", linked / "chat_template.jinja")
    (linked / "model.safetensors").rename(tmp_path / "weights.safetensors")
    (linked / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "../weights.safetensors"}}))
    with pytest.raises(ConversionError, match="weights.safetensors, outside the source"):
        convert(linked, tmp_path / "out", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["linked", "secret.txt", "weights.safetensors"]


def test_a_hub_snapshot_linking_into_its_blobs_converts(source, tmp_path):
    repo = tmp_path / "models--me--tiny"
    snap, blobs = repo / "snapshots" / "abc", repo / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    for f in source.iterdir():
        shutil.copyfile(f, blobs / f.name)
        (snap / f.name).symlink_to(Path("../../blobs") / f.name)
    out = convert(snap, tmp_path / "out", progress=False)
    assert (out / "tokenizer.json").read_bytes() == (source / "tokenizer.json").read_bytes()
