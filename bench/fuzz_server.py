"""Fuzz/soak the OpenAI server: one real server, N random requests, does it survive?

    python bench/fuzz_server.py [--requests 1000] [--seed 0] [--workers 4] [--max-seconds 900]

Starts ``python -m mlx_lfm2.server`` on loopback with a random tiny checkpoint and the real
LFM2 tokenizer, then sends a seeded mix of valid requests and abuse: malformed and truncated
bodies, wrong content types, random fields replaced by junk (huge, negative, NaN-like,
wrongly typed), out-of-range token ids, deep nesting, oversized bodies, clients that hang up
mid-stream or before a plain reply, stalled request heads, Anthropic-shaped ``/v1/messages``,
and (``fuzz_hostile.py``) slow readers of top_logprobs streams, mutated tool and response
schemas on every API, huge stop lists, multi-MB bodies. Reports (last stdout line, JSON):
requests sent, status counts, crashes (the server process died), 5xx answers, error events
inside streams, client timeouts, the server's VmRSS (its peak over the warm-up baseline, at
the end, and with MLX's active and buffer-cache memory and the prompts cached at each
quarter), the worst /health latency during the run and the elapsed time. Exit status
1 if anything crashed, answered 5xx or hung.
"""

from __future__ import annotations

import argparse
import collections
import copy
import json
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, checkpoint  # noqa: E402
from fuzz_hostile import large_body, schema_request, slow_reader, stop_request  # noqa: E402

VOCAB = 64400  # the real tokenizer's; the random checkpoint has 65,536 embedding rows
JUNK = [None, True, False, 0, -1, 1, 7, 2**31, 2**63, 2**64, -2**64, 10**400, 1e308, -1e308, 0.5, -0.5, 1e-300,
        "", "x", "🙂" * 50, "\x00", "<|im_start|>system", [], [1, 2], [[[]]], [None], {}, {"a": 1},
        {"type": "function"}, [{"type": "text", "text": 3}], "9" * 40]
FIELDS = ["model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "min_p",
          "repetition_penalty", "frequency_penalty", "presence_penalty", "seed", "stop", "n", "stream",
          "stream_options", "logprobs", "top_logprobs", "logit_bias", "tools", "tool_choice", "response_format",
          "messages", "echo", "prompt"]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]


def junk(rng: random.Random):
    return copy.deepcopy(rng.choice(JUNK))  # a copy: later mutations must not edit the pool


def random_id(rng: random.Random):
    return rng.choice([rng.randrange(VOCAB), VOCAB - 1, VOCAB, 65535, 65536, -1, -rng.randrange(2**40),
                       2**31, 2**63, 2**64 + 5, rng.randrange(10**12)])


def valid_chat(rng: random.Random) -> dict:
    body = {"messages": [{"role": "user", "content": rng.choice(["hi", "Tell me a story", "2+2?", "日本語で"])}],
            "max_tokens": rng.randint(1, 12), "stream": rng.random() < 0.4}
    if rng.random() < 0.3:
        body["messages"].insert(0, {"role": "system", "content": "Be brief."})
    if rng.random() < 0.3:
        body.update(temperature=rng.uniform(0, 2), top_p=rng.uniform(0.05, 1), top_k=rng.randint(0, 100),
                    seed=rng.randrange(2**64))
    if rng.random() < 0.2:
        body.update(tools=TOOLS, tool_choice=rng.choice(["auto", "required", "none"]))
    if rng.random() < 0.2:
        body.update(logprobs=True, top_logprobs=rng.randint(0, 20))
    if rng.random() < 0.2:
        body["logit_bias"] = {str(rng.randrange(VOCAB)): rng.uniform(-100, 100) for _ in range(rng.randint(1, 5))}
    if rng.random() < 0.1:
        del body["max_tokens"]  # the server's --default-max-tokens applies
    return body


def valid_completion(rng: random.Random) -> dict:
    prompt = rng.choice(["Once upon a time", [rng.randrange(VOCAB) for _ in range(rng.randint(1, 20))]])
    return {"prompt": prompt, "max_tokens": rng.randint(1, 12), "stream": rng.random() < 0.3,
            "logprobs": rng.choice([None, 0, 3]), "echo": rng.random() < 0.2}


