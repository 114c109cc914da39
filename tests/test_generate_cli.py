"""``python -m mlx_lfm2.generate``: mlx-lm's flags and output shape, the same completion."""

import re
import subprocess
import sys

import pytest

from conftest import ROOT, tiny_config

NUMBER = re.compile(r"\d+(\.\d+)?")


def run(module, *args, stdin=None):
    out = subprocess.run([sys.executable, "-m", module, *args], input=stdin, capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_the_module_name_leaves_the_generate_function_alone():
    code = ("import mlx_lfm2.generate, sys; from mlx_lfm2 import generate; import mlx_lfm2; "
            "from mlx_lfm2.engine.generation import generate as g; "
            "assert generate is g and mlx_lfm2.generate is g, generate; "
            "assert sys.modules['mlx_lfm2.generate'].main; print('ok')")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT).stdout == "ok\n"


def test_completion_and_stats_lines_in_mlx_lm_shape(chat_model):
    from mlx_lfm2 import generate, stream_generate

    model, tok, folder = chat_model
    out = run("mlx_lfm2.generate", "--model", str(folder), "--prompt", "Hello!", "--max-tokens", "12",
              "--temp", "0", "--system", "Be brief.")
    lines = out.split("\n")
    assert lines[0] == "==========" and lines[-5] == "==========", out
    assert re.fullmatch(r"Prompt: \d+ tokens, \d+\.\d{3} tokens-per-sec", lines[-4])
    assert re.fullmatch(r"Generation: \d+ tokens, \d+\.\d{3} tokens-per-sec", lines[-3])
    assert re.fullmatch(r"Peak memory: \d+\.\d{3} GB", lines[-2]) and lines[-1] == ""
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}]
    expected = generate(model, tok, messages, max_tokens=12, temperature=0)
    assert "\n".join(lines[1:-5]) == expected
    n_prompt = len(tok.apply_chat_template(messages, tokenize=True))
    *_, last = stream_generate(model, tok, messages, max_tokens=12, temperature=0)
    assert lines[-4].startswith(f"Prompt: {n_prompt} tokens")
    assert lines[-3].startswith(f"Generation: {last.generation_tokens} tokens")

    # --verbose F prints only the completion; '-' reads the prompt from stdin
    quiet = run("mlx_lfm2.generate", "--model", str(folder), "-p", "-", "-m", "12", "--temp", "0",
                "--system-prompt", "Be brief.", "--verbose", "F", stdin="Hello!")
    assert quiet == expected + "\n"
    raw = run("mlx_lfm2.generate", "--model", str(folder), "-p", "Once upon", "-m", "6",
              "--ignore-chat-template", "--verbose", "F")
    assert raw == generate(model, tok, "Once upon", max_tokens=6) + "\n"


def test_speculative_flags_reach_the_engine_and_keep_the_greedy_text(chat_model, monkeypatch, capsys):
    from mlx_lfm2.cli import generate as cli
    from mlx_lfm2.engine import generation

    folder = chat_model[2]
    args = ["--model", str(folder), "-p", "Tell me a story", "-m", "16", "--verbose", "F"]
    plain = run("mlx_lfm2.generate", *args)
    seen, real = [], generation.stream_generate

    def spy(*a, **kw):
        seen.append(kw)
        yield from real(*a, **kw)

    monkeypatch.setattr(generation, "stream_generate", spy)
    for extra in (["--draft-model", str(folder), "--num-draft-tokens", "2"], ["--prompt-lookup"]):
        cli.main(args + extra)
        assert capsys.readouterr().out == plain
    assert seen[0]["draft_model"] is not None and seen[0]["num_draft_tokens"] == 2 and not seen[0]["prompt_lookup"]
    assert seen[1]["draft_model"] is None and seen[1]["prompt_lookup"]


@pytest.mark.slow
def test_same_command_same_text_and_same_lines_as_mlx_lm(checkpoint, tmp_path):
    pytest.importorskip("mlx_lm")
    from mlx_lfm2 import convert

    # mlx-lm reads mlx-lm folders: give both the converted one (float32: identical greedy tokens)
    folder = convert(checkpoint(tiny_config("tiny-dense"), tokenizer=True), tmp_path / "m", dtype="float32",
                     progress=False)
    args = ["--model", str(folder), "--prompt", "Write a haiku", "--max-tokens", "10", "--temp", "0"]
    ours = run("mlx_lfm2.generate", *args).split("\n")
    theirs = [line for line in run("mlx_lm", "generate", *args).split("\n")]
    assert ours[:-4] == theirs[:-4]  # separators and completion
    assert [NUMBER.sub("N", line) for line in ours[-4:]] == [NUMBER.sub("N", line) for line in theirs[-4:]]
    assert ours[-4].split(",")[0] == theirs[-4].split(",")[0]  # same prompt token count


def test_undecodable_stdin_is_a_clear_error(monkeypatch):
    import io

    from mlx_lfm2.cli import generate

    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"caf\xe9 au lait")))
    with pytest.raises(SystemExit, match=r"error: the prompt on stdin is not UTF-8 text \(byte 3 is b'\\xe9'\)"):
        generate.main(["--model", "unused", "--prompt", "-"])


@pytest.mark.parametrize("value, message", [("0", "must be at least 1, not 0"), ("-5", "must be at least 1, not -5"),
                                            ("big", "'big' is not a whole number")])
def test_non_positive_prefill_step_size_is_a_usage_error(value, message, capsys):
    from mlx_lfm2.cli import generate

    with pytest.raises(SystemExit) as e:
        generate.parse_args(["--model", "m", "--prefill-step-size", value])
    assert e.value.code == 2
    assert f"argument --prefill-step-size: {message}" in capsys.readouterr().err
