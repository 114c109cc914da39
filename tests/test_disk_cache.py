"""The disk prompt cache: restarts equal cold runs, edits cost at most one extra block, and
no damaged, foreign or half-written file is ever used."""

import json
import logging
import os
import signal
import struct
import subprocess
import sys
import time

import mlx.core as mx
import numpy as np
import pytest

from conftest import tiny_config
from mlx_lfm2.engine.cache_files import CacheFileError, SafeTensors, write
from mlx_lfm2.engine.disk_cache import BLOCK, BlockStore
from mlx_lfm2.engine.decode import generate_step, prefill


@pytest.fixture(scope="module")
def model_folder(checkpoint):
    return checkpoint(tiny_config("tiny-moe"), tokenizer=True)


@pytest.fixture(scope="module")
def lm(model_folder):
    from mlx_lfm2 import load

    return load(model_folder)


def tokens(n, seed=0):
    return np.random.RandomState(seed).randint(10, 2000, n).tolist()


def cold(model, toks, step=None):
    c = model.make_cache()
    prefill(model, mx.array(toks, dtype=mx.uint32), c, step)
    return c


def greedy(model, toks, cache=None, n=12):
    cache = cache if cache is not None else model.make_cache()
    held = cache[0].offset
    out = []
    for t, _ in generate_step(mx.array(toks[held:], dtype=mx.uint32), model, cache, max_tokens=n):
        out.append(t)
    return out


def same_cache(a, b):
    assert [type(x) for x in a] == [type(y) for y in b]
    for x, y in zip(a, b):
        assert x.offset == y.offset
        for p, q in zip(x.state, y.state):
            assert p.shape == q.shape and mx.array_equal(p, q).item()


def test_greedy_after_restart_equals_cold_run(lm, model_folder, tmp_path):
    model, tok = lm
    toks = tokens(900)
    # An odd prefill step puts block boundaries inside chunks: the states come from slices.
    BlockStore(tmp_path, model, tok).save(toks, cold(model, toks, step=300))
    from mlx_lfm2 import load

    model2, tok2 = load(model_folder)  # a restart: a new model object, a new store
    store = BlockStore(tmp_path, model2, tok2)
    cache, n = store.lookup(toks, len(toks) - 1)
    assert n == 3 * BLOCK and store.stats["blocks_read"] == 3
    same_cache(cache, cold(model2, toks[:n]))
    assert greedy(model2, toks, cache) == greedy(model, toks)


def stream_tokens(model, tok, ids, cache=None, step=None):
    from mlx_lfm2.engine.generation import stream_generate

    return [r.token for r in stream_generate(model, tok, ids, max_tokens=10, cache=cache, prefill_step_size=step)
            if r.token is not None]


def batched_tokens(model, ids, cache=None, step=None):
    """Greedy tokens through the server's path (``BatchGenerator``) and the row's cache."""
    from mlx_lfm2.engine.batch import BatchGenerator

    gen, out = BatchGenerator(model, 2, prefill_step_size=step), []
    gen.insert(ids, max_tokens=10, cache=cache)
    while True:
        for t in gen.step():
            out.append(t.token)
            if t.finish_reason:
                return out, t.cache


@pytest.mark.parametrize("path", ["stream_generate", "batched"])
def test_a_prefix_of_many_prefill_chunks_is_reused_whole_after_a_restart(lm, model_folder, tmp_path, path):
    """14 prefill chunks of 100 tokens: block boundaries inside chunks, past several chunks;
    every full block is stored, all are read back, and greedy output equals a cold run."""
    from mlx_lfm2 import load

    model, tok = lm
    toks, step = tokens(1400, seed=3), 100
    if path == "stream_generate":
        cache = model.make_cache()
        cold_out = stream_tokens(model, tok, toks, cache, step)
    else:
        cold_out, cache = batched_tokens(model, toks, step=step)
    store = BlockStore(tmp_path, model, tok, background=True)
    assert store.save(toks, cache) == len(toks) // BLOCK and store.flush()
    model2, tok2 = load(model_folder)  # a restart
    store2 = BlockStore(tmp_path, model2, tok2)
    restored, n = store2.lookup(toks, len(toks) - 1)
    assert n == (len(toks) - 1) // BLOCK * BLOCK and store2.stats["blocks_read"] == n // BLOCK
    if path == "stream_generate":
        assert stream_tokens(model2, tok2, toks[n:], restored, step) == cold_out
    else:
        assert batched_tokens(model2, toks[n:], restored, step)[0] == cold_out


