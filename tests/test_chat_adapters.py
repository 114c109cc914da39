"""Switching adapters mid-conversation (``Chat.use_adapter``, chat.py ``/adapter``): each reply
equals a cold run of the whole conversation on the model with only that adapter, and the
re-prefill a switch costs is what the REPL says."""

import re
import sys

import pytest

from adapter_helpers import make_adapter
from conftest import ROOT, tiny_config
from mlx_lfm2 import load
from mlx_lfm2.engine.generation import generate
from mlx_lfm2.engine.session import Chat

GREEDY = dict(temperature=0, max_tokens=10, repetition_penalty=1.0)  # (see the report: Chat and generate
# apply the model card's repetition penalty differently, adapters or not)


@pytest.fixture(scope="module")
def setup(checkpoint, tmp_path_factory):
    base = checkpoint(tiny_config("tiny-moe"), tokenizer=True)
    root = tmp_path_factory.mktemp("chat-adapters")
    folders = {"x": make_adapter(base, root / "x", seed=11), "y": make_adapter(base, root / "y", seed=12, rank=8)}
    return base, folders


def test_a_switch_mid_conversation_equals_a_cold_run_with_that_adapter(setup):
    base, folders = setup
    model, tok = load(base, adapters=folders)
    chat = Chat(model, tok, **GREEDY)
    alone = {n: load(base, adapter_path=f)[0] for n, f in folders.items()}
    alone[None] = load(base)[0]

    def turn(text, adapter, n=10):
        if adapter != chat.adapter:
            chat.use_adapter(adapter)
        reply = "".join(r.text for r in chat.send(text, max_tokens=n))
        want = generate(alone[adapter], tok, chat.messages[:-1], **{**GREEDY, "max_tokens": n})  # a cold run
        assert reply == want, (adapter, chat.messages)
        return reply

    # One token for y's first reply: its cache then holds exactly that turn's prompt (a sampled
    # reply's ids need not be how its text re-encodes, so a cache holding them is not a cold run).
    replies = [turn("Hello there", "y", n=1), turn("Tell me more", "x"), turn("And then?", None)]
    total, cached = chat.use_adapter("y")  # y's cache of the first turn's prompt is still valid under y
    assert 0 < cached < total
    replies += [turn("Back to you", "y"), turn("Plain again", None)]  # resuming from it: still exact
    assert len(set(replies)) > 1


def test_a_switch_reports_what_is_re_prefilled(setup):
    base, folders = setup
    model, tok = load(base, adapters=folders)
    chat = Chat(model, tok, **GREEDY)
    assert chat.use_adapter("x") == (0, 0)
    list(chat.send("Hi"))
    total, cached = chat.use_adapter("y")
    assert total > 0 and cached == 0  # nothing of it was computed under y
    total2, cached2 = chat.use_adapter("x")
    assert total2 == total and cached2 > 0  # x's own cache of the conversation
    with pytest.raises(KeyError, match="'z' is not loaded"):
        chat.use_adapter("z")
    assert chat.adapter == "x"


def test_chat_cli_adapter_command(setup, tmp_path):
    pexpect = pytest.importorskip("pexpect")
    base, folders = setup
    child = pexpect.spawn(sys.executable, [str(ROOT / "chat.py"), "--model", str(base), "--max-tokens", "8",
                                           "--temperature", "0", "--adapter", f"x={folders['x']}"],
                          encoding="utf-8", codec_errors="replace", timeout=60, dimensions=(50, 200), cwd=str(tmp_path),
                          env={"TERM": "xterm", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    try:
        child.expect(">>> ")
        child.sendline("Hello")
        child.expect("tok/s")
        child.expect(">>> ")
        child.sendline("/adapter x")
        child.expect(r"replies now use adapter x; the next turn re-prefills (\d+) of (\d+) tokens")
        assert child.match.group(1) == child.match.group(2)
        child.expect(">>> ")
        child.sendline("/adapter nope")
        child.expect(re.escape("adapter 'nope' is not loaded (loaded: x)"))
        child.expect(">>> ")
        child.sendline("/adapter off")
        child.expect(r"replies now use the base; the next turn re-prefills (\d+) of (\d+) tokens")
        assert int(child.match.group(1)) < int(child.match.group(2))  # the base cached the first turn
        child.expect(">>> ")
        child.sendline("/quit")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)


def test_a_saved_chat_restores_its_adapter_and_files_its_cache_under_it(setup, tmp_path):
    """``Chat.save`` records the adapter replies use and the adapter its cache was computed
    under; ``load`` restores the first and reuses the cache only under that adapter's content."""
    base, folders = setup
    model, tok = load(base, adapters=folders)
    chat = Chat(model, tok, **GREEDY)
    chat.use_adapter("y")
    list(chat.send("Hello there", max_tokens=1))
    chat.save(tmp_path / "y.safetensors")
    chat.use_adapter(None)  # switched, no turn since: the saved cache is still y's
    chat.save(tmp_path / "base.safetensors")

    again = Chat(model, tok, **GREEDY)
    again.load(tmp_path / "y.safetensors")
    assert again.adapter == "y"
    total, cached = again.use_adapter("y")
    assert 0 < cached <= total  # y's cache, filed under y
    reply = "".join(r.text for r in again.send("Tell me more"))
    alone = load(base, adapter_path=folders["y"])[0]
    assert reply == generate(alone, tok, again.messages[:-1], **GREEDY)  # a cold run with y alone

    plain = Chat(model, tok, **GREEDY)
    plain.load(tmp_path / "base.safetensors")
    assert plain.adapter is None and plain.use_adapter(None)[1] == 0  # y's cache is never the base's
    assert plain.use_adapter("y")[1] > 0

    swapped, _ = load(base, adapters={"y": folders["x"]})  # another adapter under the same name
    other = Chat(swapped, tok, **GREEDY)
    other.load(tmp_path / "y.safetensors")
    assert other.adapter == "y" and other.use_adapter("y")[1] == 0  # its content differs: re-prefilled
    with pytest.raises(ValueError, match=r"replies with adapter 'y', which is not loaded here \(loaded: none\)"):
        Chat(load(base)[0], tok, **GREEDY).load(tmp_path / "y.safetensors")
