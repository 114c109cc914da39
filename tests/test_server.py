"""The OpenAI-compatible server, started for real on a loopback port, driven by `openai`."""

import json
import threading
import time

import httpx
import pytest

from conftest import free_port, start_server, tiny_config

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def server(checkpoint):
    folder = checkpoint(tiny_config("tiny-moe"), tokenizer=True)
    proc, base, _ = start_server(folder, "--api-key", "sekrit", "--queue-size", "4", "--max-context", "2048")
    yield base
    proc.terminate()
    proc.wait(10)


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="sekrit", max_retries=0)


def health(server):
    return httpx.get(server + "/health").json()


def chat(client, content="Hello!", **kw):
    kw.setdefault("max_tokens", 12)
    kw.setdefault("temperature", 0)
    return client.chat.completions.create(model="m", messages=[{"role": "user", "content": content}], **kw)


def test_non_streaming_chat_with_usage_that_matches_the_tokenizer(client, chat_model):
    _, tok, _ = chat_model
    r = chat(client, "Count the tokens, please", max_tokens=10)
    msgs = [{"role": "user", "content": "Count the tokens, please"}]
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens == len(tok.apply_chat_template(msgs, tokenize=True))
    assert r.usage.completion_tokens <= 10 and r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    # greedy is deterministic: same request, same answer
    assert chat(client, "Count the tokens, please", max_tokens=10).choices[0].message.content == r.choices[0].message.content


def test_streaming_chat_chunks_end_with_usage(client):
    stream = chat(client, "Stream this", stream=True, stream_options={"include_usage": True}, max_tokens=16)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason in ("stop", "length")
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= 1
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == chat(client, "Stream this", max_tokens=16).choices[0].message.content


def test_follow_up_request_reuses_the_cached_prompt(client, chat_model):
    tok = chat_model[1]
    first = chat(client, "Tell me about MLX", max_tokens=8)
    messages = [{"role": "user", "content": "Tell me about MLX"},
                {"role": "assistant", "content": first.choices[0].message.content},
                {"role": "user", "content": "And about LFM2?"}]
    second = client.chat.completions.create(model="m", messages=messages, max_tokens=8, temperature=0)
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached >= first.usage.prompt_tokens + first.usage.completion_tokens - 1
    new_turn = "<|im_end|>\n<|im_start|>user\nAnd about LFM2?<|im_end|>\n<|im_start|>assistant\n"
    # only the new turn was prefilled (plus the last reply token, sampled but never fed)
    assert second.usage.prompt_tokens - cached <= len(tok.encode(new_turn, add_special_tokens=False)) + 1


@pytest.fixture
def scripted(tmp_path):
    """A real uvicorn server on loopback whose model follows a script of token ids."""
    import uvicorn

    from conftest import ScriptedModel, reference_dir
    from mlx_lfm2.serve.app import create_app
    from mlx_lfm2.serve.scheduler import Scheduler
    from mlx_lfm2.text.tokenizer import load_tokenizer

    tok = load_tokenizer(reference_dir())
    servers = []

    def start(text, queue_size=4, tail=(), max_batch=8):
        ids = tok.encode(text, add_special_tokens=False) + list(tail)
        engine = Scheduler(ScriptedModel(ids), tok, "scripted", queue_size=queue_size, max_batch=max_batch)
        port = free_port()
        srv = uvicorn.Server(uvicorn.Config(create_app(engine), host="127.0.0.1", port=port, log_level="warning"))
        threading.Thread(target=srv.run, daemon=True).start()
        while not srv.started:
            time.sleep(0.02)
        servers.append(srv)
        base = f"http://127.0.0.1:{port}"
        return base, openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0), engine

    yield start
    for srv in servers:
        srv.should_exit = True


TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
CALL = 'Checking.<|tool_call_start|>[get_weather(city="Paris"), get_weather(city="Rome")]<|tool_call_end|>'


