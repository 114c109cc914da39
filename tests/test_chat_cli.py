"""chat.py in a real pseudo-terminal, with a tiny random checkpoint and the real tokenizer."""

import re
import sys
import time

import pytest

from conftest import ROOT, tiny_config

pexpect = pytest.importorskip("pexpect")
ANSI = re.compile(r"\x1b\[[0-9;?]*[a-zA-Z]")
PROMPT = ">>> "


@pytest.fixture
def chat(checkpoint, tmp_path):
    folder = checkpoint(tiny_config("tiny-moe"), tokenizer=True)
    started = time.perf_counter()
    child = pexpect.spawn(sys.executable, [str(ROOT / "chat.py"), "--model", str(folder), "--max-tokens", "24",
                                           "--temperature", "0"],
                          encoding="utf-8", codec_errors="replace", timeout=60, dimensions=(50, 150), cwd=str(tmp_path),
                          env={"TERM": "xterm", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    child.expect(PROMPT)
    child.startup_wall = time.perf_counter() - started
    child.banner = ANSI.sub("", child.before)
    yield child
    child.close(force=True)


def stats(child):
    child.sendline("/stats")
    child.expect(r"(\d+) tokens in the cache, (\d+) messages")
    cached, messages = int(child.match.group(1)), int(child.match.group(2))
    child.expect(PROMPT)
    return cached, messages


def test_start_stream_remember_reset_and_quit(chat):
    m = re.search(r"start-up ([0-9.]+)s", chat.banner)
    # Reported, not timed here (a loaded CI machine is no clock): what keeps start-up fast is
    # importing no torch/transformers/mlx-lm, checked in test_loading.
    assert m, chat.banner
    chat.sendline("Hello there, who are you?")
    chat.expect(r"(\d+) prompt tokens @ .* (\d+) tokens @ .* tok/s")
    first_prompt = int(chat.match.group(1))
    chat.expect(PROMPT)
    assert stats(chat)[1] == 2

    chat.sendline("And what did I just ask?")
    chat.expect(r"(\d+) prompt tokens @")
    second_prompt = int(chat.match.group(1))
    chat.expect(PROMPT)
    cached, messages = stats(chat)
    assert messages == 4 and cached > first_prompt + second_prompt  # context kept, only the new turn prefilled
    assert second_prompt < first_prompt + 10

    chat.sendline("/reset")
    chat.expect("conversation reset")
    chat.expect(PROMPT)
    assert stats(chat) == (0, 0)
    chat.sendline("/quit")
    chat.expect(pexpect.EOF)
    assert chat.wait() == 0


def test_ctrl_c_stops_a_reply_and_keeps_the_session(checkpoint, tmp_path):
    folder = checkpoint(tiny_config("tiny-moe"), tokenizer=True)
    child = pexpect.spawn(sys.executable, [str(ROOT / "chat.py"), "--model", str(folder), "--max-tokens", "100000",
                                           "--temperature", "0", "--no-markdown"],
                          encoding="utf-8", codec_errors="replace", timeout=60, dimensions=(50, 150), cwd=str(tmp_path))
    try:
        child.expect(PROMPT)
        child.sendline("Write a very long story")
        child.expect_exact("\x1b[?25l")  # the reply's live view has started (a fixed sleep was
        time.sleep(0.3)                    # too short on a loaded machine)
        child.sendintr()
        child.expect(r"\[interrupted\]")
        child.expect(PROMPT)
        child.sendline("/stats")
        child.expect(r"prompt tokens @[\s\S]*?tokens @[\s\S]*?interrupted")  # the partial reply's numbers
        child.expect(r"(\d+) tokens in the cache, (\d+) messages")
        assert int(child.match.group(2)) == 2  # the partial reply is kept
        child.expect(PROMPT)
        child.sendline("Shorter please")  # the session still works after the interrupt
        child.expect_exact("\x1b[?25l")
        time.sleep(0.3)
        child.sendintr()
        child.expect(r"\[interrupted\]")
        child.expect(PROMPT)
        child.sendline("/stats")
        child.expect(r"(\d+) tokens in the cache, 4 messages")
        child.expect(PROMPT)
        child.sendeof()
        child.expect(pexpect.EOF)
        assert child.wait() == 0
    finally:
        child.close(force=True)


def test_multiline_input_and_save_load(chat, tmp_path):
    chat.sendline("first line \\")
    chat.expect(r"\.\.\. ")
    chat.sendline("second line")
    chat.expect("tok/s")
    chat.expect(PROMPT)
    chat.sendline("/save conv.chat")
    chat.expect("saved 2 messages")
    chat.expect(PROMPT)
    chat.sendline("/reset")
    chat.expect(PROMPT)
    chat.sendline("/load conv.chat")
    chat.expect("loaded 2 messages")
    chat.expect(PROMPT)
    cached, messages = stats(chat)
    assert messages == 2 and cached > 10
    chat.sendline("/load missing.chat")
    chat.expect("no saved chat")
    chat.expect(PROMPT)
    chat.sendline("/nope")
    chat.expect("unknown command")
    chat.sendeof()
    chat.expect(pexpect.EOF)


def test_tool_calls_are_confirmed_run_and_fed_back(chat_model, monkeypatch):
    """The REPL's tool loop, with a chat whose model asks for a tool once."""
    from rich.console import Console

    from mlx_lfm2.cli.chat import load_tools
    from mlx_lfm2.cli.repl import Repl
    from mlx_lfm2.engine.session import Chat

    model, tok, _ = chat_model
    chat = Chat(model, tok, temperature=0.0)
    replies = iter(['<|tool_call_start|>[add(a=2, b=3)]<|tool_call_end|>', "The sum is 5."])

    def fake_reply(**kw):
        from mlx_lfm2.engine.generation import GenerationResponse

        text = next(replies)
        chat.messages.append({"role": "assistant", "content": text})
        yield GenerationResponse(text, None, None, "stop", 1, 1, 1.0, 1.0, 0.0)

    monkeypatch.setattr(chat, "reply", fake_reply)
    console = Console(record=True, width=120, force_terminal=False)
    monkeypatch.setattr(console, "input", lambda prompt="": "y")
    tools_file = ROOT / "tests/fixtures/tools_example.py"
    tools = load_tools(tools_file)
    assert set(tools) == {"add", "get_weather"}
    Repl(chat, console, tools, markdown=False, max_tokens=10).turn("What is 2+3?")
    out = console.export_text()
    assert "tool call add(a=2, b=3)" in out and "→ 5" in out and "The sum is 5." in out
    assert "<|tool_call_start|>" not in out
    assert [m["role"] for m in chat.messages] == ["user", "assistant", "tool", "assistant"]
    assert chat.messages[2]["content"] == "5"


def test_bad_model_path_is_a_clean_error(tmp_path):
    import subprocess

    p = subprocess.run([sys.executable, str(ROOT / "chat.py"), "--model", str(tmp_path / "nope")],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode != 0 and "neither a model folder nor a hub repo id" in p.stderr
    assert "Traceback" not in p.stderr


def _scripted_chat(chat_model, monkeypatch, replies):
    from mlx_lfm2.engine.generation import GenerationResponse
    from mlx_lfm2.engine.session import Chat

    model, tok, _ = chat_model
    chat = Chat(model, tok, temperature=0.0)
    replies = iter(replies)

    def fake_reply(**kw):
        text = next(replies)
        chat.messages.append({"role": "assistant", "content": text})
        yield GenerationResponse(text, None, None, "stop", 1, 1, 1.0, 1.0, 0.0)

    monkeypatch.setattr(chat, "reply", fake_reply)
    return chat


def test_untrusted_text_is_shown_literally_never_as_markup(chat_model, monkeypatch):
    from rich.console import Console

    from mlx_lfm2.cli.repl import Repl

    call = '<|tool_call_start|>[echo(text="[conceal]rm -rf ~[/conceal] [/x] \x1b[8mhidden\u202e")]<|tool_call_end|>'
    chat = _scripted_chat(chat_model, monkeypatch, [call, "Model says [/script] and [bold]x[/bold]."])
    console = Console(record=True, width=200, force_terminal=True, color_system="standard")
    prompts = []
    monkeypatch.setattr(console, "input", lambda prompt="": prompts.append(prompt) or "y")

    def echo(text: str) -> str:
        return f"tool result [/x] {text}"

    Repl(chat, console, {"echo": echo}, markdown=False, max_tokens=10).turn("user text [/x] [conceal]")
    plain = console.export_text()
    assert "[conceal]rm -rf ~[/conceal] [/x] \\x1b[8mhidden\\u202e" in plain  # what the user approves
    assert "→ tool result [/x] [conceal]rm -rf ~[/conceal]" in plain
    assert "Model says [/script] and [bold]x[/bold]." in plain
    assert "\x1b[8m" not in console.export_text(styles=True)  # nothing concealed on the terminal
    Repl(chat, console, {}, markdown=False, max_tokens=10).command("/nope[/x]")
    assert "unknown command /nope[/x]" in console.export_text()
    shown = Console(record=True, width=80)
    shown.print(prompts[0])  # console.input renders its prompt as markup
    assert "run it? [y/N]" in shown.export_text()


def test_save_failures_keep_the_conversation(chat_model, monkeypatch, tmp_path):
    from rich.console import Console

    from mlx_lfm2.cli.repl import Repl

    chat = _scripted_chat(chat_model, monkeypatch, ["Hello [/x]!"])
    console = Console(record=True, width=200)
    repl = Repl(chat, console, {}, markdown=False, max_tokens=10)
    repl.turn("hi")
    before = list(chat.messages)
    (tmp_path / "dir").mkdir()
    for target, reason in [(tmp_path / "missing" / "c.chat", "does not exist"), (tmp_path / "dir", "is a folder")]:
        assert repl.command(f"/save {target}")
        assert reason in console.export_text()
        assert chat.messages == before
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["dir"]  # no temporary file left
    assert repl.command(f"/save {tmp_path / 'ok.chat'}")
    chat.reset()
    assert repl.command(f"/load {tmp_path / 'ok.chat'}")
    assert chat.messages == before


def test_a_conversation_saved_with_another_model_is_refused(chat_model, checkpoint, tmp_path):
    from mlx_lfm2 import load
    from mlx_lfm2.engine.session import Chat

    model, tok, _ = chat_model
    chat = Chat(model, tok, temperature=0.0)
    list(chat.send("hi", max_tokens=2))
    chat.save(tmp_path / "a.chat")
    # Same layer types, cache shapes and vocabulary; another expert count.
    other_model, other_tok = load(checkpoint(tiny_config("tiny-moe", num_experts=4), tokenizer=True))
    other = Chat(other_model, other_tok)
    with pytest.raises(ValueError, match=r"saved with another model \(num_experts 8 there vs 4 here\)"):
        other.load(tmp_path / "a.chat")
    assert other.messages == []
    reloaded = Chat(model, tok)
    reloaded.load(tmp_path / "a.chat")
    assert reloaded.messages == chat.messages


def _saved_chat(chat_model, tmp_path):
    """A short chat saved to ``a.chat``: its bytes, header length and parsed header."""
    import json
    import struct

    from mlx_lfm2.engine.session import Chat

    model, tok, _ = chat_model
    chat = Chat(model, tok, temperature=0.0)
    list(chat.send("hi", max_tokens=2))
    chat.save(tmp_path / "a.chat")
    raw = (tmp_path / "a.chat").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return raw, n, json.loads(raw[8 : 8 + n])


def test_a_damaged_saved_cache_is_refused(chat_model, tmp_path):
    import json
    import struct

    from mlx_lfm2.engine.session import Chat

    model, tok, _ = chat_model
    raw, n, header = _saved_chat(chat_model, tmp_path)

    def variant(name, change):
        h = json.loads(json.dumps(header))
        change(h)
        head = json.dumps(h).encode()
        (tmp_path / name).write_bytes(struct.pack("<Q", len(head)) + head + raw[8 + n:])

    meta = header["__metadata__"]
    tokens = json.loads(meta["tokens"])
    variant("b.safetensors", lambda h: h["__metadata__"].update(tokens=json.dumps(tokens + [1] * 1000)))
    variant("c.safetensors", lambda h: h["k.1"].update(shape=[1, 2, len(tokens), 3]))
    data = bytearray(raw)
    data[-3] ^= 0xFF
    (tmp_path / "d.safetensors").write_bytes(bytes(data))
    fresh = Chat(model, tok)
    for name, why in [("b.safetensors", "conv states is malformed"), ("c.safetensors", "holds 8|its shape needs"),
                      ("d.safetensors", "checksum mismatch")]:
        with pytest.raises(ValueError, match=why):
            fresh.load(tmp_path / name)
    assert fresh.messages == []

def test_a_message_beyond_the_context_is_refused_and_the_conversation_kept(checkpoint):
    from rich.console import Console

    from mlx_lfm2 import load
    from mlx_lfm2.cli.repl import Repl
    from mlx_lfm2.engine.session import Chat

    model, tok = load(checkpoint(tiny_config("tiny-moe", max_position_embeddings=96), tokenizer=True))
    chat = Chat(model, tok, temperature=0.0)
    console = Console(record=True, width=300)
    repl = Repl(chat, console, {}, markdown=False, max_tokens=4)
    repl.turn("hi")
    before, cached = list(chat.messages), chat.cached_tokens
    repl.turn("word " * 200)
    out = console.export_text()
    assert "not sent: prompt of" in out and "does not fit the model's context of 96 tokens" in out
    assert chat.messages == before and chat.cached_tokens == cached
    repl.turn("ok")  # and the conversation goes on
    assert [m["role"] for m in chat.messages] == ["user", "assistant"] * 2


def test_tools_on_a_folder_or_a_failing_file_is_a_clear_error(tmp_path):
    from mlx_lfm2.cli.chat import load_tools

    with pytest.raises(SystemExit, match="--tools takes a Python file, and .* is a folder"):
        load_tools(tmp_path)
    broken = tmp_path / "tools.py"
    broken.write_text("import no_such_module_here\n")
    with pytest.raises(SystemExit, match="importing the tools file .*tools.py failed: ModuleNotFoundError: "
                                         "No module named 'no_such_module_here'"):
        load_tools(broken)
    broken.write_text("def f(:\n")
    with pytest.raises(SystemExit, match="tools.py failed: SyntaxError"):
        load_tools(broken)


def test_a_crafted_saved_chat_is_refused_at_load_and_the_conversation_kept(chat_model, tmp_path):
    import json
    import struct

    from rich.console import Console

    from mlx_lfm2.cli.repl import Repl
    from mlx_lfm2.engine.session import Chat

    model, tok, _ = chat_model
    raw, n, header = _saved_chat(chat_model, tmp_path)
    meta = header["__metadata__"]
    crafted = {
        "messages": ([5], "message 0 is not a {role, content} pair"),
        "messages2": ([{"role": "user"}], "message 0 is not"),
        "messages3": ([{"role": "user", "content": {"a": 1}}], "message 0 is not"),
        "messages4": ([{"role": ["user"], "content": "x"}], "message 0 is not"),
        "tokens": (json.loads(meta["tokens"])[:-1] + [10**9], "outside the vocabulary"),
        "plain": ([[0, 10**9]], "span outside its text"),
    }
    chat = Chat(model, tok, temperature=0.0)
    console = Console(record=True, width=300)
    repl = Repl(chat, console, {}, markdown=False, max_tokens=3)
    repl.turn("my own conversation")
    before = list(chat.messages)
    for name, (value, why) in crafted.items():
        h = json.loads(json.dumps(header))
        h["__metadata__"][name.rstrip("234")] = json.dumps(value)
        head = json.dumps(h).encode()
        (tmp_path / f"{name}.chat").write_bytes(struct.pack("<Q", len(head)) + head + raw[8 + n:])
        assert repl.command(f"/load {tmp_path / name}.chat")
        assert why in console.export_text(), (name, console.export_text())
        assert chat.messages == before
    repl.turn("and it goes on")  # the next turn runs on the kept conversation
    assert chat.messages[: len(before)] == before and len(chat.messages) == len(before) + 2


def test_markdown_links_show_their_real_target(chat_model, monkeypatch):
    from rich.console import Console

    from mlx_lfm2.cli.repl import Repl

    chat = _scripted_chat(chat_model, monkeypatch, ["see [the docs](https://evil.example/steal) now"])
    import io

    raw = io.StringIO()
    console = Console(file=raw, record=True, width=200, force_terminal=True, color_system="standard")
    Repl(chat, console, {}, markdown=True, max_tokens=10).turn("hi")
    assert "the docs (https://evil.example/steal)" in console.export_text()
    assert "evil.example" in raw.getvalue() and "\x1b]8;" not in raw.getvalue()  # no hidden-target hyperlink
