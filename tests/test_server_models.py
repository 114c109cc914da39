"""Several models on one server (``serve/models.py``), through the real clients: a request's
``model`` picks one, a budget of one model swaps them (the other unloaded and loaded again,
replies unchanged, every unloaded model freed, memory back to its level), idle models unload
and free their memory, a model loaded again reads its prefix from the disk cache, unknown
names are 404s listing the names, and requests wait (boundedly) for a model being loaded or
for a busy one to finish."""

import asyncio
import functools
import threading
import time

import httpx
import mlx.core as mx
import pytest

from conftest import ScriptedModel, free_port, reference_dir, tiny_config

LONG = " ".join(f"Line {i}: the value of key {i} is {i * 7 % 13}." for i in range(60))  # > 256 tokens
ASK = [{"role": "user", "content": "Hello there"}]


@pytest.fixture(scope="module")
def folders(checkpoint):
    """Two tiny dense checkpoints that differ only in their random weights."""
    cfg = tiny_config("tiny-dense")
    return checkpoint(cfg, tokenizer=True, seed=1), checkpoint(cfg, tokenizer=True, seed=2)


@pytest.fixture
def server(tmp_path):
    """``server(*flags) -> (base url, models)``: the CLI's registry and app, in this process
    (so MLX's memory is the server's), on loopback; every model unloaded afterwards."""
    import uvicorn

    from mlx_lfm2.serve.app import arguments, create_app, registry
    from mlx_lfm2.serve.models import free_memory, retire

    started = []

    def start(*flags):
        models = registry(arguments([*flags, "--prompt-cache-dir", str(tmp_path / "prompt-cache")]))
        port = free_port()
        srv = uvicorn.Server(uvicorn.Config(create_app(models), host="127.0.0.1", port=port, log_level="warning"))
        threading.Thread(target=srv.run, daemon=True).start()
        while not srv.started:
            time.sleep(0.02)
        started.append((srv, models))
        return f"http://127.0.0.1:{port}", models

    yield start
    for srv, models in started:
        srv.should_exit = True
        for e in models.loaded():
            retire(e.scheduler)
            e.scheduler = None
    started.clear()
    free_memory()


def chat(base, model, messages=ASK, n=6, **extra):
    r = httpx.post(base + "/v1/chat/completions", timeout=120,
                   json={"model": model, "messages": messages, "max_tokens": n, "temperature": 0, **extra})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"], r.json()["usage"]


def loaded(base) -> list:
    return [m["name"] for m in httpx.get(base + "/api/ps").json()["models"]]


def wait_for(check, seconds: float = 60.0) -> None:
    """Poll ``check()`` until it holds; the bound only fails a state that never comes (a
    loaded machine makes the unload late, not wrong)."""
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, "the state never came"
        time.sleep(0.05)


def references(server, folders) -> dict:
    """Each model's greedy reply on a server of that model alone."""
    out = {}
    for name, folder in zip("ab", folders):
        base, _ = server("--model", str(folder))
        out[name] = chat(base, "anything")[0]
    return out


def test_a_budget_of_one_swaps_the_models_and_the_replies_stay_those_of_one_model_servers(server, folders):
    want = references(server, folders)
    assert want["a"] != want["b"]  # else a request served by the wrong model could pass
    from mlx_lfm2.serve.models import weight_files_bytes

    budget = weight_files_bytes(str(folders[0])) * 3 // 2  # one model fits, two do not
    base, models = server("--model", f"a={folders[0]}", "--model", f"b={folders[1]}", "--memory-budget", str(budget))
    assert [m["id"] for m in httpx.get(base + "/v1/models").json()["data"]] == ["a", "b"]
    assert [m["name"] for m in httpx.get(base + "/api/tags").json()["models"]] == ["a", "b"]
    assert loaded(base) == ["a"]  # the first --model loads at startup
    for name in "abab":
        assert chat(base, name)[0] == want[name]
        assert loaded(base) == [name]
    ps = httpx.get(base + "/api/ps").json()["models"][0]
    assert ps["size"] == ps["size_vram"] == models.entries["b"].size > 0
    assert ps["expires_at"].startswith("2318")  # no keep-alive: kept


def test_without_a_model_name_the_first_answers(server, folders):
    base, _ = server("--model", f"a={folders[0]}", "--model", f"b={folders[1]}")
    r = httpx.post(base + "/v1/chat/completions", json={"messages": ASK, "max_tokens": 6, "temperature": 0})
    assert r.status_code == 200 and r.json()["model"] == "a"


