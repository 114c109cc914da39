"""Quantization modes and the calibrated methods: folders that both loaders read alike, the
per-path precision recorded and reloaded, the streamed KL equal to the whole model's, and
calibration files with bad rows refused with their file and line."""

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import yaml

from conftest import reference_dir, tiny_config
from mlx_lfm2 import convert
from mlx_lfm2.text.tokenizer import load_tokenizer
from mlx_lfm2.weights import conversion
from mlx_lfm2.weights.calibrate import CalibrationError, load_calibration
from mlx_lfm2.weights.loader import load_model

CFG = tiny_config("tiny-moe", hidden_size=128, intermediate_size=256, moe_intermediate_size=64)
IDS = mx.array(np.random.default_rng(0).integers(0, 5000, (2, 24)))
FAST = dict(progress=False, calibration_tokens=128)  # 128 calibration + 64 held-out tokens


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    from mlx_lfm2.weights.random_checkpoint import write_checkpoint

    return write_checkpoint(tmp_path_factory.mktemp("src"), CFG, dtype="float32", tokenizer_from=reference_dir(),
                            lm_like_head=True)


@pytest.fixture(scope="module")
def two_layer_source(tmp_path_factory):
    from mlx_lfm2.weights.random_checkpoint import write_checkpoint

    cfg = tiny_config("tiny-moe", 2, hidden_size=128, intermediate_size=256, moe_intermediate_size=64)
    return write_checkpoint(tmp_path_factory.mktemp("two"), cfg, dtype="float32", tokenizer_from=reference_dir(),
                            lm_like_head=True)


@pytest.fixture(scope="module")
def outlier_source(tmp_path_factory):
    from mlx_lfm2.weights.random_checkpoint import write_checkpoint

    return write_checkpoint(tmp_path_factory.mktemp("outliers"), CFG, dtype="float32",
                            tokenizer_from=reference_dir(), outliers=4, lm_like_head=True)


def logits(model) -> np.ndarray:
    return np.array(model(IDS).astype(mx.float32))


def relative_error(a, b) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def card_quantization(folder) -> dict:
    return yaml.safe_load((folder / "README.md").read_text().split("---")[1])["quantization"]


def mlx_lm_logits(folder) -> np.ndarray:
    from mlx_lm.utils import load_model as mlx_lm_load

    model, _ = mlx_lm_load(folder)
    return np.array(model(IDS).astype(mx.float32))


# The relative logit error each mode stays within on this small random model with a tied head
# of LM-like entropy, where errors compound through the layers (measured, bfloat16 weights:
# 4-bit affine 0.54, mxfp4 0.64, nvfp4 0.59, mxfp8 0.23; float32 ones do better): bounds that catch a broken or
# mislabelled mode (an 8-bit mode above 0.3), not tight ones.
BOUNDS = {"affine": 0.7, "mxfp4": 0.8, "nvfp4": 0.75, "mxfp8": 0.3}


@pytest.mark.parametrize("mode", list(BOUNDS))
def test_each_mode_round_trips_and_mlx_lm_reads_it_alike(source, tmp_path, mode):
    out = convert(source, tmp_path / mode, quantize=True, q_mode=mode, dtype="float32", progress=False)
    q = json.loads((out / "config.json").read_text())["quantization"]
    assert q["mode"] == mode and (q["bits"], q["group_size"]) == {"affine": (4, 64), "mxfp4": (4, 32),
                                                                  "nvfp4": (4, 16), "mxfp8": (8, 32)}[mode]
    assert q["model.layers.1.feed_forward.gate"] == {"group_size": 64, "bits": 8}  # the router: 8-bit affine
    ours = load_model(out)
    experts = ours.layers[1].feed_forward.experts.w1
    assert (experts.mode, experts.bits) == (mode, q["bits"])
    full = logits(load_model(source, compute_dtype=mx.float32))
    got = logits(ours)
    assert relative_error(got, full) < BOUNDS[mode]
    np.testing.assert_allclose(mlx_lm_logits(out), got, rtol=1e-3, atol=1e-3)