def test_tool_calls_come_back_as_openai_tool_calls_and_results_are_answered(scripted):
    base, client, _ = scripted(CALL, tail=[7])
    msgs = [{"role": "user", "content": "Weather in Paris and Rome?"}]
    r = client.chat.completions.create(model="m", messages=msgs, tools=TOOLS, max_tokens=64)
    msg = r.choices[0]
    assert msg.finish_reason == "tool_calls" and msg.message.content == "Checking."
    assert [(c.function.name, json.loads(c.function.arguments)) for c in msg.message.tool_calls] == [
        ("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Rome"})]

    stream = client.chat.completions.create(model="m", messages=msgs, tools=TOOLS, max_tokens=64, stream=True)
    calls, text, finish = [], "", None
    for c in stream:
        d = c.choices[0].delta
        text += d.content or ""
        calls += [(t.index, t.function.name, json.loads(t.function.arguments)) for t in d.tool_calls or []]
        finish = c.choices[0].finish_reason or finish
    assert text == "Checking." and "<|tool" not in text and finish == "tool_calls"
    assert calls == [(0, "get_weather", {"city": "Paris"}), (1, "get_weather", {"city": "Rome"})]

    # The tool results go back as role "tool"; the assistant turn is rendered as LFM2 call text.
    follow = client.chat.completions.create(model="m", tools=TOOLS, max_tokens=4, messages=msgs + [
        {"role": "assistant", "content": None, "tool_calls": [t.model_dump() for t in msg.message.tool_calls]},
        {"role": "tool", "tool_call_id": msg.message.tool_calls[0].id, "content": '{"temp": 21}'},
        {"role": "tool", "tool_call_id": msg.message.tool_calls[1].id, "content": '{"temp": 25}'}])
    assert follow.choices[0].message.role == "assistant"


@pytest.mark.parametrize("choice, script", [
    ({"type": "function", "function": {"name": "get_weather"}}, 'city="Oslo")]<|tool_call_end|>'),
    ("required", 'get_weather(city="Oslo")]<|tool_call_end|>'),
])
def test_tool_choice_makes_the_reply_a_call(scripted, choice, script):
    # The scripted model writes only what follows the forced opening of the call.
    base, client, engine = scripted(script, tail=[7])
    msgs = [{"role": "user", "content": "Weather in Oslo?"}]
    r = client.chat.completions.create(model="m", messages=msgs, tools=TOOLS, tool_choice=choice, max_tokens=32)
    (call,) = r.choices[0].message.tool_calls
    assert (call.function.name, json.loads(call.function.arguments)) == ("get_weather", {"city": "Oslo"})
    assert r.choices[0].finish_reason == "tool_calls" and not r.choices[0].message.content
    stream = client.chat.completions.create(model="m", messages=msgs, tools=TOOLS, tool_choice=choice,
                                            max_tokens=32, stream=True)
    deltas = [c.choices[0].delta for c in stream if c.choices]
    assert "".join(d.content or "" for d in deltas) == ""
    assert [t.function.name for d in deltas for t in d.tool_calls or []] == ["get_weather"]


def test_eight_concurrent_streaming_clients_all_complete(scripted):
    base, client, engine = scripted(" word" * 40, queue_size=8)
    done = []

    def one(i):
        s = client.chat.completions.create(model="m", messages=[{"role": "user", "content": f"client {i}"}],
                                           max_tokens=20, stream=True)
        text = "".join(c.choices[0].delta.content or "" for c in s if c.choices)
        done.append(text)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(done) == 8 and all(t == " word" * 20 for t in done)
    assert health(base)["completed"] >= 8


def test_a_disconnected_client_frees_its_slot(scripted):
    base, client, engine = scripted(" word" * 100000, queue_size=1)
    with httpx.stream("POST", base + "/v1/chat/completions", timeout=30, json={
            "messages": [{"role": "user", "content": "go on forever"}], "max_tokens": 100000, "stream": True}) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i > 10:
                break  # hang up mid-stream
    for _ in range(100):
        h = health(base)
        if h["active"] == 0 and h["cancelled"] >= 1:
            break
        time.sleep(0.05)
    assert h["active"] == 0 and h["cancelled"] >= 1 and h["queued"] == 0
    r = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    assert r.choices[0].message.content == " word word word"


def test_a_full_queue_answers_429(scripted):
    base, client, engine = scripted(" word" * 100000, queue_size=1, max_batch=1)
    body = {"messages": [{"role": "user", "content": "long"}], "max_tokens": 100000, "stream": True}
    streams = [httpx.stream("POST", base + "/v1/chat/completions", json=body, timeout=30) for _ in range(2)]
    opened = [s.__enter__() for s in streams]  # one running (the batch is full), one queued
    try:
        for _ in range(100):
            if health(base)["queued"] == 1:
                break
            time.sleep(0.05)
        r = httpx.post(base + "/v1/chat/completions", json=body, timeout=30)
        assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full"
    finally:
        for s in streams:
            s.__exit__(None, None, None)


