"""Prompt cache across restarts: first-token time after a server restart vs a cold prefill.

Two prefixes an agent resends on every turn: a 6k-token system prompt, and a 16k-token
agent-shaped prefix (tool schemas and a conversation with tool calls). For each, each server
is started, answers the request cold (``max_tokens=1``: the time is the prefill plus one
token), is stopped, started again, and answers the same request: our server reads the prefix
back from its disk tier (``--prompt-cache-dir``), mlx-lm's server (memory only) prefills it
again. Reported: both times, their ratio (target: after-restart <= 5% of cold), the disk
tier's bytes per 1k tokens, and the tokens each reply says came from the cache.

    python bench/prompt_cache.py                      # 24b-a2b-narrow shapes, 4-bit, both servers
    python bench/prompt_cache.py --engines mlx_lfm2   # ours only
    python bench/prompt_cache.py --layers 2 --engines mlx_lfm2                # a 2-core CPU
    python bench/prompt_cache.py --layers 2 --engines mlx_lm --prompts system
"""

import json
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import OUT, ROOT, checkpoint, converted, model_parser

TOOL = {"type": "function", "function": {"name": "read_file", "description": "Read a file of the repository "
        "and return its text, with line numbers, so the assistant can quote and edit it.",
        "parameters": {"type": "object", "properties": {"path": {"type": "string", "description": "relative path"},
                       "start": {"type": "integer"}, "end": {"type": "integer"}}, "required": ["path"]}}}


def words(n_tokens: int, tokenizer, seed: int) -> str:
    """Varied English-like text of about ``n_tokens`` tokens."""
    import random

    rng = random.Random(seed)
    vocab = ("the model cache layer token block disk server request reply prefix state file "
             "agent tool schema result error test value config user system history context").split()
    text = ""
    while len(tokenizer.encode(text, add_special_tokens=False)) < n_tokens:
        text += " ".join(rng.choice(vocab) for _ in range(200)) + ".\n"
    return text


def requests(tokenizer, system_tokens: int, agent_tokens: int) -> dict:
    system = words(system_tokens, tokenizer, 1)
    tools = [{**TOOL, "function": {**TOOL["function"], "name": f"tool_{i}"}} for i in range(40)]
    agent = [{"role": "system", "content": "You are a coding agent.\n" + json.dumps(tools)}]
    turn = max(50, agent_tokens // 40)
    while len(tokenizer.encode(tokenizer.apply_chat_template(agent), add_special_tokens=False)) < agent_tokens:
        agent += [{"role": "user", "content": words(turn, tokenizer, len(agent))},
                  {"role": "assistant", "content": words(turn // 2, tokenizer, len(agent) + 1)}]
    return {f"system_{system_tokens}": [{"role": "system", "content": system}, {"role": "user", "content": "Hello."}],
            f"agent_{agent_tokens}": agent + [{"role": "user", "content": "Go on."}]}


def start(engine: str, model: Path, port: int, cache_dir: Path) -> subprocess.Popen:
    import httpx

    if engine == "mlx_lfm2":
        cmd = [sys.executable, "-m", "mlx_lfm2.server", "--model", str(model), "--port", str(port),
               "--prompt-cache-dir", str(cache_dir), "--max-context", "32768"]
    else:
        cmd = [sys.executable, "-m", "mlx_lm", "server", "--model", str(model), "--port", str(port)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    for _ in range(1200):
        try:
            httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=1)
            return proc
        except httpx.HTTPError:
            if proc.poll() is not None:
                raise RuntimeError(f"{engine} server failed: {proc.stderr.read()[-2000:]}")
            time.sleep(0.25)
    proc.kill()
    raise RuntimeError(f"{engine} server did not start")


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ask(port: int, messages: list, model: str) -> tuple[float, dict]:
    import httpx

    t = time.perf_counter()  # mlx-lm's server loads the model a request names: name its folder
    r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=3600,
                   json={"model": model, "messages": messages, "max_tokens": 1, "temperature": 0})
    if r.status_code != 200:
        raise RuntimeError(f"{r.status_code}: {r.text[:500]}")
    return time.perf_counter() - t, r.json().get("usage", {})


def measure(engine: str, model: Path, messages: list, prompt_tokens: int) -> dict:
    cache_dir = Path(tempfile.mkdtemp(prefix="prompt-cache-"))
    port = free_port()
    proc = start(engine, model, port, cache_dir)
    try:
        cold, _ = ask(port, messages, str(model))
    finally:
        stop(proc)
    proc = start(engine, model, port, cache_dir)
    try:
        warm, use = ask(port, messages, str(model))
    finally:
        stop(proc)
    disk = sum(f.stat().st_size for f in cache_dir.glob("blk-*"))
    cached = (use.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    return {"cold_s": round(cold, 3), "after_restart_s": round(warm, 3), "ratio": round(warm / cold, 4),
            "cached_tokens": cached, "prompt_tokens": prompt_tokens, "prefilled_after_restart": prompt_tokens - cached,
            "disk_bytes_per_1k_tokens": round(disk / max(cached, 1) * 1000) if disk else 0}


def main() -> None:
    p = model_parser(__doc__, runs=1)
    p.add_argument("--engines", nargs="*", default=["mlx_lfm2", "mlx_lm"])
    p.add_argument("--system-tokens", type=int, default=6000)
    p.add_argument("--agent-tokens", type=int, default=16000, help="tool schemas and a conversation")
    p.add_argument("--prompts", nargs="*", choices=["system", "agent"], default=["system", "agent"],
                   help="which prefixes to time (default both)")
    a = p.parse_args()
    # The real tokenizer's 65536 ids must all be embedding rows (the narrow preset has 8192).
    src = checkpoint(a.preset, a.layers, vocab_size=65536)
    model = converted(src, a.bits) if a.bits else src
    from mlx_lfm2.text.tokenizer import load_tokenizer

    tok = load_tokenizer(model)
    out = {"machine": platform.platform(), "model": f"{a.preset} {a.layers} layers, {a.bits}-bit",
           "command": " ".join(sys.argv), "results": {}}
    for name, messages in requests(tok, a.system_tokens, a.agent_tokens).items():
        if name.split("_")[0] not in a.prompts:
            continue
        n = len(tok.encode(tok.apply_chat_template(messages), add_special_tokens=False))
        for engine in a.engines:
            out["results"][f"{name}/{engine}"] = r = {**measure(engine, model, messages, n), "command": out["command"]}
            print(name, engine, r, flush=True)
    (ROOT / "bench" / "results").mkdir(exist_ok=True)
    path = ROOT / "bench" / "results" / "prompt_cache.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    if old.get("model") == out["model"]:  # runs of one model add up (each row says its command)
        out["results"] = {**old.get("results", {}), **out["results"]}
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out))


if __name__ == "__main__":
    OUT.mkdir(parents=True, exist_ok=True)
    main()