def test_edit_at_token_p_reprefills_at_most_n_minus_p_plus_a_block(lm, tmp_path):
    model, tok = lm
    store = BlockStore(tmp_path, model, tok)
    toks = tokens(1100)
    store.save(toks, cold(model, toks))
    for p in (0, 100, 255, 256, 700, 1023, 1099):
        edited = toks[:p] + [toks[p] + 1] + toks[p + 1:]
        cache, n = store.lookup(edited, len(edited) - 1)
        assert len(edited) - n <= (len(edited) - p) + BLOCK
        assert n == (p // BLOCK) * BLOCK
        if cache is not None:
            same_cache(cache, cold(model, edited[:n]))


def test_a_corrupted_block_is_skipped_logged_rewritten_and_the_answer_stays_exact(lm, tmp_path, caplog):
    model, tok = lm
    store = BlockStore(tmp_path, model, tok)
    toks = tokens(800, seed=1)
    store.save(toks, cold(model, toks))
    second = store.path(store_keys(store, toks)[1])
    data = bytearray(second.read_bytes())
    data[-5] ^= 0xFF  # one flipped byte in the data
    second.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="mlx_lfm2.disk_cache"):
        cache, n = store.lookup(toks, len(toks) - 1)
    assert n == BLOCK and "checksum mismatch" in caplog.text
    assert greedy(model, toks, cache) == greedy(model, toks)
    assert store.save(toks, cold(model, toks)) == 1  # the refused block is written again
    assert store.lookup(toks, len(toks) - 1)[1] == 3 * BLOCK


def store_keys(store, toks):
    from mlx_lfm2.engine.disk_cache import block_keys

    return block_keys(store.identity, toks)


def test_foreign_truncated_and_hostile_files_are_refused_before_mlx_reads_them(lm, checkpoint, tmp_path, caplog):
    from mlx_lfm2 import load

    model, tok = lm
    other, other_tok = load(checkpoint(tiny_config("tiny-moe"), tokenizer=True, seed=1))
    toks = tokens(600, seed=2)
    theirs = BlockStore(tmp_path, other, other_tok)
    assert theirs.identity != BlockStore(tmp_path / "x", model, tok).identity  # same shapes, other weights
    theirs.save(toks, cold(other, toks))
    ours = BlockStore(tmp_path, model, tok)
    assert ours.lookup(toks) == (None, 0)  # their keys are not ours: a plain miss
    first = store_keys(ours, toks)[0]
    os.replace(theirs.path(store_keys(theirs, toks)[0]), ours.path(first))  # theirs under our name
    with caplog.at_level(logging.WARNING, logger="mlx_lfm2.disk_cache"):
        assert ours.lookup(toks) == (None, 0)
    assert "written for another model" in caplog.text
    good = ours.path(first)
    ours.save(toks, cold(model, toks))
    raw = good.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    cases = {"truncated": raw[: len(raw) // 2], "empty": b"",
             "huge header": struct.pack("<Q", 1 << 40) + raw[8:]}
    name = next(k for k in header if k.startswith("k."))
    for label, change in [("bigger shape", lambda t: t[name]["shape"].__setitem__(2, 10**6)),
                          ("overlap", lambda t: t[name]["data_offsets"].__setitem__(0, 0)),
                          ("dtype", lambda t: t[name].__setitem__("dtype", "F64"))]:
        t = json.loads(raw[8 : 8 + n])
        change(t)
        head = json.dumps(t).encode()
        cases[label] = struct.pack("<Q", len(head)) + head + raw[8 + n:]
    for label, data in cases.items():
        good.write_bytes(data)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="mlx_lfm2.disk_cache"):
            assert ours.lookup(toks) == (None, 0), label
        assert "skipped a block" in caplog.text, label


def test_safetensors_reader_checks_structure_before_data(tmp_path):
    p = tmp_path / "a.safetensors"
    write(p, {"x": mx.arange(6, dtype=mx.float32).reshape(2, 3), "y": mx.ones((4,), dtype=mx.bfloat16)}, {"k": "v"})
    f = SafeTensors.open(p)
    assert f.tensors == {"x": ("F32", (2, 3)), "y": ("BF16", (4,))} and f.metadata["k"] == "v"
    arrays = f.arrays()
    assert arrays["y"].dtype == mx.bfloat16 and arrays["x"].tolist() == [[0, 1, 2], [3, 4, 5]]
    with pytest.raises(CacheFileError, match="does not fit this model"):
        f.expect({"x": ("F32", (2, 4)), "y": ("BF16", (4,))})
    p.write_bytes(p.read_bytes() + b"\0")
    with pytest.raises(CacheFileError, match="its header describes"):
        SafeTensors.open(p)
    assert [q.name for q in tmp_path.iterdir()] == ["a.safetensors"]  # no temporary file left


