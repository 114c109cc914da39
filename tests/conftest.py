"""Shared fixtures: random-weight hub checkpoints and the real LFM2 tokenizer files."""

import os
import tempfile
from pathlib import Path
from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest

from mlx_lfm2.weights.random_checkpoint import PRESETS, write_checkpoint
from session_checks import (pytest_runtest_logreport, pytest_sessionfinish,  # noqa: F401 (hooks)
                            pytest_sessionstart, pytest_terminal_summary)

ROOT = Path(__file__).resolve().parents[1]
# What tests start writes nowhere near the user's home (the server's disk prompt cache, say).
os.environ["MLX_LFM2_HOME"] = tempfile.mkdtemp(prefix="mlx_lfm2-tests-home-")
REFERENCE = Path(os.environ.get("LFM2_REFERENCE", ROOT / "tests/fixtures/LFM2-350M"))


def reference_dir() -> Path:
    if not (REFERENCE / "tokenizer.json").exists():
        pytest.fail(f"real LFM2 tokenizer files missing at {REFERENCE} (they ship in tests/fixtures)")
    return REFERENCE


def tiny_config(kind: str = "tiny-moe", layers=None, **overrides) -> dict:
    cfg = PRESETS[kind](layers) if layers else PRESETS[kind]()
    cfg.update(overrides)
    return cfg


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """``checkpoint(config, dtype="float32", tokenizer=False) -> folder`` (cached per config)."""
    made = {}

    def make(config: dict, dtype: str = "float32", tokenizer: bool = False, seed: int = 0) -> Path:
        key = (repr(sorted(config.items())), dtype, tokenizer, seed)
        if key not in made:
            out = tmp_path_factory.mktemp("ckpt")
            made[key] = write_checkpoint(out, config, seed=seed, dtype=dtype,
                                         tokenizer_from=reference_dir() if tokenizer else None)
        return made[key]

    return make


@pytest.fixture(scope="session")
def chat_model(checkpoint):
    """A tiny MoE model with the real LFM2 tokenizer and template: ``(model, tokenizer, folder)``."""
    from mlx_lfm2 import load

    folder = checkpoint(tiny_config("tiny-moe"), tokenizer=True)
    model, tokenizer = load(folder)
    return model, tokenizer, folder


class ScriptedModel:
    """A stand-in model: its n-th sampling step (1-token call) on a cache makes ``script[n]``
    the argmax (the last entry repeats). Prefill calls (L > 1) only advance the cache.
    ``spread`` replaces the scripted row by fixed logits. ``calls`` records each call's L.
    The step count is the cache's conv state, one per row, so batched rows keep their own."""

    def __init__(self, script, vocab=64400, context=4096, spread=None):
        self.script, self.vocab, self.spread, self.calls = list(script), vocab, spread, []
        self.args = SimpleNamespace(max_position_embeddings=context, num_experts=0, num_experts_per_tok=0,
                                    vocab_size=vocab)

    def make_cache(self):
        from mlx_lfm2.model.cache import ConvCache

        return [ConvCache()]

    def __call__(self, inputs, cache=None):
        B, L = inputs.shape
        self.calls.append(L)
        c = cache[0]
        n = np.zeros(B, np.int64) if c.conv_state is None else np.array(c.conv_state).reshape(B).astype(np.int64)
        c.offset += L
        c.conv_state = mx.array((n + (L == 1)).reshape(B, 1, 1), dtype=mx.float32)
        if self.spread is not None:
            rows = np.broadcast_to(np.asarray(self.spread, np.float32), (B, self.vocab))
        else:
            rows = np.full((B, self.vocab), -10.0, np.float32)
            rows[np.arange(B), [self.script[min(i, len(self.script) - 1)] for i in n]] = 10.0
        return mx.array(np.broadcast_to(rows[:, None], (B, L, self.vocab)))


