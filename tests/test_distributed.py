"""Pipeline parallelism: stage planning, per-rank loading, and two ranks under ``mlx.launch``
(ring backend on 127.0.0.1) decoding exactly like one process."""

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from unittest.mock import ANY

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from conftest import ROOT, tiny_config
from mlx_lfm2.model.pipeline import read_header, split_layers
from mlx_lfm2.model.config import ModelArgs
from mlx_lfm2.weights import layouts
from mlx_lfm2.weights.conversion import convert
from mlx_lfm2.weights.loader import load_config, load_model, load_stage

sys.path.insert(0, str(Path(__file__).parent))
import distributed_worker  # noqa: E402

LAUNCH = Path(sys.executable).parent / "mlx.launch"


def small(kind: str) -> dict:
    """Layers dominate the bytes (small vocabulary), so a stage is about half the model."""
    return tiny_config(kind, layers=6, vocab_size=512, hidden_size=128, intermediate_size=256,
                       moe_intermediate_size=64)


class FakeGroup:
    def __init__(self, rank, size):
        self._rank, self._size = rank, size

    def rank(self):
        return self._rank

    def size(self):
        return self._size


def test_split_layers_balances_bytes_with_the_ends():
    assert split_layers([10] * 6, 0, 0, 2) == [range(0, 3), range(3, 6)]
    # A heavy head moves layers to the first stage.
    assert split_layers([10] * 6, 0, 20, 2) == [range(0, 4), range(4, 6)]
    assert split_layers([10] * 7, 15, 0, 3) == [range(0, 1), range(1, 4), range(4, 7)]
    assert [len(r) for r in split_layers([1] * 5, 0, 0, 5)] == [1] * 5
    with pytest.raises(ValueError, match="cannot split 2 layers across 3"):
        split_layers([1, 1], 0, 0, 3)


def test_each_stage_opens_only_its_shards_and_matches_the_full_model(checkpoint, tmp_path, monkeypatch):
    src = checkpoint(small("tiny-moe"))
    folder = convert(src, tmp_path / "sharded", dtype="float32", max_shard_gb=0.001, progress=False)
    files = sorted(folder.glob("*.safetensors"))
    assert len(files) >= 4
    full = dict(tree_flatten(load_model(folder).parameters()))
    args = ModelArgs.from_dict(load_config(folder))
    opened = []
    real = layouts.load_safetensors
    monkeypatch.setattr(layouts, "load_safetensors", lambda f: opened.append(f.name) or real(f))
    seen, shards = set(), []
    for rank in (1, 0):  # stage 0 (embedding, first layers) is the highest rank
        opened.clear()
        stage = load_stage(folder, args, group=FakeGroup(rank, 2))
        params = dict(tree_flatten(stage.parameters()))
        layers = {int(k.split(".")[2]) for k in params if k.startswith("model.layers.")}
        assert layers == set(stage.owned)
        assert ("model.embedding_norm.weight" in params) == stage.is_last
        assert "model.embed_tokens.weight" in params  # tied head: both ends hold the embedding
        for k, v in params.items():
            assert mx.array_equal(v, full[k]), k
        seen |= set(params)
        shards.append(set(opened))
        needed = {f.name for f in files if any(k in params for k in read_header(f))}
        assert set(opened) == needed  # no other shard is even opened
    assert seen == set(full)
    assert shards[0] != shards[1]


def free_port_pair() -> int:
    for _ in range(50):
        with socket.socket() as a, socket.socket() as b:
            try:
                a.bind(("127.0.0.1", 0))
                port = a.getsockname()[1]
                b.bind(("127.0.0.1", port + 1))
                return port
            except OSError:
                continue
    raise RuntimeError("no two consecutive free ports")


def launcher(tmp_path, *args) -> list[str]:
    """``mlx.launch`` of ``python *args`` on two ring ranks, from a hostfile naming 127.0.0.1 twice."""
    if not LAUNCH.exists():
        pytest.skip(f"{LAUNCH} not found")
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(json.dumps([{"ssh": "127.0.0.1", "ips": ["127.0.0.1"]}] * 2))
    return [str(LAUNCH), "--hostfile", str(hostfile), "--backend", "ring", "-p", str(free_port_pair()),
            "--", sys.executable, *args]


