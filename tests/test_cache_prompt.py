"""mlx-lm's prompt-cache files: ours continue in mlx-lm exactly as its own, and we read its."""

import re
import sys

import mlx.core as mx
import pytest

from conftest import tiny_config
from mlx_lfm2.engine.cache_files import CacheFileError, load_mlx_lm
from mlx_lfm2.engine.cache_files import layout

CACHED = "The capital of France is Paris. The capital of Spain is Madrid."
QUERY = " What is the capital of Italy?"


@pytest.fixture(scope="module")
def files(checkpoint, tmp_path_factory):
    """The same prompt cached by ``mlx_lfm2.cache_prompt`` and by ``mlx_lm.cache_prompt``."""
    pytest.importorskip("mlx_lm")
    from mlx_lm import cache_prompt as theirs

    from mlx_lfm2.cli import cache_prompt as ours

    folder = checkpoint(tiny_config("tiny-moe"), tokenizer=True)
    out = tmp_path_factory.mktemp("prompt_cache")
    ours.main(["--model", str(folder), "--prompt", CACHED, "--prompt-cache-file", str(out / "ours.safetensors")])
    argv, sys.argv = sys.argv, ["cache_prompt", "--model", str(folder), "--prompt", CACHED,
                                "--prompt-cache-file", str(out / "theirs.safetensors")]
    try:
        theirs.main()
    finally:
        sys.argv = argv
    return folder, out / "ours.safetensors", out / "theirs.safetensors"


def query_ids(tokenizer):
    from mlx_lfm2.cli.cache_prompt import split_template

    _, after = split_template(tokenizer, [{"role": "user", "content": QUERY}], True)
    return tokenizer.encode(QUERY + after, add_special_tokens=False)


@pytest.mark.slow
def test_mlx_lm_continues_our_file_exactly_as_its_own(files):
    from mlx_lm.models.cache import load_prompt_cache
    from mlx_lm.utils import load

    from mlx_lfm2.cli.cache_prompt import cached_prompt_ids
    from mlx_lfm2.text.tokenizer import load_tokenizer

    folder, ours, theirs = files
    model, _ = load(str(folder))
    tokenizer = load_tokenizer(folder)
    ids = mx.array([query_ids(tokenizer)])
    logits = []
    for f in (ours, theirs):
        cache, meta = load_prompt_cache(str(f), return_metadata=True)
        assert meta["model"] == str(folder)
        assert [type(c).__name__ for c in cache] == [type(c).__name__ for c in model.make_cache()]
        assert max(getattr(c, "offset", 0) for c in cache) == len(cached_prompt_ids(tokenizer, CACHED))
        logits.append(model(ids, cache=cache))
    assert mx.allclose(logits[0], logits[1], atol=1e-4).item()


@pytest.mark.slow
def test_we_continue_mlx_lm_files_as_a_cold_prefill_of_the_whole_prompt(files):
    from mlx_lfm2 import load
    from mlx_lfm2.cli.cache_prompt import cached_prompt_ids

    folder, ours, theirs = files
    model, tokenizer = load(folder)
    q = query_ids(tokenizer)
    full = cached_prompt_ids(tokenizer, CACHED) + q
    cold = model(mx.array([full]))[:, -len(q):]
    for f in (ours, theirs):
        cache, _ = load_mlx_lm(f, layout(model), 4096)
        assert cache[0].offset == len(full) - len(q)
        assert mx.allclose(model(mx.array([q]), cache=cache), cold, atol=1e-4).item()


def test_a_mlx_lm_file_for_another_layer_layout_is_refused_before_reading(files, checkpoint):
    from mlx_lfm2 import load

    folder, ours, _ = files
    other, _ = load(checkpoint(tiny_config("tiny-moe", layers=6), tokenizer=True))
    with pytest.raises(CacheFileError, match="does not fit this model|this model's layers need"):
        load_mlx_lm(ours, layout(other), 4096)
    with pytest.raises(CacheFileError, match="outside its|expected"):
        load_mlx_lm(ours, layout(load(folder)[0]), 3)  # more positions than the context allows


def test_generate_refuses_a_cache_file_from_other_weights(files, checkpoint, capsys):
    from mlx_lfm2.cli import generate

    _, ours, _ = files
    other = checkpoint(tiny_config("tiny-moe"), tokenizer=True, seed=3)
    with pytest.raises(SystemExit, match="made with other weights"):
        generate.main(["--model", str(other), "--prompt-cache-file", str(ours), "--prompt", QUERY])