@pytest.mark.slow
def test_repeated_swaps_free_every_unloaded_model_and_leak_no_memory(server, folders):
    """Twelve swaps: each unloaded model object is gone (a weak reference to it dies), so any
    reference kept to a model, whatever its size, fails at the first swap; and MLX's active
    memory ends within weights/8 of its level, so a leak of over weights/96 a swap fails too."""
    import gc
    import weakref

    base, models = server("--model", f"a={folders[0]}", "--model", f"b={folders[1]}", "--max-loaded-models", "1",
                          "--prompt-cache-bytes", "0")
    want = {}
    for name in "ab":
        want[name] = chat(base, name, n=1)[0]
    level = mx.get_active_memory()  # b loaded, a unloaded, each run once
    weights = models.entries["b"].size
    unloaded = []
    for i in range(12):
        name, other = "ab"[i % 2], "ab"[(i + 1) % 2]
        e = models.entries[other]  # loaded, idle: this request unloads it
        unloaded.append((weakref.ref(e.scheduler), weakref.ref(e.scheduler.model)))
        del e
        assert chat(base, name, n=1)[0] == want[name]
        assert loaded(base) == [name]
    gc.collect()
    assert [(s() is None, m() is None) for s, m in unloaded] == [(True, True)] * 12
    assert abs(mx.get_active_memory() - level) < weights // 8, (mx.get_active_memory(), level, weights)


def test_idle_unload_frees_the_models_memory(server, folders):
    base, models = server("--model", f"a={folders[0]}", "--idle-unload", "0.5")
    weights = models.entries["a"].size
    chat(base, "a")
    held = mx.get_active_memory()
    wait_for(lambda: loaded(base) == [])
    assert held - mx.get_active_memory() >= weights * 0.9
    assert chat(base, "a")[0]  # loaded again on the next request
    assert loaded(base) == ["a"]


def test_keep_alive_0_unloads_after_the_reply_and_a_duration_sets_the_expiry(server, folders):
    ollama = pytest.importorskip("ollama")
    base, _ = server("--model", f"a={folders[0]}", "--model", f"b={folders[1]}")
    client = ollama.Client(host=base)
    client.chat(model="b", messages=ASK, options={"num_predict": 3}, keep_alive="10m")
    expiry = {m.model: m.expires_at for m in client.ps().models}
    assert set(expiry) == {"a", "b"} and expiry["b"].year < 2300
    client.chat(model="b", messages=ASK, options={"num_predict": 3}, keep_alive=0)
    wait_for(lambda: loaded(base) == ["a"])
    assert client.generate(model="b").done_reason == "load"  # no prompt: Ollama's way to load a model
    assert sorted(loaded(base)) == ["a", "b"]
    assert client.generate(model="b", keep_alive=0).done_reason == "unload"
    wait_for(lambda: loaded(base) == ["a"])
    bad = httpx.post(base + "/v1/chat/completions", json={"model": "a", "messages": ASK, "keep_alive": "soon"})
    assert bad.status_code == 400 and "keep_alive" in bad.json()["error"]["message"]


def test_an_unknown_model_is_a_404_listing_the_names_in_each_apis_shape(server, folders):
    import anthropic
    import openai

    ollama = pytest.importorskip("ollama")
    base, _ = server("--model", f"a={folders[0]}", "--model", f"b={folders[1]}")
    says = "model 'gpt-4' not found: this server serves 'a', 'b'"
    with pytest.raises(openai.NotFoundError) as e:
        openai.OpenAI(base_url=base + "/v1", api_key="x").chat.completions.create(model="gpt-4", messages=ASK)
    assert e.value.body["message"] == says and e.value.body["code"] == "model_not_found"
    with pytest.raises(anthropic.NotFoundError) as e:
        anthropic.Anthropic(base_url=base, api_key="x").messages.create(model="gpt-4", max_tokens=4, messages=ASK)
    assert e.value.body == {"type": "error", "error": {"type": "not_found_error", "message": says}}
    with pytest.raises(ollama.ResponseError) as e:
        ollama.Client(host=base).chat(model="gpt-4", messages=ASK)
    assert e.value.status_code == 404 and e.value.error == says
    r = httpx.post(base + "/v1/responses", json={"model": "gpt-4", "input": "hi"})
    assert r.status_code == 404 and r.json()["error"]["message"] == says
    assert httpx.get(base + "/v1/models/gpt-4").status_code == 404