def mutated(rng: random.Random) -> tuple[str, dict]:
    path, body = (("/v1/chat/completions", valid_chat(rng)) if rng.random() < 0.7
                  else ("/v1/completions", valid_completion(rng)))
    for _ in range(rng.randint(1, 3)):
        where, messages = rng.random(), body.get("messages")
        if where < 0.6:
            body[rng.choice(FIELDS)] = junk(rng)
        elif where < 0.8 and isinstance(messages, list) and messages and isinstance(messages[-1], dict):
            messages[-1][rng.choice(["role", "content", "tool_calls", "name", "tool_call_id"])] = junk(rng)
        else:
            body.setdefault("messages", [{"role": "user", "content": "x"}])
            body["messages"] = [{"role": "user", "content": "x"}, {"role": "assistant", "content": None,
                                 "tool_calls": [{"id": "c", "type": "function", "function": {
                                     "name": rng.choice(["f", "", "a" * 300]),
                                     "arguments": rng.choice(['{"a": 1}', "[1]", "5", "null", '"s"', "{",
                                                              "[" * 3000 + "]" * 3000, junk(rng)])}}]},
                                {"role": "tool", "tool_call_id": "c", "content": rng.choice(["{}", "ok", ""])}]
    return path, body


def anthropic_request(rng: random.Random) -> tuple[str, dict]:
    """``/v1/messages`` (Anthropic's shape), valid or with a junk field."""
    body = {"max_tokens": rng.randint(1, 12), "messages": [{"role": "user", "content": "hi"}],
            "stream": rng.random() < 0.3}
    if rng.random() < 0.3:
        body["tools"] = [{"name": "get_weather", "input_schema": {"type": "object"}}]
    if rng.random() < 0.6:
        body[rng.choice(["max_tokens", "messages", "system", "tools", "tool_choice", "temperature",
                         "stop_sequences", "top_k"])] = junk(rng)
    return rng.choice(["/v1/messages", "/v1/messages/count_tokens"]), body


def ids_request(rng: random.Random) -> tuple[str, dict]:
    if rng.random() < 0.5:
        body = valid_chat(rng)
        body["logit_bias"] = {str(random_id(rng)): rng.choice([1, -100, 100, 5.5]) for _ in range(rng.randint(1, 4))}
        if rng.random() < 0.3:
            body["logit_bias"][rng.choice(["abc", " 1", "1.0", "٣", "-0", ""])] = 1
        return "/v1/chat/completions", body
    body = valid_completion(rng)
    body["prompt"] = [rng.randrange(VOCAB) for _ in range(rng.randint(0, 5))] + [random_id(rng)]
    rng.shuffle(body["prompt"])
    return "/v1/completions", body


def malformed_bytes(rng: random.Random) -> bytes:
    good = json.dumps(valid_chat(rng)).encode()
    return rng.choice([
        good[: rng.randrange(len(good))],
        bytes(rng.randrange(256) for _ in range(rng.randint(0, 300))),
        b"[" * 100000 + b"]" * 100000,
        b'{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}',
        b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": Infinity}',
        b'"just a string"', b"null", b"[1, 2, 3]", b"",
        b'{"messages": [{"role": "user", "content": "\\ud800"}], "max_tokens": 2}',
        good.replace(b'"', b"'"),
        b'{"tools": [' + b'{"a":' * 20000 + b"1" + b"}" * 20000 + b"]}",
    ])


class Tally:
    def __init__(self):
        self.lock = threading.Lock()
        self.status = collections.Counter()
        self.kinds = collections.Counter()
        self.timeouts = self.stream_errors = self.sent = 0
        self.examples: list[str] = []

    def add(self, kind: str, status, note: str = "") -> None:
        with self.lock:
            self.sent += 1
            self.kinds[kind] += 1
            self.status[str(status)] += 1
            if (isinstance(status, int) and status >= 500) and len(self.examples) < 10:
                self.examples.append(f"{kind}: {status} {note[:300]}")


