"""Rewindable caches and speculative decoding: exact rewinds, speculative == plain greedy,
the acceptance rule keeps the target distribution, and rewinds in the front ends."""

import mlx.core as mx
import numpy as np
import pytest

from conftest import tiny_config
from mlx_lfm2 import load
from mlx_lfm2.model.cache import ConvCache, can_rewind, reachable, rewind
from mlx_lfm2.engine.generation import prefill


def _states(cache):
    return [np.array(a) for c in cache for a in c.state]


def _assert_same_cache(got, want, atol):
    assert [c.offset for c in got] == [c.offset for c in want]
    for a, b in zip(_states(got), _states(want)):
        np.testing.assert_allclose(a, b, atol=atol)


@pytest.fixture(scope="module", params=["tiny-dense-f32", "tiny-moe-f32", "tiny-moe-q4"])
def model(request, checkpoint, tmp_path_factory):
    kind, form = request.param.rsplit("-", 1)
    folder = checkpoint(tiny_config(kind), tokenizer=True)
    if form == "q4":
        from mlx_lfm2 import convert

        out = tmp_path_factory.mktemp("q4")
        convert(folder, out, quantize=True, q_bits=4, force=True, progress=False)
        folder = out
    return load(folder)[0]


@pytest.mark.parametrize("m", [1, 3, 7, ConvCache.window])
def test_decode_then_rewind_equals_a_fresh_prefill(model, m):
    rng = np.random.default_rng(m)
    tokens = rng.integers(10, 1000, 40).tolist()
    cache = model.make_cache()
    prefill(model, mx.array(tokens[:20]), cache)
    for t in tokens[20:]:  # decode token by token
        model(mx.array([[t]]), cache=cache)
    assert can_rewind(cache, m)
    rewind(cache, m)
    fresh = model.make_cache()
    prefill(model, mx.array(tokens[: 40 - m]), fresh)
    _assert_same_cache(cache, fresh, atol=1e-4)
    # ...and it keeps going like the fresh one.
    nxt = mx.array([[tokens[40 - m]]])
    np.testing.assert_allclose(np.array(model(nxt, cache=cache)), np.array(model(nxt, cache=fresh)), atol=1e-3)


def test_rewind_inside_a_block_and_to_a_checkpoint(model):
    tokens = list(range(100, 160))
    cache = model.make_cache()
    prefill(model, mx.array(tokens[:30]), cache, step_size=8)  # checkpoints at 8, 16, 24, 30
    model(mx.array([tokens[30:35]]), cache=cache)  # a verify-sized block
    for t in tokens[35:60]:
        model(mx.array([[t]]), cache=cache)
    far = 27  # before the window, between checkpoints
    assert not can_rewind(cache, 60 - far) and reachable(cache, far) == 24
    rewind(cache, 60 - 24)
    fresh = model.make_cache()
    prefill(model, mx.array(tokens[:24]), fresh)
    _assert_same_cache(cache, fresh, atol=1e-4)
    # Inside a multi-token block: 33 = 30 + 3 of the 5-token call.
    cache2 = model.make_cache()
    prefill(model, mx.array(tokens[:30]), cache2)
    model(mx.array([tokens[30:35]]), cache=cache2)
    rewind(cache2, 2)
    fresh2 = model.make_cache()
    prefill(model, mx.array(tokens[:33]), fresh2)
    _assert_same_cache(cache2, fresh2, atol=1e-4)
