"""Resident adapters chosen per batch row (model/lora_rows.py): each row computes what the
model with only its adapter computes (``load(path, adapter_path=A)``), base rows the base."""

import mlx.core as mx
import numpy as np
import pytest

from adapter_helpers import make_adapter
from conftest import tiny_config
from mlx_lfm2.model.lora_rows import select
from mlx_lfm2.weights.adapters import AdapterError, add_resident
from mlx_lfm2.weights.loader import load_model

ATOL = 2e-4


@pytest.fixture(scope="module")
def setup(checkpoint, tmp_path_factory):
    base = checkpoint(tiny_config("tiny-moe"))
    root = tmp_path_factory.mktemp("adapters")
    specs = {"a": dict(seed=1), "b": dict(seed=2, rank=8, num_layers=-1),
             "attn": dict(seed=3, keys=["self_attn.q_proj", "self_attn.v_proj"], num_layers=-1),
             "experts": dict(seed=4, rank=2, keys=["feed_forward.experts.w1",
                                                   "feed_forward.experts.w2"], num_layers=-1)}
    folders = {n: make_adapter(base, root / n, **kw) for n, kw in specs.items()}
    model = load_model(base, adapters=folders)
    alone = {n: load_model(base, adapter_path=f) for n, f in folders.items()}
    return base, folders, model, alone, load_model(base)


def run(model, ids, names):
    select(model, names)
    return model(ids)


IDS = mx.array(np.random.default_rng(0).integers(0, 1000, (1, 40)))  # 40 tokens x K experts: sorted


@pytest.mark.parametrize("name", ["a", "b", "attn", "experts"])
def test_one_adapter_equals_the_model_with_only_it(setup, name):
    _, _, model, alone, base = setup
    got = run(model, IDS, [name])
    np.testing.assert_allclose(np.array(got), np.array(alone[name](IDS)), atol=ATOL, rtol=0)
    assert float(mx.abs(got - base(IDS)).max()) > 1e-2  # the adapter changes the logits


def test_base_rows_are_the_base_exactly(setup):
    _, _, model, _, base = setup
    assert mx.array_equal(run(model, IDS, [None]), base(IDS))


def test_mixed_rows_each_equal_their_adapter_alone(setup):
    """Five rows, four adapters and the base, in one forward (decode-like and prompt-like)."""
    _, _, model, alone, base = setup
    names = ["b", None, "a", "experts", "attn"]
    for length in (1, 24):  # 24 tokens x 5 rows: the experts' sorted path
        ids = mx.array(np.random.default_rng(length).integers(0, 1000, (len(names), length)))
        got = run(model, ids, names)
        for i, n in enumerate(names):
            want = (alone[n] if n else base)(ids[i:i + 1])
            np.testing.assert_allclose(np.array(got[i:i + 1]), np.array(want), atol=ATOL, rtol=0)


def test_add_and_remove_keep_the_others(setup, tmp_path):
    base_folder, folders, model, alone, _ = setup
    ids = mx.array(np.random.default_rng(5).integers(0, 1000, (2, 3)))
    before = run(model, ids, ["a", "b"])
    add_resident(model.adapter_set, "late", make_adapter(base_folder, tmp_path / "late", seed=9, rank=16))
    assert model.adapter_set.loaded == ["a", "b", "attn", "experts", "late"]
    np.testing.assert_allclose(np.array(run(model, ids, ["a", "b"])), np.array(before), atol=1e-5, rtol=0)
    late = load_model(base_folder, adapter_path=tmp_path / "late")
    np.testing.assert_allclose(np.array(run(model, ids, ["late", "late"])), np.array(late(ids)), atol=ATOL, rtol=0)
    model.adapter_set.remove("late")
    np.testing.assert_allclose(np.array(run(model, ids, ["a", "b"])), np.array(before), atol=1e-5, rtol=0)
    with pytest.raises(KeyError, match="'late' is not loaded"):
        select(model, ["late"])


def test_dora_and_bad_shapes_are_refused(setup, checkpoint, tmp_path):
    base_folder, folders, model, _, _ = setup
    other = make_adapter(checkpoint(tiny_config("tiny-dense")), tmp_path / "dense")
    with pytest.raises(AdapterError, match="does not fit this model"):
        add_resident(model.adapter_set, "wrong", other)
    cfg = (folders["a"] / "adapter_config.json").read_text().replace('"lora"', '"dora"', 1)
    (tmp_path / "dora").mkdir()
    (tmp_path / "dora" / "adapter_config.json").write_text(cfg)
    (tmp_path / "dora" / "adapters.safetensors").write_bytes((folders["a"] / "adapters.safetensors").read_bytes())
    with pytest.raises(AdapterError, match="a dora adapter cannot share the base"):
        add_resident(model.adapter_set, "dora", tmp_path / "dora")
    assert model.adapter_set.loaded == ["a", "b", "attn", "experts"]


def test_a_quantized_base_takes_resident_adapters_too(checkpoint, tmp_path):
    from mlx_lfm2.weights.conversion import convert

    q4 = convert(checkpoint(tiny_config("tiny-moe")), tmp_path / "q4", quantize=True, q_group_size=32,
                 dtype="float32", progress=False)
    folders = {n: make_adapter(q4, tmp_path / n, seed=s, rank=r) for n, s, r in [("p", 5, 4), ("q", 6, 8)]}
    model = load_model(q4, adapters=folders)
    alone = {n: load_model(q4, adapter_path=f) for n, f in folders.items()}
    names = ["q", None, "p", "q"]
    ids = mx.array(np.random.default_rng(9).integers(0, 1000, (len(names), 1)))
    got = run(model, ids, names)
    for i, n in enumerate(names):
        want = (alone[n] if n else load_model(q4))(ids[i:i + 1])
        np.testing.assert_allclose(np.array(got[i:i + 1]), np.array(want), atol=ATOL, rtol=0)
