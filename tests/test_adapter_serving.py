"""Several adapters on one server (``--adapter NAME=PATH``): mixed batches equal each request
alone on a server with only its adapter; hot load and unload; bad adapters and paths refused;
prompt caches never shared between adapters."""

import os
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from adapter_helpers import make_adapter
from conftest import start_server, tiny_config
from mlx_lfm2 import load

openai = pytest.importorskip("openai")

SPECS = {"a": dict(seed=1), "b": dict(seed=2, rank=8, num_layers=-1),
         "attn": dict(seed=3, keys=["self_attn.q_proj", "self_attn.v_proj"], num_layers=-1),
         "experts": dict(seed=4, rank=2, keys=["feed_forward.experts.w1", "feed_forward.experts.w2"], num_layers=-1)}
PROMPTS = ["Tell me a story", "hi", "What is 2+2?", "Name a colour", "Write a haiku", "Why is the sky blue?",
           "Count to five", "Say something"]
# 8 concurrent requests over the 4 adapters and the base ("m", the base's served name)
ASKS = list(zip(["a", "b", "attn", "experts", "m", "a", "b", "m"], PROMPTS))


@pytest.fixture(scope="module")
def folders(checkpoint, tmp_path_factory):
    base = checkpoint(tiny_config("tiny-moe"), tokenizer=True)
    root = tmp_path_factory.mktemp("adapter-dir")
    made = {n: make_adapter(base, root / n, **kw) for n, kw in SPECS.items()}
    make_adapter(base, root / "late", seed=7)
    return base, root, made


@pytest.fixture(scope="module")
def server(folders):
    base, root, made = folders
    flags = [x for n, f in made.items() for x in ("--adapter", f"{n}={f}")]
    proc, url, _ = start_server(base, "--served-model-name", "m", "--adapter-dir", str(root), "--max-batch", "8",
                                "--prompt-cache-bytes", "0", *flags)
    yield url
    proc.kill()
    proc.wait()


@pytest.fixture(scope="module")
def alone(folders, serve):
    """In-process servers each holding one model as ``--adapter-path`` loads it (and the base)."""
    base, _, made = folders
    urls = {}
    for name in [*made, "m"]:
        model, tok = load(base, adapter_path=made.get(name))
        urls[name] = serve(model, tok, max_batch=1)[0]
    return urls


def chat(url, model, prompt, n=12, **kw):
    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}], max_tokens=n,
                                       temperature=0, logprobs=True, top_logprobs=2, **kw)
    return r


def tokens(r):
    return [(e.token, e.logprob) for e in r.choices[0].logprobs.content]


def same(got, want):
    assert [t for t, _ in got] == [t for t, _ in want]
    assert [lp for _, lp in got] == pytest.approx([lp for _, lp in want], abs=1e-3)


def test_models_lists_the_base_and_each_adapter(server):
    client = openai.OpenAI(base_url=server + "/v1", api_key="x")
    assert [m.id for m in client.models.list().data][:5] == ["m", "a", "b", "attn", "experts"]
    assert client.models.retrieve("attn").id == "attn"


def test_eight_concurrent_requests_over_four_adapters_equal_each_alone(server, alone):
    with ThreadPoolExecutor(len(ASKS)) as pool:
        together = list(pool.map(lambda ask: chat(server, *ask, n=24), ASKS))
    assert httpx.get(server + "/health").json()["peak_batch"] >= 4  # they did share forwards
    for (name, prompt), got in zip(ASKS, together):
        assert got.model == name
        same(tokens(got), tokens(chat(alone[name], "m", prompt, n=24)))
    # every adapter changes the reply to the same prompt
    outs = {name: tokens(chat(server, name, PROMPTS[0])) for name in [*SPECS, "m"]}
    assert len({tuple(t for t, _ in v) for v in outs.values()}) == len(outs)


