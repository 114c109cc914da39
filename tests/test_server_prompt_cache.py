"""The server's disk prompt cache, through the real OpenAI and Anthropic clients: after a
restart the same request reads its prefix back, reports it as cached, and answers exactly
as a cold server does."""

import pytest

from conftest import start_server, tiny_config

LONG = " ".join(f"Line {i}: the value of key {i} is {i * 7 % 13}." for i in range(60))


@pytest.fixture(scope="module")
def folder(checkpoint):
    return checkpoint(tiny_config("tiny-moe"), tokenizer=True)


def ask_openai(base, **extra):
    from openai import OpenAI

    r = OpenAI(base_url=base + "/v1", api_key="x").chat.completions.create(
        model="m", messages=[{"role": "system", "content": LONG}, {"role": "user", "content": "Key 5?"}],
        max_tokens=8, temperature=0, **extra)
    return r.choices[0].message.content, r.usage


def served(folder, *args):
    proc, base, _ = start_server(folder, *args)
    return proc, base


def stop(proc):
    proc.terminate()
    proc.wait(30)


@pytest.fixture(scope="module")
def cold_server(folder):
    """One server that keeps no prompt cache (none on disk, none in memory) for the tests' cold
    references: each of its replies is a cold run (each test checks it reused 0 tokens)."""
    proc, base = served(folder, "--prompt-cache-bytes", "0", "--cache-entries", "0")
    yield base
    stop(proc)


@pytest.mark.slow
def test_after_a_restart_the_prefix_comes_from_disk_and_the_reply_equals_a_cold_one(folder, cold_server, tmp_path):
    cold, use = ask_openai(cold_server)
    assert use.prompt_tokens > 600 and use.prompt_tokens_details.cached_tokens == 0
    proc, base = served(folder, "--prompt-cache-dir", str(tmp_path))
    try:
        first, use1 = ask_openai(base, extra_body={"prompt_cache_key": "session-1"})
    finally:
        stop(proc)
    blocks = list(tmp_path.glob("blk-*.safetensors"))
    assert first == cold and use1.prompt_tokens_details.cached_tokens == 0
    assert len(blocks) == use.prompt_tokens // 256 and len(list(tmp_path.glob("pin-*"))) == len(blocks)
    proc, base = served(folder, "--prompt-cache-dir", str(tmp_path))
    try:
        again, use2 = ask_openai(base)
        import httpx

        assert httpx.get(base + "/health").json()["prompt_cache_disk"]["blocks_read"] == len(blocks)
    finally:
        stop(proc)
    assert again == cold
    assert use2.prompt_tokens_details.cached_tokens == (use.prompt_tokens - 1) // 256 * 256 > 0


@pytest.mark.slow
def test_anthropic_cache_control_pins_and_reports_cache_read_tokens(folder, tmp_path):
    from anthropic import Anthropic

    def ask(base):
        client = Anthropic(base_url=base, api_key="x")
        return client.messages.create(
            model="m", max_tokens=6, extra_body={"temperature": 0},
            system=[{"type": "text", "text": LONG, "cache_control": {"type": "ephemeral"}}],
            messages=[{"role": "user", "content": "Key 9?"}])

    proc, base = served(folder, "--prompt-cache-dir", str(tmp_path))
    try:
        first = ask(base)
    finally:
        stop(proc)
    assert first.usage.cache_read_input_tokens == 0 and list(tmp_path.glob("pin-*"))
    # The blocks this request wrote, counted in prompt tokens (the last one may hold some of
    # the reply: the cache holds the prompt and the reply's tokens but the last).
    prompt = first.usage.input_tokens + first.usage.cache_creation_input_tokens
    blocks = len(list(tmp_path.glob("blk-*")))
    assert blocks == (prompt + first.usage.output_tokens - 1) // 256 > 0
    assert first.usage.cache_creation_input_tokens == min(blocks * 256, prompt)
    proc, base = served(folder, "--prompt-cache-dir", str(tmp_path))
    try:
        again = ask(base)
    finally:
        stop(proc)
    assert again.content[0].text == first.content[0].text
    assert again.usage.cache_read_input_tokens >= 512
    assert again.usage.cache_creation_input_tokens == 0  # every block was stored already
    assert again.usage.input_tokens + again.usage.cache_read_input_tokens == prompt


def test_bad_prompt_cache_flags_say_what_to_do(folder, tmp_path):
    import subprocess
    import sys

    (tmp_path / "file").write_text("x")
    for args, says in [(["--prompt-cache-bytes", "lots"], "is not a size"),
                       (["--prompt-cache-dir", str(tmp_path / "file" / "sub")], "--prompt-cache-bytes 0")]:
        p = subprocess.run([sys.executable, "-m", "mlx_lfm2.server", "--model", str(folder), *args],
                           capture_output=True, text=True, timeout=300)
        assert p.returncode != 0 and says in p.stderr, p.stderr


# The server with each block write slowed down (a loaded disk), so that replies are sent
# while blocks are still queued for the writer thread.
SLOW_WRITES = ("import runpy, time; import mlx_lfm2.engine.disk_cache as d; w = d.write; "
               "d.write = lambda *a, **k: (time.sleep(0.3), w(*a, **k))[1]; "
               "runpy.run_module('mlx_lfm2.server', run_name='__main__')")


def served_slow_writes(folder, *args):
    proc, base, _ = start_server(folder, *args, code=SLOW_WRITES)
    return proc, base


def greedy_tokens(base, messages):
    from openai import OpenAI

    r = OpenAI(base_url=base + "/v1", api_key="x").chat.completions.create(
        model="m", messages=messages, max_tokens=8, temperature=0, logprobs=True)
    return [t.token for t in r.choices[0].logprobs.content], r.usage


@pytest.mark.slow
def test_a_prefix_of_many_prefill_chunks_is_whole_after_a_restart_right_after_the_reply(folder, cold_server, tmp_path):
    """The server is stopped (SIGTERM) as soon as its reply arrives: the blocks still queued
    for the disk are written before it exits, so the restart reuses the whole block-aligned
    prefix (here 9 of the CPU's 128-token prefill chunks and more) and answers as a cold run."""
    lines = " ".join(f"Line {i}: the value of key {i} is {i * 7 % 13}." for i in range(200))
    messages = [{"role": "system", "content": lines}, {"role": "user", "content": "Key 5?"}]
    cold, use = greedy_tokens(cold_server, messages)
    assert use.prompt_tokens_details.cached_tokens == 0
    assert use.prompt_tokens > 2048 + 256  # past the first 2048-token chunk of a GPU's prefill
    proc, base = served_slow_writes(folder, "--prompt-cache-dir", str(tmp_path))
    try:
        first, _ = greedy_tokens(base, messages)
    finally:
        stop(proc)
    assert first == cold
    proc, base = served(folder, "--prompt-cache-dir", str(tmp_path))
    try:
        again, use2 = greedy_tokens(base, messages)
    finally:
        stop(proc)
    assert use2.prompt_tokens_details.cached_tokens == (use.prompt_tokens - 1) // 256 * 256
    assert again == cold