def greedy(chat, text, n=6):
    replies = list(chat.send(text, max_tokens=n))
    return [r.token for r in replies if r.token is not None], replies[-1].prompt_tokens


@pytest.mark.slow
def test_chat_continues_a_mlx_lm_prompt_cache_as_a_cold_run_and_keeps_it_across_turns(files, tmp_path):
    """The file's cache has no transcript: the first message continues its cached text and
    only that message is prefilled; the answer equals a cold run of the whole prompt, a later
    turn equals a chat that typed the whole message, /undo goes back to the cached head, and
    /save + /load keep it."""
    from mlx_lfm2 import load
    from mlx_lfm2.cli.cache_prompt import cached_prompt_ids
    from mlx_lfm2.engine.generation import stream_generate
    from mlx_lfm2.engine.session import Chat

    folder, ours, theirs = files
    model, tok = load(folder)
    full = cached_prompt_ids(tok, CACHED) + query_ids(tok)
    cold = [r.token for r in stream_generate(model, tok, full, max_tokens=6) if r.token is not None]
    typed = Chat(model, tok, temperature=0.0, repetition_penalty=None)
    assert greedy(typed, CACHED + QUERY)[0] == cold
    later = greedy(typed, "And of Germany?")[0]
    for f in (ours, theirs):
        chat = Chat(model, tok, system="ignored: the cached prompt starts the conversation",
                    temperature=0.0, repetition_penalty=None)
        chat.load(f, str(folder))
        assert chat.head == chat.cached_tokens == len(cached_prompt_ids(tok, CACHED)) and chat.messages == []
        tokens, prefilled = greedy(chat, QUERY)
        assert tokens == cold and prefilled == len(query_ids(tok))
        assert greedy(chat, "And of Germany?")[0] == later
        chat.save(tmp_path / "head.chat")
        chat.undo()
        chat.undo()
        assert chat.messages == [] and chat.cached_tokens == chat.head
        assert greedy(chat, QUERY)[0] == cold
        again = Chat(model, tok, temperature=0.0, repetition_penalty=None)
        again.load(tmp_path / "head.chat")
        assert again.head == chat.head and len(again.messages) == 4
        again.undo()
        assert greedy(again, "And of Germany?") == (later, greedy(chat, "And of Germany?")[1])


def test_chat_refuses_a_prompt_cache_of_other_weights_or_another_model(files, checkpoint):
    from mlx_lfm2 import load
    from mlx_lfm2.engine.session import Chat

    folder, ours, theirs = files
    other = checkpoint(tiny_config("tiny-moe"), tokenizer=True, seed=5)  # the same layers, other weights
    chat = Chat(*load(other))
    with pytest.raises(ValueError, match="made with other weights than this model's"):
        chat.load(ours, str(other))
    with pytest.raises(ValueError, match=r"was made with the model .*, not .*: chat with --model set to that model"):
        chat.load(theirs, str(other))  # mlx-lm's file names its model, not its weights
    small = Chat(*load(checkpoint(tiny_config("tiny-moe", layers=6), tokenizer=True)))
    with pytest.raises(ValueError, match="is not a prompt cache for this model"):
        small.load(theirs)
    assert chat.messages == [] and chat.head == 0


def test_chat_cli_says_the_file_brings_cached_tokens_and_no_transcript(files):
    import subprocess

    from conftest import ROOT

    folder, ours, _ = files
    p = subprocess.run([sys.executable, str(ROOT / "chat.py"), "--model", str(folder), "--prompt-cache-file", str(ours),
                        "--max-tokens", "3", "--temperature", "0", "--no-markdown"],
                       input=QUERY + "\n/stats\n/quit\n", capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert re.search(r"\d+ cached tokens, no transcript", " ".join(p.stdout.split())), p.stdout
    bad = subprocess.run([sys.executable, str(ROOT / "chat.py"), "--model", str(folder), "--prompt-cache-file",
                          str(folder / "config.json")], capture_output=True, text=True, timeout=300, input="")
    assert bad.returncode != 0 and "error: --prompt-cache-file:" in bad.stderr
