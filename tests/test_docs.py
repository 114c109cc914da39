"""The documentation's snippets run: every fenced block marked ``{run}`` in README.md and
docs/*.md is executed, in order, against random-weight checkpoints.

The convention (README, "Tests"): a block opened with ```` ```python {run} ```` or
```` ```sh {run} ```` runs; ```` ```python {run server} ```` runs with a live server, its
``http://127.0.0.1:8080`` replaced by that server's address. Every ``python`` block must be
runnable; ``sh`` blocks without the mark are commands that download, serve forever or take
long (benchmarks) and are only shown. ```` ```sh {run serve} ```` is a block whose last command
starts a server: it runs with ``--port`` appended (a free one) until the server lists the
models its ``--model NAME=PATH`` flags name and each answers a chat completion; then it is stopped.

How they run, one document at a time, in a fresh folder that links the repository's
``chat.py``, ``convert.py``, ``tests`` and ``bench`` (so relative paths in the snippets work and
what they write stays in the temporary folder):
- Python blocks share one namespace, as in one session; ``load`` of a hub repo id or of a
  folder that does not exist gets a random checkpoint with the real LFM2 tokenizer
  (``LiquidAI/LFM2-350M``, the drafts' model, a small dense one; anything else a small MoE).
- Shell blocks run in bash (``set -euo pipefail``) with ``python`` the test's interpreter and
  stdin empty, so ``chat.py`` starts, loads its model and leaves at the end of input.
"""

import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import ROOT, free_port, reference_dir, start_server, tiny_config

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```([\w-]*)[ \t]*(\{[^}\n]*\})?[ \t]*\n(.*?)^```[ \t]*$", re.M | re.S)
LINKED = ("chat.py", "convert.py", "tests", "bench")
SERVER = "http://127.0.0.1:8080"


def blocks(doc: Path) -> list[tuple[int, str, str, str]]:
    """``(line, language, marks, code)`` of each fenced block."""
    text = doc.read_text(encoding="utf-8")
    return [(text.count("\n", 0, m.start()) + 1, m.group(1), (m.group(2) or "").strip("{}").strip(), m.group(3))
            for m in FENCE.finditer(text)]


def test_every_python_snippet_is_marked_runnable_and_the_readme_has_both_kinds():
    unmarked = [f"{doc.name}:{line}" for doc in DOCS for line, lang, marks, _ in blocks(doc)
                if lang == "python" and not marks.startswith("run")]
    assert unmarked == [], f"python blocks not marked {{run}}: {unmarked}"
    kinds = {lang for _, lang, marks, _ in blocks(ROOT / "README.md") if marks.startswith("run")}
    assert {"python", "sh"} <= kinds, kinds


@pytest.fixture
def sandbox(tmp_path, checkpoint, monkeypatch):
    """A working folder for one document's snippets, and ``load`` that never goes to the hub."""
    from mlx_lfm2.weights import conversion, loader

    for name in LINKED:
        (tmp_path / name).symlink_to(ROOT / name)
    moe = checkpoint(tiny_config("tiny-moe"), tokenizer=True)
    dense = checkpoint(tiny_config("tiny-dense"), tokenizer=True, seed=1)
    real = loader.resolve

    def offline_resolve(name, revision=None, flag="--model"):
        if Path(name).expanduser().is_dir():
            return real(name, revision, flag)
        return dense if "350M" in str(name) else moe

    monkeypatch.setattr(loader, "resolve", offline_resolve)
    monkeypatch.setattr(conversion, "resolve", offline_resolve)
    monkeypatch.chdir(tmp_path)
    reference_dir()
    return tmp_path, moe


def shell_env(cwd: Path) -> dict:
    bin_dir = cwd / ".bin"
    bin_dir.mkdir(exist_ok=True)
    python = bin_dir / "python"  # a script, not a link: a venv's interpreter finds its venv from its own path
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    python.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "HF_HUB_OFFLINE": "1",
            "MLX_LFM2_HOME": str(cwd / ".mlx_lfm2"), "HF_HOME": str(cwd / ".hf")}


def run_shell(code: str, cwd: Path, where: str) -> None:
    p = subprocess.run(["bash", "-euo", "pipefail", "-c", code], cwd=cwd, env=shell_env(cwd), stdin=subprocess.DEVNULL,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, f"{where}: exit {p.returncode}\n{code}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"


def run_serving(code: str, cwd: Path, where: str) -> None:
    """A ``{run serve}`` block (module docstring)."""
    port = free_port()
    names = re.findall(r"--model\s+(\w[\w.-]*)=", code)
    p = subprocess.Popen(["bash", "-euo", "pipefail", "-c", f"{code.rstrip()} --port {port}"], cwd=cwd,
                         env=shell_env(cwd), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, start_new_session=True)
    base, listed = f"http://127.0.0.1:{port}", None
    try:
        deadline = time.monotonic() + 300
        while listed is None and p.poll() is None and time.monotonic() < deadline:
            try:
                listed = [m["id"] for m in json.load(urllib.request.urlopen(base + "/v1/models", timeout=5))["data"]]
            except OSError:
                time.sleep(0.5)
        assert listed is not None, f"{where}: the server did not start\n{code}\n{p.stdout.read()[-3000:] if p.poll() is not None else ''}"
        assert names and set(names) <= set(listed), (where, names, listed)
        for name in names:
            body = json.dumps({"model": name, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
            req = urllib.request.Request(base + "/v1/chat/completions", body.encode(), {"content-type": "application/json"})
            assert json.load(urllib.request.urlopen(req, timeout=300))["model"] == name, where
    finally:
        os.killpg(p.pid, 15)
        p.wait(timeout=60)


@pytest.mark.slow
@pytest.mark.parametrize("doc", DOCS, ids=lambda d: d.name)
def test_runnable_snippets_run(doc, sandbox):
    cwd, moe = sandbox
    namespace, server = {"__name__": "__doc__"}, None
    try:
        for line, lang, marks, code in blocks(doc):
            if not marks.startswith("run"):
                continue
            where = f"{doc.relative_to(ROOT)}:{line}"
            if "server" in marks.split():
                if server is None:
                    server = start_server(moe)
                code = code.replace(SERVER, server[1])
            if lang == "python":
                try:
                    exec(compile(code, where, "exec"), namespace)
                except Exception as e:
                    raise AssertionError(f"{where}: {type(e).__name__}: {e}\n{code}") from e
            elif lang in ("sh", "bash", "console") and "serve" in marks.split():
                run_serving(code, cwd, where)
            elif lang in ("sh", "bash", "console"):
                run_shell(code, cwd, where)
            else:
                pytest.fail(f"{where}: a {{run}} block in {lang!r}: only python and sh run")
    finally:
        if server is not None:
            server[0].kill()
            server[0].wait()