def test_the_ollama_client_picks_models_by_name(server, folders):
    ollama = pytest.importorskip("ollama")
    want = references(server, folders)
    base, _ = server("--model", f"a={folders[0]}", "--model", f"b={folders[1]}")
    client = ollama.Client(host=base)
    assert [m.model for m in client.list().models] == ["a", "b"]
    for name in "ba":
        got = client.chat(model=name, messages=ASK, options={"num_predict": 6, "temperature": 0})
        assert got.message.content == want[name] and got.model == name
        streamed = client.generate(model=name, prompt="Hello there", stream=True,
                                   options={"num_predict": 6, "temperature": 0})
        assert "".join(p.response for p in streamed) == want[name]
    assert sorted(m.model for m in client.ps().models) == ["a", "b"]
    assert client.show("b").modelinfo["context_length"] > 0
    from prometheus_client.parser import text_string_to_metric_families

    gauges = {f.name: f.samples for f in text_string_to_metric_families(httpx.get(base + "/metrics").text)}
    assert gauges["mlx_lfm2_resident_models"][0].value == 2
    assert sorted(x.labels["model"] for x in gauges["mlx_lfm2_resident_model_bytes"]) == ["a", "b"]


def test_ollama_show_reads_a_model_not_loaded_from_its_folder_and_loads_nothing(server, folders):
    ollama = pytest.importorskip("ollama")
    base, models = server("--model", f"a={folders[0]}", "--model", f"b={folders[1]}", "--max-context", "4096")
    client = ollama.Client(host=base)
    cold = client.show("b")
    assert loaded(base) == ["a"] and models.entries["b"].scheduler is None  # shown, not loaded
    assert cold.template == (reference_dir() / "chat_template.jinja").read_text() and "<|im_start|>" in cold.template
    assert cold.modelinfo["context_length"] == cold.modelinfo["lfm2.context_length"] == 4096
    assert cold.modelinfo["lfm2.block_count"] == tiny_config("tiny-dense")["num_hidden_layers"]
    chat(base, "b")
    assert loaded(base) == ["a", "b"]
    assert client.show("b").model_dump() == cold.model_dump()  # the folder says what the loaded model does
    with pytest.raises(ollama.ResponseError, match="not found"):
        client.show("c")


def test_a_model_loaded_again_reads_its_prefix_from_the_disk_cache(server, folders):
    base, _ = server("--model", f"a={folders[0]}", "--model", f"b={folders[1]}", "--max-loaded-models", "1")
    long = [{"role": "system", "content": LONG}, {"role": "user", "content": "Key 5?"}]
    first, use = chat(base, "a", long)
    assert use["prompt_tokens"] > 300 and use["prompt_tokens_details"]["cached_tokens"] == 0
    chat(base, "b")  # a is unloaded: its caches live on only on disk
    assert loaded(base) == ["b"]
    again, use = chat(base, "a", long)
    assert loaded(base) == ["a"]
    assert use["prompt_tokens_details"]["cached_tokens"] >= 256 and again == first
    assert httpx.get(base + "/health").json()["prompt_cache_disk"]["blocks_read"] >= 1


def test_models_dir_lists_every_model_folder_and_loads_each_on_first_use(server, folders, tmp_path):
    root = tmp_path / "models"
    root.mkdir()
    for name, folder in zip(("one", "two"), folders):
        (root / name).symlink_to(folder, target_is_directory=True)
    (root / "notes").mkdir()  # no config.json: not a model
    base, _ = server("--models-dir", str(root))
    assert [m["id"] for m in httpx.get(base + "/v1/models").json()["data"]] == ["one", "two"]
    assert loaded(base) == []
    chat(base, "two")
    assert loaded(base) == ["two"]


def test_model_flags_name_models_and_refuse_duplicates(tmp_path, folders):
    from mlx_lfm2.serve.app import model_paths

    assert model_paths([f"x={folders[0]}", str(folders[1])], None) == {"x": f"{folders[0]}",
                                                                        folders[1].name: str(folders[1])}
    assert model_paths(["LiquidAI/LFM2-350M"], None) == {"LiquidAI/LFM2-350M": "LiquidAI/LFM2-350M"}
    with pytest.raises(ValueError, match="two models are named 'x'"):
        model_paths([f"x={folders[0]}", f"x={folders[1]}"], None)
    with pytest.raises(ValueError, match="no model folders"):
        model_paths([], str(tmp_path))