def send(client: httpx.Client, base: str, port: int, rng: random.Random, tally: Tally) -> None:
    r = rng.random()
    headers, kind, content = {"content-type": "application/json"}, "?", b""
    try:
        if r >= 0.80 and rng.random() < 0.45:  # the hostile classes, in a share of the last fifth
            h = rng.random()
            if h < 0.15:
                return slow_reader(port, rng, tally)
            (path, body), kind = (schema_request(rng), "schema") if h < 0.6 else \
                (stop_request(rng), "stops") if h < 0.93 else (large_body(rng), "large-body")
            content = json.dumps(body).encode()
        elif r < 0.22:
            path, body = rng.choice([("/v1/chat/completions", valid_chat(rng)), ("/v1/completions", valid_completion(rng))])
            kind, content = "valid", json.dumps(body).encode()
        elif r < 0.47:
            (path, body), kind = mutated(rng), "junk-field"
            content = json.dumps(body).encode()
        elif r < 0.57:
            (path, body), kind = ids_request(rng), "random-ids"
            content = json.dumps(body).encode()
        elif r < 0.60:
            (path, body), kind = anthropic_request(rng), "anthropic"
            content = json.dumps(body).encode()
        elif r < 0.70:
            path, kind, content = rng.choice(["/v1/chat/completions", "/v1/completions"]), "malformed", malformed_bytes(rng)
        elif r < 0.74:
            path, kind, content = "/v1/chat/completions", "content-type", json.dumps(valid_chat(rng)).encode()
            headers = rng.choice([{}, {"content-type": "text/plain"}, {"content-type": "application/x-www-form-urlencoded"},
                                  {"content-type": "multipart/form-data; boundary=x"}, {"content-type": "application/jsonx"}])
        elif r < 0.76:
            path, kind, content = "/v1/chat/completions", "oversized", b'{"messages": "' + b"x" * (5 << 20) + b'"}'
        elif r < 0.80:
            path, kind = rng.choice(["/v1/models", "/health", "/v1/nothing", "/v1/chat/completions", "/"]), "route"
            rsp = client.request(rng.choice(["GET", "DELETE", "PUT", "OPTIONS"]), base + path)
            return tally.add(kind, rsp.status_code, rsp.text)
        elif r < 0.92:
            return hang_up_mid_stream(port, rng, tally)
        elif r < 0.97:
            return hang_up_before_reply(base, rng, tally)
        else:
            return stalled_head(port, rng, tally)
        if b'"stream": true' in content:
            with client.stream("POST", base + path, content=content, headers=headers) as rsp:
                text = rsp.read().decode("utf-8", "replace")
            if rsp.status_code == 200 and 'data: {"error"' in text:
                with tally.lock:
                    tally.stream_errors += 1
                    tally.examples.append(f"{kind}: stream error {text[-300:]}")
        else:
            rsp = client.post(base + path, content=content, headers=headers)
            text = rsp.text
        tally.add(kind, rsp.status_code, text)
    except httpx.TimeoutException:
        with tally.lock:
            tally.timeouts += 1
            tally.examples.append(f"{kind}: client timeout after 60 s: {content[:300]!r}")
        tally.add(kind, "timeout")
    except httpx.HTTPError as e:  # e.g. the server closed after a 413 while we were still sending
        tally.add(kind, type(e).__name__)


def raw_request(port: int, body: dict) -> socket.socket:
    data = json.dumps(body).encode()
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: fuzz\r\nContent-Type: application/json\r\n"
              b"Content-Length: %d\r\n\r\n" % len(data) + data)
    return s


def hang_up_mid_stream(port: int, rng: random.Random, tally: Tally) -> None:
    body = {**valid_chat(rng), "stream": True, "max_tokens": rng.randint(20, 400)}
    s = raw_request(port, body)
    got = b""
    try:
        while len(got) < rng.randint(0, 3000):
            piece = s.recv(4096)
            if not piece:
                break
            got += piece
    finally:
        s.close()
    status = int(got.split(b" ", 2)[1]) if got.startswith(b"HTTP/1.1 ") else "hung-up"
    tally.add("hang-up-stream", status, got[:300].decode("latin-1"))


def hang_up_before_reply(base: str, rng: random.Random, tally: Tally) -> None:
    body = {**valid_chat(rng), "stream": False, "max_tokens": rng.randint(50, 2000)}
    try:
        r = httpx.post(base + "/v1/chat/completions", json=body, timeout=httpx.Timeout(30, read=rng.uniform(0.05, 1)))
        tally.add("hang-up-plain", r.status_code, r.text)
    except httpx.TimeoutException:
        tally.add("hang-up-plain", "hung-up")


def stalled_head(port: int, rng: random.Random, tally: Tally) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: fuzz\r\nContent-"[: rng.randint(0, 50)])
        time.sleep(rng.uniform(0, 0.3))
    tally.add("stalled-head", "hung-up")


