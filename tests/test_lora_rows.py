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


def test_load_unload_reload_leave_the_other_slots_bit_equal(checkpoint, tmp_path):
    """Slots are written in place: loading, unloading and reloading adapters changes no other
    adapter's (or the base's) rows by a single bit; a freed slot is the next load's; the stacks
    grow (2 -> 4 adapters) only when no slot is free, and never past the limit."""
    base = checkpoint(tiny_config("tiny-moe"))
    folders = {n: make_adapter(base, tmp_path / n, seed=s, num_layers=-1) for n, s in zip("abcd", (1, 2, 3, 4))}
    model = load_model(base, adapters={"a": folders["a"], "b": folders["b"]})
    aset = model.adapter_set
    aset.limit = 4
    ids = [mx.array(np.random.default_rng(n).integers(0, 1000, (3, n))) for n in (1, 24)]  # decode, sorted experts

    def outputs(names):
        return [run(model, x, names) for x in ids]

    def same(got, want):
        return all(mx.array_equal(g, w) for g, w in zip(got, want))

    before = outputs(["a", None, "b"])
    assert aset.capacity == 3
    add_resident(aset, "c", folders["c"])  # no free slot: the stacks grow to 4 adapters
    assert aset.capacity == 5 and aset.slot("c") == 3
    assert same(outputs(["a", None, "b"]), before)
    with_c = outputs(["c", None, "b"])
    slot_a = aset.slot("a")
    aset.remove("a")
    assert same(outputs(["c", None, "b"]), with_c)
    add_resident(aset, "d", folders["d"])  # takes the freed slot, the stacks keep their size
    assert aset.slot("d") == slot_a and aset.capacity == 5
    assert same(outputs(["c", None, "b"]), with_c)
    alone = load_model(base, adapter_path=folders["d"])
    np.testing.assert_allclose(np.array(run(model, ids[1], ["d"] * 3)), np.array(alone(ids[1])), atol=ATOL, rtol=0)
    aset.remove("d")
    add_resident(aset, "a", folders["a"])  # back in its old slot: a's rows as before, bit for bit
    assert aset.slot("a") == slot_a
    assert same(outputs(["a", None, "b"]), before)
    add_resident(aset, "d", folders["d"])
    assert aset.capacity == 5 and aset.loaded == ["b", "c", "a", "d"]
    with pytest.raises(ValueError, match="4 adapters are resident already"):
        add_resident(aset, "e", folders["d"])
    assert same(outputs(["a", None, "b"]), before)


def test_a_header_whose_byte_range_is_short_of_its_shape_is_refused(setup, tmp_path):
    """MLX reads what a tensor's shape says from its offset on: a range shorter than that (here
    one tensor's end moved 4 bytes back, the file's size unchanged) is refused before MLX reads."""
    import json
    import shutil

    _, folders, model, _, _ = setup
    bad = tmp_path / "short"
    shutil.copytree(folders["a"], bad)
    raw = (bad / "adapters.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    name = sorted(k for k in header if k != "__metadata__")[0]
    header[name]["data_offsets"][1] -= 4
    text = json.dumps(header, separators=(",", ":")).encode().ljust(n)  # the same header length: every offset stays valid
    (bad / "adapters.safetensors").write_bytes(raw[:8] + text + raw[8 + n:])
    with pytest.raises(AdapterError, match=f"tensor {name}: shape .* needs .* bytes, its data_offsets hold"):
        add_resident(model.adapter_set, "short", bad)
    assert "short" not in model.adapter_set