BAD = [
    ("no auth", "POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}, None, 401),
    ("not json", "POST", "/v1/chat/completions", b"{nope", "sekrit", 400),
    ("json array", "POST", "/v1/chat/completions", [1, 2], "sekrit", 400),
    ("no messages", "POST", "/v1/chat/completions", {"model": "m"}, "sekrit", 422),
    ("empty messages", "POST", "/v1/chat/completions", {"messages": []}, "sekrit", 422),
    ("bad role", "POST", "/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, "sekrit", 422),
    ("n=2", "POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "n": 2}, "sekrit", 422),
    ("temperature", "POST", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": "x"}], "temperature": 9}, "sekrit", 422),
    ("max_tokens", "POST", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": "x"}], "max_tokens": -1}, "sekrit", 422),
    ("bad tool", "POST", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "web"}]}, "sekrit", 422),
    ("tool_choice without tools", "POST", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": "x"}], "tool_choice": "required"}, "sekrit", 422),
    ("tool_choice unknown tool", "POST", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": "x"}], "tools": TOOLS,
      "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "sekrit", 422),
    ("bad frequency_penalty", "POST", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": "x"}], "frequency_penalty": 3}, "sekrit", 422),
    ("bad response_format", "POST", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "xml"}}, "sekrit", 422),
    ("image part", "POST", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "sekrit", 400),
    ("too long", "POST", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": "word " * 3000}]}, "sekrit", 400),
    ("huge body", "POST", "/v1/chat/completions", b"x" * (5 * 1024 * 1024), "sekrit", 413),
    ("no prompt", "POST", "/v1/completions", {"max_tokens": 3}, "sekrit", 422),
    ("unknown route", "GET", "/v1/nothing", None, "sekrit", 404),
    ("wrong method", "GET", "/v1/chat/completions", None, "sekrit", 405),
]


def test_malformed_requests_get_openai_errors_and_the_server_keeps_serving(server, client):
    for name, method, path, body, key, status in BAD:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        if isinstance(body, bytes):
            r = httpx.request(method, server + path, content=body, headers={**headers, "content-type": "application/json"})
        else:
            r = httpx.request(method, server + path, json=body, headers=headers)
        assert r.status_code == status, (name, r.status_code, r.text)
        err = r.json()["error"]
        assert err["message"] and err["type"], name
    assert chat(client, "still there?").choices[0].message.content is not None
    assert health(server)["status"] == "ok"


def test_completions_models_logprobs_and_json_format(server, client):
    r = client.completions.create(model="m", prompt="Once upon a time", max_tokens=5, temperature=0)
    assert r.object == "text_completion" and r.usage.completion_tokens == 5
    assert [m.id for m in client.models.list().data]
    r = chat(client, "hi", logprobs=True, top_logprobs=3, max_tokens=4)
    content = r.choices[0].logprobs.content
    assert len(content) >= 1 and len(content[0].top_logprobs) == 3
    assert content[0].logprob == pytest.approx(content[0].top_logprobs[0].logprob, abs=1e-4)  # greedy = top-1
    r = chat(client, "json please", response_format={"type": "json_object"}, max_tokens=4)
    assert r.choices[0].model_extra["response_format_valid"] in (True, False)


def test_a_process_with_an_idle_worker_exits_cleanly(chat_model):
    """The worker waits on its queue (no polling): a process that leaves it running, or closes
    it, exits with status 0 rather than aborting in interpreter shutdown."""
    import subprocess
    import sys

    _, _, folder = chat_model
    code = ("import sys, time, asyncio\n"
            "from mlx_lfm2 import load\n"
            "from mlx_lfm2.serve.scheduler import DONE, Job, Scheduler\n"
            "from mlx_lfm2.engine.sample import SamplingParams\n"
            "model, tok = load(sys.argv[1])\n"
            "s = Scheduler(model, tok, 'm').start()\n"
            "idle = Scheduler(model, tok, 'm').start()\n"
            "async def go():\n"
            "    job = Job('hello', SamplingParams(max_tokens=3), None, asyncio.get_running_loop())\n"
            "    s.submit(job)\n"
            "    while await job.out.get() is not DONE:\n"
            "        pass\n"
            "asyncio.run(go())\n"
            "s.close()\n"
            "time.sleep(0.3)\n")
    r = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "terminate called" not in r.stderr, (r.returncode, r.stderr[-2000:])