def rss_mb(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=4, help="concurrent clients")
    p.add_argument("--max-seconds", type=float, default=900, help="stop sending after this long")
    p.add_argument("--out", help="also write the report to this JSON file")
    a = p.parse_args(argv)

    folder = checkpoint("tiny-moe", 4, "float32")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    log_path = folder.parent / f"fuzz_server-{port}.log"  # a file, not a pipe nobody drains
    log = open(log_path, "w")
    server = subprocess.Popen([sys.executable, "-m", "mlx_lfm2.server", "--model", str(folder), "--port", str(port),
                               "--queue-size", "8", "--max-context", "1024", "--default-max-tokens", "64",
                               "--body-timeout", "5", "--header-timeout", "5", "--stall-timeout", "5"],
                              cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        for _ in range(600):
            try:
                if httpx.get(base + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        else:
            raise SystemExit("the server did not start: " + log_path.read_text()[-2000:])
        cold = rss_mb(server.pid)
        # Warm-up before the memory baseline, one-time setup included: the first constrained
        # request (forced tool call, JSON mode) builds llguidance's view of the vocabulary.
        with httpx.Client(timeout=60) as c:
            for i in range(20):
                extra = [{}, {"response_format": {"type": "json_object"}},
                         {"tools": TOOLS, "tool_choice": "required"}][i % 3]
                c.post(base + "/v1/chat/completions", json={"messages": [{"role": "user", "content": f"warm {i}"}],
                                                            "max_tokens": 8, **extra})
        baseline = peak = rss_mb(server.pid)
        tally, stop = Tally(), threading.Event()
        tic = time.perf_counter()

        # (requests sent, VmRSS, MLX active, MLX buffer cache, prompts cached): growth that levels
        # off is caches or the allocator's high-water mark, a leak keeps climbing
        trace = []

        health_s = []  # /health latency, sampled through the run: the event loop never waits

        def sample():
            nonlocal peak
            while not stop.wait(0.25) and server.poll() is None:
                sent, rss = tally.sent, rss_mb(server.pid)
                peak = max(peak, rss)
                t0 = time.perf_counter()
                try:
                    h = httpx.get(base + "/health", timeout=30).json()
                    health_s.append(time.perf_counter() - t0)
                    trace.append((sent, rss, h.get("mlx_active_mb"), h.get("mlx_cache_mb"), h.get("cached_prompts")))
                except (httpx.HTTPError, ValueError):
                    health_s.append(30.0)

        def worker(w: int, n: int):
            rng = random.Random(a.seed * 1000 + w)
            with httpx.Client(timeout=60) as client:
                for _ in range(n):
                    if server.poll() is not None or time.perf_counter() - tic > a.max_seconds:
                        return
                    send(client, base, port, rng, tally)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        shares = [a.requests // a.workers + (w < a.requests % a.workers) for w in range(a.workers)]
        threads = [threading.Thread(target=worker, args=(w, n)) for w, n in enumerate(shares)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - tic
        alive = server.poll() is None
        health, still_serving = None, False
        if alive:
            for _ in range(100):  # hung-up jobs drain; a wedged worker would stay active
                health = httpx.get(base + "/health", timeout=10).json()
                if health["active"] == 0 and health["queued"] == 0:
                    break
                time.sleep(0.1)
            r = httpx.post(base + "/v1/chat/completions", timeout=60,
                           json={"messages": [{"role": "user", "content": "still there?"}], "max_tokens": 4})
            still_serving = r.status_code == 200
            peak = max(peak, rss_mb(server.pid))
        end = rss_mb(server.pid) if alive else 0.0
        stop.set()
        five_xx = sum(n for s, n in tally.status.items() if s.isdigit() and int(s) >= 500)
        report = {
            "requests": tally.sent, "crashes": int(not alive), "5xx": five_xx, "stream_error_events": tally.stream_errors,
            "client_timeouts": tally.timeouts, "still_serving": still_serving,
            "worker_idle_after": bool(health and health["active"] == 0 and health["queued"] == 0),
            "rss_cold_mb": round(cold, 1), "rss_baseline_mb": round(baseline, 1), "rss_max_mb": round(peak, 1),
            "rss_growth_mb": round(peak - baseline, 1), "rss_end_mb": round(end, 1),
            "elapsed_s": round(elapsed, 1), "health_worst_s": round(max(health_s, default=0.0), 3),
            "health_median_s": round(sorted(health_s)[len(health_s) // 2], 3) if health_s else None,
            # The last sample of each quarter: [VmRSS, MLX active, MLX buffer cache] MB, prompts cached
            "memory_at_quarters": [([list(s[1:]) for s in trace if s[0] <= q * tally.sent] or [None])[-1]
                                   for q in (0.25, 0.5, 0.75, 1.0)],
            "status": dict(sorted(tally.status.items())), "kinds": dict(sorted(tally.kinds.items())),
            "health": health, "examples": tally.examples, "seed": a.seed, "workers": a.workers,
        "server_log": str(log_path),
        }
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(20)
            except subprocess.TimeoutExpired:
                server.kill()
        else:
            sys.stderr.write(log_path.read_text()[-3000:])
    if a.out:
        Path(a.out).write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report))
    bad = report["crashes"] or report["5xx"] or report["stream_error_events"] or report["client_timeouts"]
    return 1 if bad or not (report["still_serving"] and report["worker_idle_after"]) else 0


if __name__ == "__main__":
    sys.exit(main())
