"""The server against hostile or careless clients: every failure is a 4xx in OpenAI's error
shape (never a crash, a 500 or a wedged worker), limits hold while bodies arrive, a client
that leaves stops its work, and a signal stops the process."""

import asyncio
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from conftest import tiny_config
from conftest import start_server
from test_server import scripted  # noqa: F401 (a fixture)

CHAT = "/v1/chat/completions"
USER = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def folder(checkpoint):
    return checkpoint(tiny_config("tiny-moe"), tokenizer=True)  # 65,536 embedding rows, 64,400 tokens


@pytest.fixture(scope="module")
def server(folder):
    proc, base, port = start_server(folder, "--max-context", "32768", "--default-max-tokens", "24",
                                    "--body-timeout", "2", "--header-timeout", "2")
    yield base, port, proc
    proc.kill()
    proc.wait(10)


def post(base, body, path=CHAT, content_type="application/json"):
    # json.dumps escapes to ASCII, so bodies may carry what httpx's encoder refuses ("\ud800")
    return httpx.post(base + path, content=json.dumps(body), headers={"content-type": content_type}, timeout=30)


def assert_error(r, status, *words):
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"], err
    for w in words:
        assert w in err["message"], err


def still_serving(base, proc):
    assert proc.poll() is None, "the server died"
    r = post(base, {"messages": USER, "max_tokens": 2})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["role"] == "assistant"


@pytest.mark.parametrize("key", ["99999999", "64400", "65536", "-1", "abc", "1e3", " 5", "٥"])
def test_logit_bias_keys_outside_the_vocabulary_are_refused_by_name(server, key):
    base, _, proc = server
    r = post(base, {"messages": USER, "max_tokens": 2, "logit_bias": {"5": 1, key: 5}})
    assert_error(r, 422, repr(key) if not key.isdigit() else key)
    assert r.json()["error"]["param"] == "logit_bias"
    still_serving(base, proc)


def test_logit_bias_on_the_last_token_id_applies(server, chat_model):
    base, _, _ = server
    r = post(base, {"prompt": "x", "max_tokens": 3, "temperature": 0, "logit_bias": {"64399": 100},
                    "logprobs": 1}, "/v1/completions")
    assert r.json()["choices"][0]["logprobs"]["tokens"] == [chat_model[1].decode([64399])] * 3


def deep_schema(levels):
    return {"type": "function", "function": {"name": "f", "parameters": json.loads(
        '{"type":"object","properties":{"a":' * levels + "{}" + "}}" * levels)}}


