"""Continuous batching: every sequence of a batch decodes as it would alone (float32)."""

import random

import mlx.core as mx
import numpy as np
import pytest

from conftest import tiny_config
from mlx_lfm2 import batch_generate, generate, load
from mlx_lfm2.engine.batch import BatchGenerator
from mlx_lfm2.engine.decode import generate_step
from mlx_lfm2.engine.request import sampling_for


def alone(model, prompt, n, cache=None, **sampling):
    kw = sampling_for(len(prompt), **sampling)
    steps = generate_step(mx.array(prompt, dtype=mx.uint32), model, cache if cache is not None else model.make_cache(),
                          max_tokens=n, sampler=kw["sampler"], logits_processors=kw["logits_processors"])
    return [(t, np.array(lp)) for t, lp in steps]


def assert_same(got, want):
    assert [t for t, _ in got] == [t for t, _ in want]
    for (_, a), (_, b) in zip(got, want):
        np.testing.assert_allclose(a, b, atol=2e-4)


@pytest.fixture(scope="module", params=["tiny-moe", "tiny-dense"])
def model(request, checkpoint):
    return load(checkpoint(tiny_config(request.param), tokenizer=True))[0]


def test_each_row_decodes_as_alone_while_rows_join_and_leave(model):
    rng = random.Random(0)
    prompts = [[rng.randrange(1000) for _ in range(n)] for n in (5, 17, 1, 40, 9)]
    limits = [12, 4, 12, 12, 10]  # the second leaves early; the fourth waits for its slot
    # A repetition penalty keeps random weights from repeating one token (and tests per-row history).
    sampling = [dict(repetition_penalty=1.5), {}, dict(repetition_penalty=1.5), {}, dict(repetition_penalty=2.0)]
    gen = BatchGenerator(model, max_batch=3, prefill_step_size=8)  # prompts prefill in several chunks
    uids, got, steps = [], {}, 0
    for p, n, s in zip(prompts[:4], limits, sampling):
        uids.append(gen.insert(p, max_tokens=n, stop_tokens=(), **sampling_for(len(p), **s)))
    while len(gen):
        steps += 1
        if steps == 6:  # joins mid-way, while the others decode
            uids.append(gen.insert(prompts[4], max_tokens=limits[4], **sampling_for(len(prompts[4]), **sampling[4])))
        for t in gen.step():
            got.setdefault(t.uid, []).append((t.token, np.array(t.logprobs)))
            assert t.finish_reason == (None if len(got[t.uid]) < limits[uids.index(t.uid)] else "length")
    for u, p, n, s in zip(uids, prompts, limits, sampling):
        assert_same(got[u], alone(model, p, n, **s))
    assert len({t for u in uids for t, _ in got[u]}) > 10  # the sequences were not all one token


def test_a_removed_row_hands_back_a_cache_that_continues_exactly(model):
    prompts = [[3, 14, 15, 92, 65], [35, 89, 79, 32, 38, 46, 26, 43]]
    want = alone(model, prompts[0], 8)
    gen = BatchGenerator(model, max_batch=2)
    first = gen.insert(prompts[0], max_tokens=20)
    other = gen.insert(prompts[1], max_tokens=20, **sampling_for(8, repetition_penalty=1.3))
    got, cache = {first: [], other: []}, None
    while len(gen):
        for t in gen.step():
            got[t.uid].append(t.token)
        if len(got[first]) == 6 and cache is None:
            cache = gen.remove(first)
    assert got[first] == [t for t, _ in want[:6]]
    # decode is double-buffered: the 6th token was already fed when it was returned
    assert {c.offset for c in cache} == {len(prompts[0]) + 6}
    logits = model(mx.array([[want[6][0]]]), cache=cache)[0, -1]
    np.testing.assert_allclose(np.array(logits - mx.logsumexp(logits)), want[7][1], atol=2e-4)
    assert got[other] == [t for t, _ in alone(model, prompts[1], 20, repetition_penalty=1.3)]


def test_stop_ids_end_a_row_with_stop(model):
    p = [7, 7, 1, 2, 3]
    want = [t for t, _ in alone(model, p, 8)]
    gen = BatchGenerator(model)
    uid = gen.insert(p, max_tokens=8, stop_tokens=[want[2]])
    out = []
    while len(gen):
        out += gen.step()
    assert [t.token for t in out] == want[: want.index(want[2]) + 1] and out[-1].finish_reason == "stop"
    assert out[-1].cache is not None and out[-1].uid == uid