def test_keep_alive_reads_seconds_and_durations():
    from mlx_lfm2.serve.boundary import APIError
    from mlx_lfm2.serve.models import parse_keep_alive

    assert [parse_keep_alive(v) for v in (0, 30, "45", "5m", "1h30m", "300ms", -1, "-1m", "1e300", "inf")] == [
        0.0, 30.0, 45.0, 300.0, 5400.0, 0.3, None, None, None, None]  # huge: for ever (/api/ps can show it)
    for bad in ("soon", "", "5 m", True, [1], "nan", float("nan")):
        with pytest.raises(APIError, match="keep_alive"):
            parse_keep_alive(bad)


# The registry's waiting rules, on stand-in models ---------------------------------------------

def _registry(build, **kw):
    from mlx_lfm2.serve.models import Models

    return Models({"a": "a", "b": "b"}, build, **kw)


@functools.lru_cache(maxsize=1)
def _tokenizer():
    from mlx_lfm2.text.tokenizer import load_tokenizer

    return load_tokenizer(reference_dir())  # once: seconds on a loaded machine, which the timings below are not about


def _scheduler(name):
    from mlx_lfm2.serve.scheduler import Scheduler

    return Scheduler(ScriptedModel([5]), _tokenizer(), name)


async def _holding(models, name, release: asyncio.Event):
    """A request for ``name`` that holds it until ``release``."""
    from mlx_lfm2.serve.models import _held

    held = []
    _held.set(held)
    e = await models.acquire(models.entries[name])
    await release.wait()
    for x in held:
        models._release(x)
    return e


async def _until(check, seconds: float = 60.0) -> None:
    """Wait for ``check()``, polling; the bound only fails a state that never comes."""
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, "the state never came"
        await asyncio.sleep(0.02)


def test_a_model_being_loaded_makes_its_requests_wait_with_a_bound():
    """The load is held by an event, not a sleep: the request's 0.2 s bound passes while the
    load is surely unfinished (a 503), the load goes on without it (built once), and a
    request with room to wait gets the loaded model."""
    from mlx_lfm2.serve.boundary import APIError

    _tokenizer()  # loaded before any bound is timed
    gate, builds = threading.Event(), []

    def slow(name, path):
        builds.append(name)
        assert gate.wait(60)
        return _scheduler(name)

    async def run():
        models = _registry(slow, load_timeout=0.2)
        with pytest.raises(APIError) as e:
            await models.acquire(models.entries["a"])
        assert e.value.status == 503 and "not loaded yet (waited 0.2 s)" in str(e.value)
        assert models.entries["a"].loading is not None and not gate.is_set()  # the load goes on
        models.load_timeout = 60
        gate.set()
        go = asyncio.Event()
        go.set()
        assert (await _holding(models, "a", go)).scheduler is not None
        assert builds == ["a"]  # the load the first request started, not a second one
        for e in models.loaded():
            e.scheduler.shutdown()

    asyncio.run(run())


def test_a_busy_model_is_never_unloaded_the_load_waits_for_it():
    """Order, not time: b's model is built only after a's request let go of a (a broken rule
    builds it, unloading a, within the 0.3 s window); no bound here can pass too early."""
    _tokenizer()
    events = []

    def build(name, path):
        events.append(f"build {name}")
        return _scheduler(name)

    async def run():
        models = _registry(build, max_loaded=1, load_timeout=60)
        done_a = asyncio.Event()
        a = asyncio.ensure_future(_holding(models, "a", done_a))
        await _until(lambda: models.entries["a"].scheduler is not None)  # a loads, and is held
        b = asyncio.ensure_future(_holding(models, "b", asyncio.Event()))
        await _until(lambda: models.entries["b"].loading is not None)  # b's load has begun: it waits for room
        await asyncio.sleep(0.3)
        assert [e.name for e in models.loaded()] == ["a"] and not b.done()  # waiting for a to finish
        events.append("release a")
        done_a.set()
        await a
        await _until(lambda: [e.name for e in models.loaded()] == ["b"])
        assert events == ["build a", "release a", "build b"]
        b.cancel()
        for e in models.loaded():
            e.scheduler.shutdown()

    asyncio.run(run())


def test_a_config_json_that_is_not_an_object_reads_as_no_config(tmp_path):
    """/api/show and the registry read config.json of folders not loaded: a list or a number
    there is no config (not an AttributeError, a 500, on ``.get``)."""
    from mlx_lfm2.serve.models import folder_config

    (tmp_path / "config.json").write_text("[1, 2]")
    assert folder_config(str(tmp_path)) == {}
    (tmp_path / "config.json").write_text('{"model_type": "lfm2"}')
    assert folder_config(str(tmp_path)) == {"model_type": "lfm2"}
