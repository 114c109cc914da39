"""A stream whose reader stops: its output is bounded, its row pauses, the others go on.

Each job's outbox (serve/outbox.py) holds at most ``max_buffered`` tokens; a full one parks
the job's row (engine/batch.py ``park``), which rejoins where it left off when the reader
catches up, or is cancelled after ``stall_timeout`` seconds.
"""

import asyncio
import json
import socket
import time

import httpx
import pytest

from conftest import start_server, tiny_config


def test_a_parked_row_resumes_with_the_tokens_it_would_have_had(chat_model):
    import mlx.core as mx

    from mlx_lfm2.engine.batch import BatchGenerator

    model, tok, _ = chat_model
    prompts = [tok.encode("one two three"), tok.encode("four five"), tok.encode("six")]

    def run(park_at=None):
        gen = BatchGenerator(model, 4)
        uids = [gen.insert(p, max_tokens=12) for p in prompts]
        out = {u: [] for u in uids}
        steps = 0
        while len(gen):
            steps += 1
            if park_at and steps == park_at:
                assert gen.park(uids[1]) and gen.status["parked"] == 1
            if park_at and steps == park_at + 5:
                gen.unpark(uids[1])
            for t in gen.step():
                out[t.uid].append(t.token)
                if t.uid == uids[1] and park_at and park_at <= steps < park_at + 5:
                    pytest.fail("a parked row produced a token")
        mx.eval()
        return [out[u] for u in uids]

    plain = run()
    assert run(park_at=6) == plain and all(len(o) == 12 for o in plain)


def _job(tok, text, max_tokens, out=None, top=None):
    from mlx_lfm2.engine.sample import SamplingParams
    from mlx_lfm2.serve.scheduler import Job

    return Job(text, SamplingParams(max_tokens=max_tokens), top, asyncio.get_running_loop(),
               **({"out": out} if out else {}))


async def _drain(job):
    from mlx_lfm2.serve.scheduler import DONE

    items = []
    while (item := await job.out.get()) is not DONE:
        items.append(item)
    return items


def test_an_unread_job_buffers_at_most_its_bound_while_others_finish(chat_model):
    from mlx_lfm2.serve.outbox import Outbox
    from mlx_lfm2.serve.scheduler import Scheduler

    model, tok, _ = chat_model
    engine = Scheduler(model, tok, "m").start()

    async def run():
        alone = await _drain(_submit(engine, _job(tok, "hello there", 60, top=5)))
        slow = _submit(engine, _job(tok, "hello there", 60, Outbox(max_items=8), top=5))
        for _ in range(600):
            if engine.stats["paused"]:
                break
            await asyncio.sleep(0.01)
        assert engine.batch.status["parked"] == 1 and slow.out.qsize() <= 8, engine.batch.status
        other = await _drain(_submit(engine, _job(tok, "another", 20)))  # served while the first waits
        assert other[-1][0].finish_reason == "length" and slow.out.qsize() <= 8
        read = await _drain(slow)  # the reader is back: the row resumes where it left off
        assert slow.out.peak_items <= 8
        assert [r.token for r, _ in read] == [r.token for r, _ in alone]
        assert [e for _, e in read] == [e for _, e in alone]
        assert all(r.logprobs is None for r, _ in read)  # no vocabulary row rides in the queue

    try:
        asyncio.run(run())
    finally:
        engine.close()


def test_a_reader_stalled_past_the_timeout_is_cancelled(chat_model):
    from mlx_lfm2.serve.outbox import Outbox
    from mlx_lfm2.serve.scheduler import Scheduler

    model, tok, _ = chat_model
    engine = Scheduler(model, tok, "m", stall_timeout=0.3).start()

    async def run():
        slow = _submit(engine, _job(tok, "hello", 500, Outbox(max_items=4)))
        for _ in range(1000):
            if engine.stats["stalled"]:
                break
            await asyncio.sleep(0.01)
        items = await _drain(slow)
        assert engine.stats["stalled"] == 1 and items[-1][0].finish_reason == "cancelled"
        assert len(items) < 20 and not engine.live

    try:
        asyncio.run(run())
    finally:
        engine.close()


def _submit(engine, job):
    engine.submit(job)
    return job


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


# The server's send buffers held small and fixed (accepted sockets inherit the listener's
# SO_SNDBUF; setting it turns Linux's autotuning, up to 4 MiB, off): a reader that stops
# fills them, then uvicorn's 64 KiB, then the outbox, within a couple hundred tokens whatever
# the machine's load (with autotuning it took thousands, minutes on a loaded CPU).
SMALL_SEND_BUFFERS = ("import runpy, socket; listen = socket.socket.listen; "
                      "socket.socket.listen = lambda s, *a: (s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096), "
                      "listen(s, *a))[1]; runpy.run_module('mlx_lfm2.server', run_name='__main__')")


@pytest.mark.slow
def test_a_client_that_stops_reading_top_logprobs_costs_bounded_memory(checkpoint):
    folder = checkpoint(tiny_config("tiny-moe"), tokenizer=True)
    proc, base, port = start_server(folder, "--max-buffered-tokens", "64", "--stall-timeout", "600",
                                    code=SMALL_SEND_BUFFERS)
    try:
        body = {"model": "m", "prompt": "hello", "max_tokens": 100000, "stream": True, "logprobs": 20,
                "temperature": 1.0, "seed": 0}
        httpx.post(base + "/v1/completions", json={**body, "stream": False, "max_tokens": 8}, timeout=60)
        before = _rss_mb(proc.pid)
        raw = json.dumps(body).encode()
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a reader that reads nothing
        s.connect(("127.0.0.1", port))
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n%s" % (len(raw), raw))
        health = []
        deadline = time.monotonic() + 300  # a bound on a state that must come, not a timing
        while time.monotonic() < deadline:
            tic = time.perf_counter()
            h = httpx.get(base + "/health", timeout=30).json()
            health.append(time.perf_counter() - tic)
            if h["paused"] and h["batch"]["parked"] == 1 or not h["active"]:
                break
            time.sleep(0.1)
        assert h["paused"] and h["batch"]["parked"] == 1, h  # the socket filled, then the outbox: parked
        r = httpx.post(base + "/v1/chat/completions", timeout=120,
                       json={"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 16})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 16
        time.sleep(2)
        again = httpx.get(base + "/health", timeout=30).json()
        assert again["batch"]["parked"] == 1 and again["active"] == 1, again  # still paused, not growing
        grown = _rss_mb(proc.pid) - before
        assert grown < 150, f"server RSS grew {grown:.0f} MB for one stalled stream"
        # /health answered all along (a liveness bound, not a timing: a blocked loop would not
        # answer at all; this CPU may be shared, so the bound is generous)
        assert max(health) < 15.0, health
        s.close()
    finally:
        proc.kill()
