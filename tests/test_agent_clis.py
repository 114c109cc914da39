"""Claude Code and Codex CLI, installed from npm, against the server: every request they send
is answered 2xx, Claude Code's second turn reuses the first's cache, and Codex's shell call
comes back to it as a function call whose output it returns. Stand-in model (``TurnModel``):
the protocol and the prompt cache are what is checked, not the replies' wisdom."""

import json
import os
import shutil
import subprocess

import pytest

from conftest import TurnModel

pytestmark = pytest.mark.slow
NPM_PACKAGES = ["@anthropic-ai/claude-code", "@openai/codex"]


@pytest.fixture(scope="module")
def clis(tmp_path_factory):
    """``{"claude": path, "codex": path}`` installed from npm into a temporary prefix."""
    if shutil.which("npm") is None:
        pytest.skip("npm is not installed: Claude Code and Codex CLI come from npm")
    prefix = tmp_path_factory.mktemp("npm")
    subprocess.run(["npm", "install", "--prefix", str(prefix), "--no-audit", "--no-fund", *NPM_PACKAGES],
                   check=True, capture_output=True, timeout=600)
    return {name: str(prefix / "node_modules" / ".bin" / name) for name in ("claude", "codex")}


class Recorder:
    """ASGI middleware keeping each request's method, path, body and status, and the reply."""

    def __init__(self, app):
        self.app, self.log = app, []

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        entry = {"method": scope["method"], "path": scope["path"], "body": b"", "status": None, "reply": b""}
        self.log.append(entry)

        async def recv():
            message = await receive()
            entry["body"] += message.get("body", b"")
            return message

        async def snd(message):
            if message["type"] == "http.response.start":
                entry["status"] = message["status"]
            elif message["type"] == "http.response.body":
                entry["reply"] += message.get("body", b"")
            await send(message)

        await self.app(scope, recv, snd)


def sse_data(reply: bytes) -> list[dict]:
    return [json.loads(line[5:]) for line in reply.decode().splitlines() if line.startswith("data:")
            and line[5:].strip() not in ("", "[DONE]")]


def start(serve, tok, first: str, after_tool: str):
    ids = lambda text: tok.encode(text, add_special_tokens=False) + [7]  # noqa: E731
    marker = tok.encode("<|tool_response_end|>", add_special_tokens=False)[0]
    recorder = {}

    def wrap(app):
        recorder["r"] = Recorder(app)
        return recorder["r"]

    base, _ = serve(TurnModel(ids(first), ids(after_tool), marker), tok, max_context=128000, model_id="lfm2",
                    wrap=wrap)
    return base, recorder["r"].log


def test_claude_code_two_turns_all_2xx_and_the_second_is_cached(clis, serve, chat_model, tmp_path):
    base, log = start(serve, chat_model[1], "Hi from LFM2.", "Hi from LFM2.")
    env = {**os.environ, "HOME": str(tmp_path), "ANTHROPIC_BASE_URL": base, "ANTHROPIC_API_KEY": "dummy",
           "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1", "DISABLE_AUTOUPDATER": "1",
           # one model name on every turn: Claude Code writes it into its system prompt
           "ANTHROPIC_MODEL": "lfm2", "ANTHROPIC_DEFAULT_HAIKU_MODEL": "lfm2"}
    outputs = []
    for args in (["-p", "say hi"], ["-p", "--continue", "say it again"]):
        run = subprocess.run([clis["claude"], *args], env=env, cwd=tmp_path, capture_output=True, text=True,
                             timeout=600)
        assert run.returncode == 0, run.stdout + run.stderr
        outputs.append(run.stdout)
    assert all("Hi from LFM2." in out for out in outputs), outputs
    assert log and all(200 <= e["status"] < 300 for e in log if e["path"] != "/"), [
        (e["method"], e["path"], e["status"]) for e in log]
    turns = [e for e in log if e["path"] == "/v1/messages"]
    usage = [next(d["usage"] for d in sse_data(e["reply"]) if d["type"] == "message_delta") for e in turns]
    first = usage[0]["input_tokens"] + usage[0]["cache_read_input_tokens"]
    print("claude code turns (input_tokens, cache_read_input_tokens):",
          [(u["input_tokens"], u["cache_read_input_tokens"]) for u in usage])
    assert usage[-1]["cache_read_input_tokens"] >= 0.95 * first


def test_codex_exec_runs_a_shell_call_through_the_responses_api(clis, serve, chat_model, tmp_path):
    call = '<|tool_call_start|>[exec_command(cmd="echo hi-from-codex")]<|tool_call_end|>'
    base, log = start(serve, chat_model[1], call, "Done: it printed hi-from-codex.")
    home = tmp_path / "home"
    (home / ".codex").mkdir(parents=True)
    (home / ".codex" / "config.toml").write_text(
        'model = "lfm2"\nmodel_provider = "local"\n\n[model_providers.local]\nname = "local"\n'
        f'base_url = "{base}/v1"\nwire_api = "responses"\nenv_key = "LOCAL_KEY"\n')
    env = {**os.environ, "HOME": str(home), "CODEX_HOME": str(home / ".codex"), "LOCAL_KEY": "dummy"}
    run = subprocess.run([clis["codex"], "exec", "--skip-git-repo-check", "-s", "danger-full-access",
                          "run echo hi-from-codex"], env=env, cwd=tmp_path, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    assert all(200 <= e["status"] < 300 for e in log), [(e["method"], e["path"], e["status"]) for e in log]
    turns = [e for e in log if e["path"] == "/v1/responses"]
    assert len(turns) >= 2
    done = [d for d in sse_data(turns[0]["reply"]) if d["type"] == "response.completed"][0]["response"]
    calls = [i for i in done["output"] if i["type"] == "function_call"]
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [("exec_command", {"cmd": "echo hi-from-codex"})]
    sent = json.loads(turns[1]["body"])["input"]
    outputs = [i for i in sent if i.get("type") == "function_call_output"]
    assert outputs and outputs[0]["call_id"] == calls[0]["call_id"] and "hi-from-codex" in json.dumps(outputs[0])
    assert "Done: it printed hi-from-codex." in run.stdout + run.stderr