@pytest.mark.slow
def test_two_ranks_decode_like_one_process(checkpoint, tmp_path):
    folders = []
    for kind in ("tiny-dense", "tiny-moe"):
        src = checkpoint(small(kind))
        folders += [src, convert(src, tmp_path / f"{kind}-q4", quantize=True, dtype="float32", progress=False)]
    out = tmp_path / "out"
    p = subprocess.run(launcher(tmp_path, str(Path(__file__).parent / "distributed_worker.py"), str(out),
                                *map(str, folders)),
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    ranks = {r: json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)}
    for r in (0, 1):
        assert "prompts of different lengths" in ranks[r].pop("mismatch")
    for f in folders:
        alone, r0, r1 = distributed_worker.run(str(f)), ranks[0][str(f)], ranks[1][str(f)]
        assert r0["tokens"] == r1["tokens"] == alone["tokens"], f
        np.testing.assert_allclose(r0["logprobs"], alone["logprobs"], atol=1e-5)
        # Rank 1 embeds and runs the first layers, rank 0 the last ones and the head.
        assert r1["layers"][0] == 0 and r1["layers"][1] == r0["layers"][0] and r0["layers"][1] == 6
        # Each rank holds about half the weights (the tied embedding sits on both ends).
        for r in (r0, r1):
            assert 0.35 * alone["weights"] < r["weights"] < 0.65 * alone["weights"]
            assert r["peak"] < 0.75 * alone["peak"], (r["peak"], alone["peak"])


@pytest.mark.slow
def test_chat_repl_under_the_launcher_prints_one_reply_equal_to_one_process(checkpoint, tmp_path):
    folder = checkpoint(tiny_config("tiny-moe"), tokenizer=True)
    args = ["-m", "mlx_lfm2.cli.chat", "--model", str(folder), "--max-tokens", "6", "--no-markdown",
            "--temperature", "0"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"}
    script = "hello there\n/stats\n/quit\n"
    two = subprocess.run(launcher(tmp_path, *args), input=script, env=env, capture_output=True, text=True,
                         timeout=120)
    one = subprocess.run([sys.executable, *args], input=script, env=env, capture_output=True, text=True,
                         timeout=120)
    assert two.returncode == 0 and one.returncode == 0, two.stdout + two.stderr + one.stderr

    def reply(out):  # the line after the first prompt, up to the stats
        return out.split(">>> ", 1)[1].split(" prompt tokens @")[0]

    assert reply(two.stdout) == reply(one.stdout)
    assert two.stdout.count("tokens in the cache") == 1  # only rank 0 prints


@pytest.mark.slow
def test_generate_under_the_launcher_rank0_prints_the_completion_every_rank_its_stats(checkpoint, tmp_path):
    folder = checkpoint(tiny_config("tiny-moe"), tokenizer=True)
    args = ["-m", "mlx_lfm2.generate", "--model", str(folder), "--prompt", "Hello", "--max-tokens", "8"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    two = subprocess.run(launcher(tmp_path, *args), capture_output=True, text=True, env=env, timeout=120)
    assert two.returncode == 0, two.stdout + two.stderr
    one = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=120).stdout
    # Each rank's stats lines arrive as one block, possibly between rank 0's streamed pieces.
    stats = re.compile(r"Prompt: \d+ tokens, .*\nGeneration: 8 tokens, .*\nPeak memory: [\d.]+ GB\n")
    assert len(stats.findall(two.stdout)) == 2 and len(stats.findall(one)) == 1
    assert stats.sub("", two.stdout) == stats.sub("", one), (two.stdout, one)  # the completion, once


@pytest.mark.slow
def test_server_under_the_launcher_serves_cancels_and_reuses_prompts(checkpoint, tmp_path):
    import httpx

    from mlx_lfm2 import load
    from mlx_lfm2.engine.generation import default_sampling, stream_generate

    folder = checkpoint(tiny_config("tiny-moe"), tokenizer=True)
    port = free_port_pair()
    proc = subprocess.Popen(launcher(tmp_path, "-m", "mlx_lfm2.server", "--model", str(folder), "--port",
                                     str(port)),
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}/v1"
    try:
        for _ in range(600):
            try:
                if httpx.get(base[:-3] + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        else:
            pytest.fail("server did not start")

        def complete(prompt, n=8):
            r = httpx.post(base + "/completions", json=dict(prompt=prompt, max_tokens=n, temperature=0, logprobs=1),
                           timeout=60)
            assert r.status_code == 200, r.text
            return r.json()

        first = complete("hello")
        model, tok = load(folder, pipeline=False)
        ids = tok.encode("hello", add_special_tokens=False)
        kw = {**default_sampling(model), "temperature": 0}
        ref = list(stream_generate(model, tok, ids, 8, **kw))
        assert first["choices"][0]["text"] == "".join(r.text for r in ref)
        np.testing.assert_allclose(first["choices"][0]["logprobs"]["token_logprobs"],
                                   [r.logprobs[r.token].item() for r in ref[:-1] if r.token is not None][:8],
                                   atol=1e-4)
        # A client that leaves mid-stream: every rank stops at the same token.
        with httpx.stream("POST", base + "/completions", json=dict(prompt="tell me", max_tokens=500,
                                                                  stream=True), timeout=60) as s:
            for i, _ in enumerate(s.iter_lines()):
                if i > 4:
                    break
        follow = complete("hello" + first["choices"][0]["text"] + " and")
        assert follow["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
        assert complete("hello") == {**first, "id": ANY, "created": ANY}
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(20)
