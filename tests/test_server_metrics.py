"""Observability: the per-request log line and ``GET /metrics``, parsed by prometheus_client."""

import threading
import time

import httpx
import pytest

from conftest import free_port, start_server, tiny_config

openai = pytest.importorskip("openai")
parser = pytest.importorskip("prometheus_client.parser")


@pytest.fixture(scope="module")
def live(chat_model):
    import uvicorn

    from mlx_lfm2.serve.app import create_app
    from mlx_lfm2.serve.scheduler import Scheduler

    model, tok, _ = chat_model
    lines = []
    engine = Scheduler(model, tok, "local-lfm2", queue_size=4, max_context=2048)
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(create_app(engine, log=lines.append), host="127.0.0.1", port=port,
                                        log_level="warning"))
    threading.Thread(target=srv.run, daemon=True).start()
    while not srv.started:
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}", lines
    srv.should_exit = True


def samples(base):
    reply = httpx.get(base + "/metrics")
    assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/plain")
    out = {}
    for family in parser.text_string_to_metric_families(reply.text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_requests_are_logged_and_counted(live):
    base, lines = live
    client = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0)
    secret = "a secret the log must not show"
    msgs = [{"role": "user", "content": secret}]
    plain = client.chat.completions.create(model="m", messages=msgs, max_tokens=6, temperature=0)
    streamed = list(client.chat.completions.create(model="m", messages=msgs, max_tokens=6, temperature=0,
                                                   stream=True, stream_options={"include_usage": True}))
    usage = [plain.usage, streamed[-1].usage]
    assert httpx.get(base + "/no/such/path").status_code == 404

    logged = [line for line in lines if "/v1/chat/completions" in line]
    assert len(logged) == 2 and not any(secret in line for line in lines)
    for line, u in zip(logged, usage):
        assert line.startswith("request req-") and "status=200" in line and "model=local-lfm2" in line
        assert f"prompt={u.prompt_tokens} " in line and f"generated={u.completion_tokens} " in line
        assert "ttft=" in line and "cached=" in line

    m = samples(base)
    route = lambda path, status: (("route", path), ("status", status))  # noqa: E731
    assert m[("mlx_lfm2_requests_total", route("/v1/chat/completions", "200"))] == 2
    assert m[("mlx_lfm2_requests_total", route("other", "404"))] == 1
    generated = sum(u.completion_tokens for u in usage)
    assert m[("mlx_lfm2_generation_tokens_total", ())] == generated
    assert m[("mlx_lfm2_prompt_tokens_total", ())] == sum(u.prompt_tokens for u in usage)
    assert m[("mlx_lfm2_prompt_cache_hit_tokens_total", ())] > 0  # the second request reused the first's
    assert m[("mlx_lfm2_time_to_first_token_seconds_count", ())] == 2
    assert m[("mlx_lfm2_inter_token_seconds_count", ())] == generated - 2
    assert m[("mlx_lfm2_queue_depth", ())] == 0 and m[("mlx_lfm2_batch_capacity", ())] == 8
    assert m[("mlx_lfm2_resident_models", ())] == 1
    assert m[("mlx_lfm2_resident_model_bytes", (("model", "local-lfm2"),))] > 0
    assert m[("mlx_lfm2_mlx_peak_memory_bytes", ())] >= m[("mlx_lfm2_mlx_active_memory_bytes", ())] > 0


@pytest.mark.slow
def test_startup_line_and_log_content(checkpoint):
    folder = checkpoint(tiny_config("tiny-moe"), tokenizer=True)
    proc, base, port = start_server(folder, "--log-content", "--max-context", "2048")
    try:
        httpx.post(base + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "say hi"}],
                                                         "max_tokens": 3}, timeout=60).raise_for_status()
    finally:
        proc.terminate()
        out = proc.communicate(timeout=20)[0].decode()
    assert f"listening on http://127.0.0.1:{port} model={folder.name} weights=" in out
    assert "'say hi" in out or "say hi" in out
    assert "status=200" in out and "reply: " in out