@pytest.mark.slow
def test_mixed_precision_is_recorded_per_path_and_reloaded_by_both_loaders(two_layer_source, tmp_path):
    source = two_layer_source
    out = convert(source, tmp_path / "dyn", quantize=True, target_bpw=6.0, q_method="awq", dtype="float32", **FAST)
    q = json.loads((out / "config.json").read_text())["quantization"]
    per_path = {k: v for k, v in q.items() if isinstance(v, dict)}
    assert all(v["bits"] >= 8 for k, v in per_path.items() if k.endswith("feed_forward.gate"))
    model = load_model(out)
    from mlx_lfm2.weights.layouts import from_mlx_lm_name

    modules = dict(model.named_modules())
    assert len({m.bits for m in modules.values() if "scales" in m}) >= 2, per_path  # a real mix
    for path, choice in per_path.items():
        m = modules[from_mlx_lm_name(path)]
        assert (m.bits, m.group_size, m.mode) == (choice["bits"], choice["group_size"], choice.get("mode", "affine"))
    card = card_quantization(out)
    assert card["method"] == "dynamic-awq" and card["bits_per_weight"] <= 6.0
    assert card["per_path"] == len(per_path)
    np.testing.assert_allclose(mlx_lm_logits(out), logits(model), rtol=1e-3, atol=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["awq", "gptq"])
def test_the_card_kl_is_the_whole_model_kl_on_held_out_text(source, tmp_path, method):
    """The KL measured while streaming (one layer at a time) equals the KL of the loaded
    quantized model against the unquantized one on the same held-out tokens (with GPTQ, the
    tied table's GPTQ rows are the ones both its lookups and its head use)."""
    out = convert(source, tmp_path / method, quantize=True, q_method=method, **FAST)
    card = card_quantization(out)
    assert (" rows: relative error " in card.get("head_gptq", "")) == (method == "gptq")
    held = load_calibration(load_tokenizer(source), CFG["vocab_size"], tokens=128, held_out_tokens=64).held_out
    full = load_model(source, dtype=mx.bfloat16, compute_dtype=mx.float32)
    quant = load_model(out)
    lp = [nn.log_softmax(m(mx.array(held)).astype(mx.float32), axis=-1) for m in (full, quant)]
    kl = float((mx.exp(lp[0]) * (lp[0] - lp[1])).sum(-1).mean().item())
    agree = float((lp[0].argmax(-1) == lp[1].argmax(-1)).astype(mx.float32).mean().item())
    assert card["held_out_tokens"] == held.size
    assert card["kl"] == pytest.approx(kl, rel=0.02)
    assert card["top1_agreement"] == pytest.approx(agree, abs=0.01)


@pytest.mark.slow
def test_awq_beats_round_to_nearest_on_outlier_activations(outlier_source, tmp_path):
    rtn = card_quantization(convert(outlier_source, tmp_path / "rtn", quantize=True, measure=True, **FAST))
    awq = card_quantization(convert(outlier_source, tmp_path / "awq", quantize=True, q_method="awq", **FAST))
    assert rtn["bits_per_weight"] == awq["bits_per_weight"]
    assert awq["kl"] < 0.7 * rtn["kl"], (awq["kl"], rtn["kl"])


def test_a_target_below_what_the_mode_allows_is_refused(source, tmp_path):
    with pytest.raises(ValueError, match="--target-bpw 2.5 is below the .* bits per weight this model needs"):
        convert(source, tmp_path / "low", quantize=True, target_bpw=2.5, **FAST)
    assert not list(tmp_path.iterdir())


BAD_ROWS = [
    ('{"text": "fine"}\n{"text": "fine"}\nnot json\n', ":3: not valid JSON"),
    ('{"text": "fine"}\n\n{"prompt": "x"}\n', ':3: expected a JSON object with "text"'),
    ('{"text": ""}\n', ':1: "text" must be a non-empty string'),
    ('[1, 2]\n', ":1: expected a JSON object"),
    ('{"messages": [{"role": "user"}]}\n', ":1: messages[0] must be an object with string"),
    ('{"text": "only a few words"}\n', "too little text"),
]