class TurnModel(ScriptedModel):
    """A stand-in model for agent loops: each reply plays ``first`` from its start, or
    ``after_tool`` when the prompt's new part (the uncached suffix) holds the token
    ``marker`` (a tool result's end), so a tool call, its result and a closing answer make
    one conversation. State per row, in the conv cache: phase (last call a prefill), mode, step."""

    def __init__(self, first, after_tool, marker: int, vocab=64400, context=128000):
        super().__init__(first, vocab, context)
        self.scripts, self.marker = [list(first), list(after_tool)], marker

    def __call__(self, inputs, cache=None):
        B, L = inputs.shape
        self.calls.append(L)
        c = cache[0]
        state = np.zeros(B, np.int64) if c.conv_state is None else np.array(c.conv_state).reshape(B).astype(np.int64)
        phase, mode, n = state // 1_000_000, state // 100_000 % 10, state % 100_000
        rows = np.full((B, self.vocab), -10.0, np.float32)
        if L > 1:  # a prefill chunk: the next reply starts; a tool result anywhere in the suffix picks its script
            seen = (np.array(inputs) == self.marker).any(axis=1)
            mode = np.where(phase == 1, mode | seen, seen.astype(np.int64))
            phase, n = np.ones(B, np.int64), np.zeros(B, np.int64)
        else:
            for b in range(B):
                script = self.scripts[int(mode[b])]
                rows[b, script[min(int(n[b]), len(script) - 1)]] = 10.0
            phase, n = np.zeros(B, np.int64), n + 1
        c.offset += L
        state = phase * 1_000_000 + mode * 100_000 + n
        c.conv_state = mx.array(state.reshape(B, 1, 1), dtype=mx.float32)
        return mx.array(np.broadcast_to(rows[:, None], (B, L, self.vocab)))


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(folder, *args, code=None):
    """``python -m mlx_lfm2.server`` on a free loopback port, once /health answers:
    ``(proc, base_url, port)``. The caller stops it. ``code``: ``python -c code`` instead (a
    patch, then the server module run as ``__main__``), with the same arguments."""
    import subprocess
    import sys
    import time

    import httpx

    port = free_port()
    run = ["-c", code] if code else ["-m", "mlx_lfm2.server"]
    proc = subprocess.Popen([sys.executable, *run, "--model", str(folder), "--port", str(port), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            if httpx.get(base + "/health", timeout=1).status_code == 200:
                return proc, base, port
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    pytest.fail("server did not start: " + proc.stdout.read().decode())


@pytest.fixture(scope="module")
def serve():
    """``serve(model, tokenizer, api_key=None, queue_size=4, max_batch=8, max_context=2048,
    model_id=..., wrap=...) -> (base url, engine)``: the app (``wrap(app)``: a middleware
    around it) on uvicorn in a thread, on loopback, stopped after the module."""
    import threading
    import time

    import uvicorn

    from mlx_lfm2.serve.app import create_app
    from mlx_lfm2.serve.scheduler import Scheduler

    servers = []

    def start(model, tok, api_key=None, queue_size=4, max_batch=8, max_context=2048, model_id="local-lfm2",
              wrap=lambda app: app):
        engine = Scheduler(model, tok, model_id, queue_size=queue_size, max_context=max_context, max_batch=max_batch)
        port = free_port()
        srv = uvicorn.Server(uvicorn.Config(wrap(create_app(engine, api_key)), host="127.0.0.1", port=port,
                                            log_level="warning"))
        threading.Thread(target=srv.run, daemon=True).start()
        while not srv.started:
            time.sleep(0.02)
        servers.append(srv)
        return f"http://127.0.0.1:{port}", engine

    yield start
    for srv in servers:
        srv.should_exit = True


@pytest.fixture(scope="session")
def ours():
    """Our tokenizer on the real LFM2 files."""
    from mlx_lfm2.text.tokenizer import load_tokenizer

    return load_tokenizer(reference_dir())


@pytest.fixture(scope="session")
def ref():
    """transformers' tokenizer on the same files: the reference."""
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(reference_dir()))