def test_the_byte_bound_holds_and_pinned_blocks_go_last(lm, tmp_path):
    model, tok = lm
    probe = BlockStore(tmp_path / "probe", model, tok)
    probe.save(tokens(BLOCK, seed=9), cold(model, tokens(BLOCK, seed=9)))
    size = probe.disk_bytes()  # blocks differ by a few bytes (their tokens' JSON): room for 4
    bound = 4 * size + size // 2
    store = BlockStore(tmp_path / "pc", model, tok, max_bytes=bound)
    pinned = tokens(2 * BLOCK, seed=10)
    store.save(pinned, cold(model, pinned), pin=True)
    for seed in range(11, 15):
        t = tokens(2 * BLOCK, seed=seed)
        store.save(t, cold(model, t))
        assert store.disk_bytes() <= bound
    assert store.chain_length(pinned) == 2 * BLOCK  # the pinned chain outlived newer ones
    assert store.chain_length(tokens(2 * BLOCK, seed=14)) == 2 * BLOCK  # the newest kept whole
    assert store.stats["blocks_evicted"] >= 4
    big = BlockStore(tmp_path / "small", model, tok, max_bytes=size + size // 2)
    t = tokens(3 * BLOCK, seed=20)
    big.save(t, cold(model, t))
    assert big.disk_bytes() <= size + size // 2 and big.chain_length(t) == BLOCK  # what fits, root first


WRITER = """
import sys, mlx.core as mx, numpy as np
from mlx_lfm2 import load
from mlx_lfm2.engine.disk_cache import BlockStore, block_keys
from mlx_lfm2.engine.decode import prefill
model, tok = load(sys.argv[1])
store = BlockStore(sys.argv[2], model, tok)
seeds = [int(s) for s in sys.argv[3].split(",")]
caches = {}
for s in seeds:
    t = np.random.RandomState(s).randint(10, 2000, 4 * 256).tolist()
    c = model.make_cache(); prefill(model, mx.array(t, dtype=mx.uint32), c); caches[s] = (t, c)
print("ready", flush=True)
sys.stdin.readline()  # go
for _ in range(int(sys.argv[4])):
    for s in seeds:
        t, c = caches[s]
        store._refused.update(block_keys(store.identity, t))  # write them again, every round
        store.save(t, c)
print("done", flush=True)
"""


def writers(model_folder, folder, seeds, rounds, n=1):
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(model_folder), str(folder), seeds, str(rounds)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for _ in range(n)]
    for p in procs:
        assert p.stdout.readline().strip() == "ready"
    for p in procs:  # both start writing at once
        p.stdin.write("go\n")
        p.stdin.flush()
    return procs


@pytest.mark.slow
def test_kill_9_mid_write_leaves_no_block_that_is_ever_used_half_written(lm, model_folder, tmp_path):
    model, tok = lm
    (p,) = writers(model_folder, tmp_path, "30,31", rounds=1000)  # rewrites the same blocks forever
    time.sleep(1.5)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    store = BlockStore(tmp_path, model, tok)
    for f in tmp_path.glob("blk-*.safetensors"):
        SafeTensors.open(f).verify()  # every file under a block's name is whole
    for s in (30, 31):
        t = tokens(4 * BLOCK, seed=s)
        cache, n = store.lookup(t, len(t) - 1)
        assert n == 3 * BLOCK and store.stats["blocks_skipped"] == 0
        same_cache(cache, cold(model, t[:n]))


@pytest.mark.slow
def test_two_processes_writing_the_same_prefix_at_once(lm, model_folder, tmp_path):
    model, tok = lm
    procs = writers(model_folder, tmp_path, "40", rounds=3, n=2)
    for p in procs:
        assert p.communicate(timeout=300)[0].strip() == "done" and p.returncode == 0
    assert not list(tmp_path.glob(".tmp-*"))
    t = tokens(4 * BLOCK, seed=40)
    store = BlockStore(tmp_path, model, tok)
    cache, n = store.lookup(t)
    assert n == 4 * BLOCK and len(list(tmp_path.glob("blk-*"))) == 4
    same_cache(cache, cold(model, t))


def test_background_writes_land_whole_and_a_resave_while_queued_writes_nothing_twice(lm, tmp_path):
    model, tok = lm
    store = BlockStore(tmp_path, model, tok, background=True)
    toks = tokens(3 * BLOCK + 5, seed=50)
    cache = cold(model, toks)
    assert store.save(toks, cache) == 3
    assert store.save(toks, cache) == 0  # queued or written already
    store.flush()
    assert not list(tmp_path.glob(".tmp-*"))
    restored, n = BlockStore(tmp_path, model, tok).lookup(toks, len(toks) - 1)
    assert n == 3 * BLOCK
    same_cache(restored, cold(model, toks[:n]))