@pytest.mark.parametrize("content,message", BAD_ROWS)
def test_a_calibration_file_with_bad_rows_is_a_clear_error(source, tmp_path, content, message):
    bad = tmp_path / "calib.jsonl"
    bad.write_text(content)
    with pytest.raises(CalibrationError, match=message.replace("[", r"\[").replace("]", r"\]")) as e:
        convert(source, tmp_path / "out", quantize=True, q_method="awq", calibration=bad, **FAST)
    assert str(bad) in str(e.value) and not (tmp_path / "out").exists()


def test_calibration_rows_are_read_only_as_far_as_needed(source, tmp_path):
    rows = "".join(json.dumps({"text": f"Sentence number {i} of a long calibration file."}) + "\n" for i in range(400))
    f = tmp_path / "calib.jsonl"
    f.write_bytes(rows.encode() + b"\xff\xfe broken tail\n")  # never reached
    got = load_calibration(load_tokenizer(source), CFG["vocab_size"], f, tokens=64, held_out_tokens=32, seq_len=32)
    assert got.calibration.shape == (2, 32) and got.held_out.shape == (1, 32)
    f.write_bytes(b'{"text": "x"}\n\xff\xfe\n')
    with pytest.raises(CalibrationError, match=":2: not UTF-8 text"):
        load_calibration(load_tokenizer(source), CFG["vocab_size"], f)


def test_cli_takes_the_mode_and_method(source, tmp_path, capsys):
    conversion.main(["--hf-path", str(source), "--mlx-path", str(tmp_path / "cli"), "-q", "--q-mode", "nvfp4",
                     "--q-method", "awq", "--calibration-tokens", "128"])
    assert json.loads((tmp_path / "cli/config.json").read_text())["quantization"]["mode"] == "nvfp4"
    assert card_quantization(tmp_path / "cli")["method"] == "awq"
    with pytest.raises(SystemExit, match="nvfp4 quantization takes group size 16, not 64"):
        conversion.main(["--hf-path", str(source), "--mlx-path", str(tmp_path / "x"), "-q", "--q-mode", "nvfp4",
                         "--q-group-size", "64"])


def test_the_bit_budget_takes_4_bit_groups_of_128_only_where_the_width_allows():
    from mlx_lfm2.weights import sensitivity
    from mlx_lfm2.weights.quantize import bits_per_weight

    options = sensitivity.candidates("affine", 64)
    costs = [bits_per_weight(o) for o in options]
    assert costs == sorted(costs) and {"group_size": 128, "bits": 4, "mode": "affine"} in options
    errs = [1 / c for c in costs]  # finer is better
    wide = options.index({"group_size": 128, "bits": 4, "mode": "affine"})
    narrow = [e if i != wide else float("inf") for i, e in enumerate(errs)]
    budget = 1000 * 4.3  # 4.25 bits per weight fit, 4.5 would not
    assert sensitivity.allocate({"wide": (1000, errs)}, options, budget)["wide"] == options[wide]
    plan = sensitivity.allocate({"narrow": (1000, narrow)}, options, budget)  # its width takes no group of 128
    assert plan["narrow"] == {"group_size": 64, "bits": 3, "mode": "affine"}