def test_batch_generate_texts_in_prompt_order_match_generate(chat_model):
    model, tok, _ = chat_model
    prompts = ["Hello there", [{"role": "user", "content": "What is MLX?"}], tok.encode("Once upon a time"),
               "A fourth, longer prompt about caches, batches and the rest of it"]
    out = batch_generate(model, tok, prompts, max_tokens=[10, 6, 10, 3], max_batch=2, repetition_penalty=1.3)
    want = [generate(model, tok, p, max_tokens=n, repetition_penalty=1.3) for p, n in zip(prompts, [10, 6, 10, 3])]
    assert out.texts == want
    assert [s["generation_tokens"] for s in out.stats][3] == 3 and out.finish_reasons[3] == "length"
    assert all(s["ttft_s"] > 0 for s in out.stats) and out.generation_tokens == sum(s["generation_tokens"] for s in out.stats)
    # a stop string ends one prompt's text early, never shown, without touching the others
    stop = want[0][2:5]
    if stop.strip():
        cut = batch_generate(model, tok, prompts[:2], max_tokens=[10, 6], stop=stop, repetition_penalty=1.3)
        assert cut.texts[0] == want[0][: want[0].find(stop)] and cut.finish_reasons[0] == "stop"
        assert cut.texts[1] == want[1][: want[1].find(stop)] if stop in want[1] else cut.texts[1] == want[1]


# The server: every active request decodes in one batch, each as it would alone.
from conftest import free_port  # noqa: E402
from test_server import client, health, scripted, server  # noqa: E402,F401  (fixtures)


def test_concurrent_server_requests_each_get_their_alone_reply(server, client):
    import threading

    asks = [dict(content="Tell me a story", max_tokens=14), dict(content="hi", max_tokens=5, logprobs=True, top_logprobs=2),
            dict(content="Count to ten", max_tokens=12, stop=["\n"]), dict(content="Why?", max_tokens=9, seed=3)]

    def ask(a, out, i):
        a = dict(a)
        out[i] = client.chat.completions.create(model="m", messages=[{"role": "user", "content": a.pop("content")}],
                                                temperature=0, **a)

    alone = [None] * len(asks)
    for i, a in enumerate(asks):
        ask(a, alone, i)
    together = [None] * len(asks)
    threads = [threading.Thread(target=ask, args=(a, together, i)) for i, a in enumerate(asks)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for a, b in zip(alone, together):
        assert b.choices[0].message.content == a.choices[0].message.content
        assert b.choices[0].finish_reason == a.choices[0].finish_reason
        assert b.usage.completion_tokens == a.usage.completion_tokens
    lp_a, lp_b = alone[1].choices[0].logprobs.content, together[1].choices[0].logprobs.content
    assert [e.token for e in lp_b] == [e.token for e in lp_a]
    assert [e.logprob for e in lp_b] == pytest.approx([e.logprob for e in lp_a], abs=1e-3)
    h = health(server)
    assert h["batch"]["max_batch"] == 8 and h["peak_batch"] >= 2  # they did decode together


def test_health_shows_the_batch_and_a_hang_up_leaves_it(scripted):
    import time

    import httpx

    base, client, engine = scripted(" word" * 100000, queue_size=4, max_batch=2)
    body = {"messages": [{"role": "user", "content": "long"}], "max_tokens": 100000, "stream": True}
    streams = [httpx.stream("POST", base + "/v1/chat/completions", json=body, timeout=30) for _ in range(3)]
    opened = [s.__enter__() for s in streams]
    try:
        for _ in range(200):
            h = health(base)
            if h["batch"]["decoding"] == 2:
                break
            time.sleep(0.05)
        assert h["batch"]["decoding"] == 2 and h["active"] == 2 and h["queued"] == 1  # the third waits
        streams[0].__exit__(None, None, None)  # hang up: its row leaves, the queued one joins
        for _ in range(200):
            h = health(base)
            if h["cancelled"] >= 1 and h["queued"] == 0 and h["batch"]["decoding"] == 2:
                break
            time.sleep(0.05)
        assert h["cancelled"] >= 1 and h["queued"] == 0 and h["batch"]["decoding"] == 2
        lines = [line for _, line in zip(range(5), opened[1].iter_lines()) if line]
        assert lines  # the others keep streaming
    finally:
        for s in streams[1:]:
            s.__exit__(None, None, None)


def test_a_multi_token_forward_on_joined_rows_matches_each_alone(model):
    """The batched cache also takes L > 1 per row (causal within the chunk, padding hidden)."""
    from mlx_lfm2.model import batch_cache

    prompts, more = [[5, 6, 7, 8, 9, 10, 11], [12, 13]], [[21, 22, 23], [31, 32, 33]]
    singles = [model.make_cache() for _ in prompts]
    for p, c in zip(prompts, singles):
        model(mx.array([p]), cache=c)
    batch = batch_cache.make_batch_cache(singles[0])
    for c in singles:
        batch_cache.join(batch, [x.copy() for x in c])
    together = model(mx.array(more), cache=batch)
    for i, (m, c) in enumerate(zip(more, singles)):
        np.testing.assert_allclose(np.array(together[i]), np.array(model(mx.array([m]), cache=c)[0]), atol=2e-4)