def test_every_api_routes_by_model_name(server):
    want = chat(server, "b", "hi", n=8).choices[0].message.content
    anthropic = pytest.importorskip("anthropic")
    a = anthropic.Anthropic(base_url=server, api_key="x", max_retries=0)
    got = a.messages.create(model="b", max_tokens=8, extra_body={"temperature": 0},
                            messages=[{"role": "user", "content": "hi"}])
    assert got.content[0].text == want and got.model == "b"
    with pytest.raises(anthropic.NotFoundError, match="model 'nope' not found: this server serves 'm', 'a'"):
        a.messages.create(model="nope", max_tokens=8, messages=[{"role": "user", "content": "hi"}])
    client = openai.OpenAI(base_url=server + "/v1", api_key="x", max_retries=0)
    r = client.responses.create(model="b", input="hi", max_output_tokens=8, temperature=0)
    assert r.output_text == want
    body = {"model": "b", "messages": [{"role": "user", "content": "hi"}], "stream": False,
            "options": {"num_predict": 8, "temperature": 0}}
    r = httpx.post(server + "/api/chat", json=body)
    assert r.json()["message"]["content"] == want and r.json()["model"] == "b"
    r = httpx.post(server + "/api/chat", json={"model": "nope", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 404 and "model 'nope' not found" in r.json()["error"]
    assert "b" in [m["name"] for m in httpx.get(server + "/api/tags").json()["models"]]
    with pytest.raises(openai.NotFoundError, match="model 'nope' not found"):
        chat(server, "nope", "hi")


def test_same_prompt_under_two_adapters_never_shares_a_cache(server):
    prompt = "A prompt long enough to be cached once and reused: " + "one two three " * 8
    cached = lambda model: chat(server, model, prompt, n=2).usage.prompt_tokens_details.cached_tokens  # noqa: E731
    assert cached("a") == 0
    assert cached("a") > 0  # the same adapter reuses its own prefix
    assert cached("attn") == 0 and cached("m") == 0  # another adapter, or the base, never does


def stream(url, model, prompt, n):
    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}], max_tokens=n,
                                          temperature=0, logprobs=True, stream=True)


def streamed(chunks, during=None, after=3):
    """The stream's (token, logprob)s; ``during()`` is called after ``after`` chunks, and the
    number of chunks that came after it returned is reported."""
    out, later, done = [], 0, False
    for i, c in enumerate(chunks):
        if c.choices and c.choices[0].logprobs:
            out += [(e.token, e.logprob) for e in c.choices[0].logprobs.content]
            later += done
        if during is not None and len(out) == after and not done:
            during()
            done = True
    return out, later


def test_a_load_during_streaming_does_not_disturb_the_stream(server, alone):
    want = tokens(chat(alone["a"], "m", PROMPTS[2], n=80))
    result = {}

    def load_late():
        result["r"] = httpx.post(server + "/v1/load_lora_adapter", json={"lora_name": "late", "lora_path": "late"},
                                 timeout=60)

    got, later = streamed(stream(server, "a", PROMPTS[2], 80), load_late)
    assert result["r"].status_code == 200, result["r"].text
    assert result["r"].text == "Success: LoRA adapter 'late' added successfully."
    assert later > 0  # the stream went on after the load
    same(got, want)
    assert "late" in [m.id for m in openai.OpenAI(base_url=server + "/v1", api_key="x").models.list().data]
    assert chat(server, "late", "hi").model == "late"


def test_unload_in_use_is_refused_then_done_when_idle(server, folders):
    base, root, _ = folders
    shutil.copytree(root / "a", root / "doomed")
    r = httpx.post(server + "/v1/load_lora_adapter", json={"lora_name": "doomed", "lora_path": "doomed"})
    assert r.status_code == 200
    refused = {}

    def unload():
        refused["r"] = httpx.post(server + "/v1/unload_lora_adapter", json={"lora_name": "doomed"})

    got, _ = streamed(stream(server, "doomed", PROMPTS[1], 60), unload)
    assert refused["r"].status_code == 409
    assert refused["r"].json()["error"]["message"] == ("adapter 'doomed' is in use by 1 request(s): "
                                                       "unload it when they finish")
    assert len(got) > 3
    r = httpx.post(server + "/v1/unload_lora_adapter", json={"lora_name": "doomed"})
    assert r.status_code == 200 and r.text == "Success: LoRA adapter 'doomed' removed successfully."
    with pytest.raises(openai.NotFoundError):
        chat(server, "doomed", "hi")
    r = httpx.post(server + "/v1/unload_lora_adapter", json={"lora_name": "doomed"})
    assert r.status_code == 404 and "'doomed' is not loaded" in r.json()["error"]["message"]


