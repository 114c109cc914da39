"""A seeded, sampled request gives the same reply, to the bit, whether or not its prompt was
cached: a seeded request reuses only a prefix computed by whole prefill chunks on the
absolute grid (engine/prompt_cache.py ``chunked``, engine/decode.py ``chunk_end``)."""

import asyncio

from mlx_lfm2.engine.decode import default_prefill_step


def _run(engine, text, seed):
    from mlx_lfm2.engine.sample import SamplingParams
    from mlx_lfm2.serve.scheduler import DONE, Job

    async def go():
        job = Job(text, SamplingParams(max_tokens=10, temperature=1.0, seed=seed), 0, asyncio.get_running_loop())
        engine.submit(job)
        out = []
        while (item := await job.out.get()) is not DONE:
            out.append(item)
        return job, [(r.token, e["logprob"] if e else None) for r, e in out]

    return asyncio.run(go())


def test_a_seeded_reply_is_the_same_hit_or_miss_to_the_bit(chat_model):
    from mlx_lfm2.serve.scheduler import Scheduler

    model, tok, _ = chat_model
    cold, warm = Scheduler(model, tok, "m").start(), Scheduler(model, tok, "m").start()
    base = " ".join(f"w{i}" for i in range(150))
    try:
        for seed in range(4):
            # A conversation's next turn: its prompt holds the last reply, which the warm
            # server's cache computed one decode step at a time.
            first = base + f" turn{seed}"
            _, reply = _run(warm, first, seed)
            prompt = first + tok.decode([t for t, _ in reply if t is not None]) + " next question"
            hit, got = _run(warm, prompt, seed)
            miss, want = _run(cold, prompt, seed)
            cold.caches.clear()
            assert miss.cached_tokens == 0 and hit.cached_tokens > 0
            assert hit.cached_tokens % default_prefill_step() == 0
            assert got == want, seed  # tokens and logprobs, tolerance-free
    finally:
        cold.close()
        warm.close()


def test_an_unseeded_request_still_reuses_all_it_can(chat_model):
    from mlx_lfm2.engine.sample import SamplingParams
    from mlx_lfm2.serve.scheduler import DONE, Job, Scheduler

    model, tok, _ = chat_model
    engine = Scheduler(model, tok, "m").start()
    text = " ".join(f"w{i}" for i in range(150))

    async def go(t):
        job = Job(t, SamplingParams(max_tokens=3), None, asyncio.get_running_loop())
        engine.submit(job)
        while await job.out.get() is not DONE:
            pass
        return job

    try:
        asyncio.run(go(text))
        again = asyncio.run(go(text + " more"))
        assert again.cached_tokens > default_prefill_step() and again.cached_tokens % default_prefill_step()
    finally:
        engine.close()