def test_the_sensitivity_pass_scales_one_measured_error_per_path_to_every_precision(source):
    """measure_block's errors (one forward per path at 4 bits, scaled by the weight errors)
    against one forward per path and precision, on a dense layer of random weights: within
    25% for the conv and FFN paths; and the FFN paths are measured from the cached operator."""
    from mlx.utils import tree_flatten

    from mlx_lfm2.model.blocks import Block
    from mlx_lfm2.model.config import ModelArgs
    from mlx_lfm2.weights import sensitivity
    from mlx_lfm2.weights.quantize import fake_quantize

    args = ModelArgs.from_dict(CFG)
    block = Block(args, 0)  # conv, dense FFN
    rng = np.random.default_rng(2)
    block.update(tree_map_random(block, rng))
    x = mx.array(correlated_inputs(rng, 512, args.hidden_size).reshape(2, 256, -1))
    options = sensitivity.candidates("affine", 64)
    quantized = lambda p, m: hasattr(m, "to_quantized") and m.weight.shape[-1] % 64 == 0  # noqa: E731
    got = sensitivity.measure_block(block, x, "", options, quantized)
    assert set(got) == {"conv.in_proj", "conv.out_proj", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3"}
    y = block(x)
    leaves = dict(tree_flatten(block.leaf_modules(), is_leaf=nn.Module.is_module))
    for path, (n, errs) in got.items():
        m, w0 = leaves[path], leaves[path].weight
        assert n == w0.size
        for c, e in zip(options, errs):
            m.weight = fake_quantize(w0, c)
            exact = float((((block(x) - y) ** 2).mean() / (y ** 2).mean()).item())
            assert e == pytest.approx(exact, rel=0.25), (path, c, e, exact)
        m.weight = w0


def correlated_inputs(rng, n: int, d: int) -> np.ndarray:
    """Activations with the correlations of a trained model's (a few strong directions), where
    GPTQ's error compensation has something to exploit; white inputs leave it nothing."""
    basis = np.random.default_rng(7).standard_normal((8, d)).astype(np.float32)  # the same directions in every call
    return (rng.standard_normal((n, 8)).astype(np.float32) * 3) @ basis + rng.standard_normal((n, d)).astype(np.float32)


def test_gptq_compensates_rounding_error_and_packs_as_mlx_does():
    """On correlated inputs GPTQ's output error is well below round-to-nearest's (it fails if
    GPTQ degenerates to RTN), and its weights are an ordinary MLX affine triple."""
    from mlx_lfm2.weights import gptq
    from mlx_lfm2.weights.quantize import fake_quantize

    rng = np.random.default_rng(0)
    W = (rng.standard_normal((2, 64, 128)) / np.sqrt(128)).astype(np.float32)  # two experts
    Xa, Xb, X = (correlated_inputs(rng, 512, 128) for _ in range(3))  # two halves, and other text
    white = [rng.standard_normal((512, 128)).astype(np.float32) for _ in range(2)]
    halves = [(np.stack([x.T @ x, w.T @ w]), np.array([512.0, 512.0])) for x, w in zip((Xa, Xb), white)]
    choice = {"group_size": 64, "bits": 4, "mode": "affine"}
    w, s, b, kept = gptq.quantize_weight(mx.array(W), halves, choice, mx.float32)
    assert (w.dtype, w.shape, s.shape) == (mx.uint32, (2, 64, 16), (2, 64, 2))
    Q = np.array(mx.dequantize(w, s, b, group_size=64, bits=4))
    R = np.array(fake_quantize(mx.array(W), choice))
    err = lambda M: np.linalg.norm((W[0] - M[0]) @ X.T) / np.linalg.norm(W[0] @ X.T)  # noqa: E731
    assert err(Q) < 0.5 * err(R), (err(Q), err(R))  # on text it was not fitted on
    # the expert with white inputs has nothing to gain: it keeps plain rounding
    assert kept.tolist() == [True, False] and np.array_equal(Q[1], R[1])


def test_the_heads_gptq_is_kept_per_row_only_where_it_beats_rounding_on_held_out_tokens():
    """GPTQ of a head on correlated final hidden states: well below rounding's logit error on
    text it was not fitted on; for a tied table whose lookups weigh heavily (the lookup use
    is plain rounding's best case), rows that GPTQ would worsen keep rounding bit for bit, and
    the mix is never worse than rounding on the held-out half."""
    from mlx_lfm2.weights import gptq
    from mlx_lfm2.weights.quantize import fake_quantize

    rng = np.random.default_rng(3)
    W = mx.array((rng.standard_normal((512, 128)) / np.sqrt(128)).astype(np.float32))  # V=512 rows
    X = correlated_inputs(rng, 1024, 128)
    halves = gptq.head_halves(mx.array(X))
    (Ha, na), (Hb, nb) = halves
    assert na[0] == nb[0] == 512 and np.allclose(Ha[0] + Hb[0], X.T @ X, rtol=1e-4, atol=1e-2)
    choice = {"group_size": 64, "bits": 4, "mode": "affine"}
    other = correlated_inputs(rng, 512, 128)
    H_other = (other.T @ other)[None]
    R = fake_quantize(W, choice)
    (w, s, b), rows, (e_rtn, e_mix) = gptq.quantize_head(W, halves, choice, mx.float32)
    Q = mx.dequantize(w, s, b, group_size=64, bits=4)
    assert rows > 500 and e_mix < 0.6 * e_rtn
    assert gptq.head_error(W, Q, H_other) < 0.6 * gptq.head_error(W, R, H_other)
    for lookup in (1.0, 30.0):
        (w, s, b), rows, (e_rtn, e_mix) = gptq.quantize_head(W, halves, choice, mx.float32, lookup=lookup)
        Q = mx.dequantize(w, s, b, group_size=64, bits=4)
        same = mx.all(Q == R, axis=-1)
        assert 0 < rows < 512 and int((~same).sum().item()) == rows, rows  # the rest: rounding, bit-equal
        assert e_mix < e_rtn
        assert gptq.head_error(W, Q, H_other, lookup) < gptq.head_error(W, R, H_other, lookup)


def test_gptq_per_expert_hessians_lower_a_moe_blocks_error(source):
    """quantize_block + install on a real MoE block: every expert and projection gets GPTQ
    weights, and the block's output error on the calibration input is below RTN's."""
    from mlx_lfm2.model.blocks import Block
    from mlx_lfm2.model.config import ModelArgs
    from mlx_lfm2.weights import gptq
    from mlx_lfm2.weights.quantize import recipe_predicate, spec

    args = ModelArgs.from_dict(CFG)
    block = Block(args, 2)  # a conv layer with experts
    mx.random.seed(0)
    rng = np.random.default_rng(1)
    block.update(tree_map_random(block, rng))
    x = mx.array(correlated_inputs(rng, 512, args.hidden_size).reshape(2, 256, -1))
    y = block(x)
    predicate = recipe_predicate(spec(4, 64), "uniform")
    results, (kept, total) = gptq.quantize_block(block, x, predicate)
    assert total == 2 + 3 * CFG["num_experts"] and kept > total // 2  # conv in/out, each expert's w1/w3/w2
    assert {"feed_forward.experts.w1", "feed_forward.experts.w2", "feed_forward.experts.w3",
            "conv.in_proj", "conv.out_proj"} <= set(results)
    assert "feed_forward.gate" not in results  # the router stays 8-bit round-to-nearest

    def quantized(with_gptq: bool):
        b = Block(args, 2)
        b.update(block.parameters())
        nn.quantize(b, 64, 4, class_predicate=lambda p, m: predicate(p, m))
        if with_gptq:
            gptq.install(b, results)
        return float((((b(x) - y) ** 2).sum() / (y ** 2).sum()).item())

    assert quantized(True) < 0.9 * quantized(False)


def tree_map_random(block, rng):
    from mlx.utils import tree_flatten, tree_unflatten

    return tree_unflatten([(k, mx.array(rng.standard_normal(v.shape).astype(np.float32) / np.sqrt(v.shape[-1]))
                            if v.ndim >= 2 else v) for k, v in tree_flatten(block.parameters())])


def test_gptq_folders_round_trip_and_mlx_lm_reads_them_alike(source, tmp_path, method="awq-gptq"):
    out = convert(source, tmp_path / method, quantize=True, q_method=method, dtype="float32", **FAST)
    card = card_quantization(out)
    assert card["method"] == method and card["kl"] > 0 and " of " in card["gptq_kept"]
    assert card["head_gptq"].split(" of ")[1].startswith(f"{CFG['vocab_size']} rows")
    ours = load_model(out)
    full = logits(load_model(source, compute_dtype=mx.float32))
    got = logits(ours)
    assert relative_error(got, full) < BOUNDS["affine"]
    np.testing.assert_allclose(mlx_lm_logits(out), got, rtol=1e-3, atol=1e-3)
    rtn = load_model(convert(source, tmp_path / "rtn", quantize=True, dtype="float32", progress=False))
    a, b = ours.layers[1].feed_forward.experts.w2, rtn.layers[1].feed_forward.experts.w2
    assert (a.bits, a.group_size) == (b.bits, b.group_size) and not mx.array_equal(a.weight, b.weight)


def test_gptq_refuses_the_float_modes(source, tmp_path):
    with pytest.raises(ValueError, match="--q-method gptq quantizes affine grids: use --q-mode affine"):
        convert(source, tmp_path / "x", quantize=True, q_mode="mxfp4", q_method="gptq", **FAST)
    assert not list(tmp_path.iterdir())