BAD = [  # (name, path, body, status, words in the message)
    ("negative seed", CHAT, {"messages": USER, "seed": -1, "temperature": 1}, 422, ["seed"]),
    ("seed over 2**64-1", CHAT, {"messages": USER, "seed": 2**64, "temperature": 1}, 422, ["seed"]),
    ("text part is a number", CHAT, {"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]},
     422, ["text"]),
    ("arguments are a JSON list", CHAT, {"messages": USER + [{"role": "assistant", "tool_calls": [
        {"function": {"name": "f", "arguments": "[1]"}}]}]}, 400, ["JSON object"]),
    ("arguments are a JSON number", CHAT, {"messages": USER + [{"role": "assistant", "tool_calls": [
        {"function": {"name": "f", "arguments": "5"}}]}]}, 400, ["JSON object"]),
    ("arguments nested 5000 deep", CHAT, {"messages": USER + [{"role": "assistant", "tool_calls": [
        {"function": {"name": "f", "arguments": "[" * 5000 + "]" * 5000}}]}]}, 400, ["deeper"]),
    ("tool schema 100 deep", CHAT, {"messages": USER, "tools": [deep_schema(100)]}, 400, ["deeper"]),
    ("tool_choice function is a string", CHAT, {"messages": USER, "tools": [deep_schema(1)],
                                                "tool_choice": {"type": "function", "function": "f"}}, 422, []),
    ("json_schema is a string", CHAT, {"messages": USER, "response_format": {"type": "json_schema",
                                                                             "json_schema": "x"}}, 422, []),
    ("empty prompt ids", "/v1/completions", {"prompt": []}, 422, ["empty"]),
    ("empty prompt text", "/v1/completions", {"prompt": ""}, 422, ["empty"]),
    ("prompt id past the vocabulary", "/v1/completions", {"prompt": [1, 70000]}, 422, ["70000"]),
    ("negative prompt id", "/v1/completions", {"prompt": [-3]}, 422, ["-3"]),
    ("too many logprobs", "/v1/completions", {"prompt": "x", "logprobs": 100000}, 422, ["logprobs"]),
    ("negative logprobs", "/v1/completions", {"prompt": "x", "logprobs": -2}, 422, ["logprobs"]),
    ("stop string of 100k", CHAT, {"messages": USER, "stop": ["x" * 100000]}, 422, ["stop"]),
    ("lone surrogate", CHAT, {"messages": [{"role": "user", "content": "\ud800"}]}, 400, ["surrogate"]),
    ("logit_bias value", CHAT, {"messages": USER, "logit_bias": {"5": 1e9}}, 422, ["-100..100"]),
]


@pytest.mark.parametrize("name, path, body, status, words", BAD, ids=[b[0] for b in BAD])
def test_bad_values_are_4xx_not_500(server, name, path, body, status, words):
    base, _, proc = server
    assert_error(post(base, body, path), status, *words)
    still_serving(base, proc)


def test_a_tool_schema_thousands_deep_is_refused(server):
    base, _, proc = server
    body = '{"messages": [{"role": "user", "content": "x"}], "tools": [' + (
        '{"type":"object","properties":{"a":' * 5000 + "{}" + "}}" * 5000) + "]}"
    r = httpx.post(base + CHAT, content=body, headers={"content-type": "application/json"}, timeout=30)
    assert_error(r, 400, "deeper")
    nan = '{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}'
    assert_error(httpx.post(base + CHAT, content=nan, headers={"content-type": "application/json"}), 400, "NaN")
    still_serving(base, proc)


@pytest.mark.parametrize("ctype", [None, "text/plain", "application/x-www-form-urlencoded", "multipart/form-data"])
def test_only_json_bodies_are_accepted(server, ctype):
    # A web page may POST text/plain to a loopback port without a CORS preflight: it must not run.
    base, _, proc = server
    before = httpx.get(base + "/health").json()["completed"]
    headers = {"content-type": ctype} if ctype else {}
    r = httpx.post(base + CHAT, content=json.dumps({"messages": USER, "max_tokens": 2}), headers=headers)
    assert_error(r, 415, "application/json")
    assert httpx.get(base + "/health").json()["completed"] == before
    r = post(base, {"messages": USER, "max_tokens": 2}, content_type="application/json; charset=utf-8")
    assert r.status_code == 200


@pytest.mark.parametrize("path, body", [
    (CHAT, {"messages": USER, "max_tokens": 1}),
    ("/v1/completions", {"prompt": "Once upon", "max_tokens": 1}),
])
def test_repeating_a_prompt_with_max_tokens_1_does_not_poison_the_cache(server, path, body):
    base, _, _ = server
    for _ in range(3):
        r = post(base, {**body, "temperature": 0}, path)
        assert r.status_code == 200, r.text
    longer = post(base, {**body, "temperature": 0, "max_tokens": 4}, path)
    assert longer.status_code == 200, longer.text
    assert longer.json()["usage"]["completion_tokens"] >= 1


def test_logprobs_of_masked_tokens_are_finite_json(server):
    # A forced tool call constrains the reply by a grammar, which masks most tokens; the
    # reported logprobs are the model's own (before the mask), JSON numbers all the same.
    base, _, _ = server
    r = post(base, {"messages": USER, "max_tokens": 3, "tools": [deep_schema(1)], "tool_choice": "required",
                    "logprobs": True, "top_logprobs": 20})
    assert r.status_code == 200, r.text
    tops = [t["logprob"] for c in r.json()["choices"][0]["logprobs"]["content"] for t in c["top_logprobs"]]
    assert len(tops) == 60 and all(-9999.0 <= lp <= 0 for lp in tops)


def test_a_missing_max_tokens_is_bounded_by_the_default(server):
    base, _, _ = server
    r = post(base, {"messages": USER, "temperature": 0, "logit_bias": {"7": -100}})  # 7 = <|im_end|>
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 24
    assert r.json()["choices"][0]["finish_reason"] == "length"


def test_a_chunked_body_is_refused_while_it_arrives(server):
    # 512 MB announced by nothing but chunked encoding: the server must stop after its 4 MB limit.
    _, port, proc = server
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Transfer-Encoding: chunked\r\n\r\n")
    chunk = b"10000\r\n" + b" " * 65536 + b"\r\n"
    sent, pending, reply = 0, memoryview(chunk), b""
    s.setblocking(False)
    try:
        while sent < 64 * 2**20:
            readable, writable, _ = select.select([s], [s], [], 10)
            if readable:
                reply = s.recv(65536)
                break
            if writable:
                n = s.send(pending)
                sent += n
                pending = pending[n:] or memoryview(chunk)
    except (BrokenPipeError, ConnectionResetError):
        s.setblocking(True)
        reply = s.recv(65536)
    finally:
        s.close()
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    assert sent < 32 * 2**20  # the socket buffers hold a few MB beyond what the server read
    assert proc.poll() is None


def test_a_stalled_body_times_out_with_408(server):
    _, port, _ = server
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 100\r\n\r\n{\"messages\"")
        reply = b"".join(iter(lambda: s.recv(65536), b""))  # until the server closes
    assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
    assert b"request_timeout" in reply


def test_a_stalled_request_head_is_closed(server):
    _, port, _ = server
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")  # and nothing more
        assert s.recv(65536) == b""  # closed by the server (the client's 10 s timeout would raise)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        assert s.recv(65536) == b""  # connected, never sent a byte


def test_a_plain_reply_stops_when_its_client_hangs_up(server):
    base, _, proc = server
    before = httpx.get(base + "/health").json()
    with pytest.raises(httpx.ReadTimeout):  # the client gives up while tokens are still coming
        httpx.post(base + CHAT, json={"messages": [{"role": "user", "content": "a long one"}], "max_tokens": 30000,
                                      "logit_bias": {"7": -100}}, timeout=httpx.Timeout(30, read=1.0))
    for _ in range(50):
        h = httpx.get(base + "/health").json()
        if h["active"] == 0 and h["cancelled"] > before["cancelled"]:
            break
        time.sleep(0.1)
    assert h["active"] == 0 and h["cancelled"] == before["cancelled"] + 1, h
    still_serving(base, proc)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_the_server_with_requests_in_flight(folder, sig):
    # --max-batch 1: one request running, one queued, when the signal comes
    proc, base, _ = start_server(folder, "--max-context", "100000", "--max-batch", "1")
    body = {"messages": [{"role": "user", "content": "go"}], "max_tokens": 90000, "logit_bias": {"7": -100}}
    replies = []

    def call(stream):
        try:
            with httpx.stream("POST", base + CHAT, json={**body, "stream": stream}, timeout=60) as r:
                replies.append((r.status_code, b"".join(r.iter_bytes())))
        except httpx.HTTPError as e:  # the server may close the connection instead of answering
            replies.append((None, repr(e)))

    threads = [threading.Thread(target=call, args=(s,)) for s in (False, True)]
    for t in threads:
        t.start()
    try:
        for _ in range(100):
            h = httpx.get(base + "/health").json()
            if h["active"] == 1 and h["queued"] == 1:
                break
            time.sleep(0.05)
        assert h["active"] == 1 and h["queued"] == 1, h
        proc.send_signal(sig)
        proc.wait(20)
    finally:
        proc.kill()
    for t in threads:
        t.join(20)
    assert len(replies) == 2 and all(status != 500 for status, _ in replies), replies


def test_an_engine_value_error_before_the_first_token_is_a_400(chat_model):
    from mlx_lfm2.engine.sample import SamplingParams
    from mlx_lfm2.serve.boundary import APIError
    from mlx_lfm2.serve.scheduler import DONE, Job, Scheduler

    model, tok, _ = chat_model
    engine = Scheduler(model, tok, "m").start()

    async def run(settings):
        job = Job("hello", SamplingParams(**settings), None, asyncio.get_running_loop())
        engine.submit(job)
        items = []
        while (item := await job.out.get()) is not DONE:
            items.append(item)
        return items

    (err,) = asyncio.run(run({"max_tokens": 2, "temperature": -1}))
    assert isinstance(err, APIError) and err.status == 400 and "temperature" in err.message
    items = asyncio.run(run({"max_tokens": 2}))
    assert len(items) == 3 and items[-1][0].finish_reason == "length"  # 2 tokens, then the end
    engine.close()


@pytest.mark.slow
def test_sixty_fuzzed_requests_leave_the_server_up_without_5xx(tmp_path):
    from conftest import ROOT, reference_dir

    reference_dir()
    p = subprocess.run([sys.executable, "bench/fuzz_server.py", "--requests", "60", "--seed", "1"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "MLX_LFM2_BENCH_OUT": str(tmp_path)})
    report = json.loads(p.stdout.strip().splitlines()[-1])
    assert report["requests"] == 60 and report["crashes"] == 0 and report["5xx"] == 0, report
    assert report["stream_error_events"] == 0 and report["client_timeouts"] == 0, report
    assert report["still_serving"] and report["worker_idle_after"] and p.returncode == 0, report


def test_an_unexpected_fault_is_a_500_in_openai_shape_and_the_server_keeps_serving(scripted, monkeypatch):
    import mlx_lfm2.serve.service as service

    base, client, _ = scripted(" word" * 50)

    def broken(*a, **k):
        raise RuntimeError("a bug")

    monkeypatch.setattr(service, "parse_tool_calls", broken)
    monkeypatch.setattr(service.ToolCallStream, "feed", broken)
    body = {"messages": USER, "max_tokens": 4, "tools": [deep_schema(1)]}
    assert_error(post(base, body), 500, "RuntimeError")
    with httpx.stream("POST", base + CHAT, json={**body, "stream": True}, timeout=30) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert r.status_code == 200 and events[-1]["error"]["type"] == "server_error", events
    assert post(base, {"messages": USER, "max_tokens": 3}).json()["choices"][0]["message"]["content"] == " word" * 3