def bad_folders(root, checkpoint, base):
    dense = checkpoint(tiny_config("tiny-dense"))
    make_adapter(dense, root / "other-base")
    shutil.copytree(root / "a", root / "truncated")
    f = root / "truncated" / "adapters.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    shutil.copytree(root / "a", root / "dora")
    cfg = root / "dora" / "adapter_config.json"
    cfg.write_text(cfg.read_text().replace('"fine_tune_type": "lora"', '"fine_tune_type": "dora"'))
    (root / "empty").mkdir(exist_ok=True)


@pytest.mark.parametrize("path,message", [
    ("other-base", "does not fit this model"),
    ("truncated", "corrupt or truncated download?"),
    ("dora", "a dora adapter cannot share the base with other adapters"),
    ("empty", "has no adapter_config.json"),
    ("missing", "no adapter folder 'missing' under --adapter-dir"),
])
def test_a_bad_adapter_is_a_400_naming_the_problem_and_the_server_keeps_serving(server, folders, checkpoint, path,
                                                                                message):
    base, root, _ = folders
    if not (root / "empty").exists():
        bad_folders(root, checkpoint, base)
    r = httpx.post(server + "/v1/load_lora_adapter", json={"lora_name": "bad", "lora_path": path})
    assert r.status_code == 400 and message in r.json()["error"]["message"], r.text
    assert str(root) not in r.text  # the server's folders stay its own
    assert "bad" not in [m.id for m in openai.OpenAI(base_url=server + "/v1", api_key="x").models.list().data]
    assert chat(server, "a", "hi", n=2).choices[0].finish_reason == "length"


def test_paths_out_of_the_adapter_dir_are_refused(server, folders, tmp_path):
    base, root, made = folders
    outside = tmp_path / "outside"
    shutil.copytree(made["a"], outside)
    if not (root / "link-out").exists():
        os.symlink(outside, root / "link-out")
        (root / "file-out").mkdir()
        os.symlink(outside / "adapters.safetensors", root / "file-out" / "adapters.safetensors")
        shutil.copy(outside / "adapter_config.json", root / "file-out")
    for path, message in [(str(outside), "must be a folder name relative to --adapter-dir"),
                          ("../outside", "must be a folder name relative to --adapter-dir"),
                          ("a/../../x", "must be a folder name relative to --adapter-dir"),
                          ("~/x", "must be a folder name relative to --adapter-dir"),
                          ("link-out", "leads outside --adapter-dir"),
                          ("file-out", "adapters.safetensors link(s) outside --adapter-dir")]:
        r = httpx.post(server + "/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": path})
        assert r.status_code == 400 and message in r.json()["error"]["message"], (path, r.text)


def test_hot_loading_needs_the_api_key_and_an_adapter_dir(folders, checkpoint):
    base, root, made = folders
    proc, url, _ = start_server(base, "--api-key", "k", "--prompt-cache-bytes", "0", "--adapter", f"a={made['a']}")
    try:
        r = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "b", "lora_path": "b"})
        assert r.status_code == 401
        r = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "b", "lora_path": "b"},
                       headers={"authorization": "Bearer k"})
        assert r.status_code == 400 and "start the server with --adapter-dir" in r.json()["error"]["message"]
    finally:
        proc.kill()
        proc.wait()


def test_resolving_the_path_stays_off_the_event_loop(tmp_path, monkeypatch):
    """The path checks stat and list the disk (a slow or network folder): they run in a thread,
    so the event loop keeps serving meanwhile."""
    import asyncio

    from mlx_lfm2.serve.adapters import AdapterTable
    from mlx_lfm2.serve.boundary import APIError

    class Scheduler:
        adapters, model_id = None, "m"

    table = AdapterTable(Scheduler(), str(tmp_path))
    seen, real = [], table.resolve
    monkeypatch.setattr(table, "resolve", lambda given: (seen.append(threading.current_thread()), real(given))[1])

    async def load():
        with pytest.raises(APIError, match="no adapter folder 'missing' under --adapter-dir"):
            await table.load("x", "missing")
        return threading.current_thread()

    loop_thread = asyncio.run(load())
    assert len(seen) == 1 and seen[0] is not loop_thread
