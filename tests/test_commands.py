"""Every command's --help shows its defaults and says what it serves, --version works
everywhere, and usage lines name the command as it was typed."""

import subprocess
import sys
from importlib.metadata import version

import pytest

from conftest import ROOT
from mlx_lfm2.cli import cache_prompt, chat, generate
from mlx_lfm2.command import PACKAGE
from mlx_lfm2.serve import app
from mlx_lfm2.weights import conversion, random_checkpoint

HELP = {
    "chat": (chat.main, ["--max-tokens MAX_TOKENS\n                        longest reply, in tokens (default: 2048)",
                         "/retry", "/undo", "/stats", "/save PATH", "Ctrl-C stops a reply", "--yes",
                         "asks before a download over 1 GB"]),
    "generate": (generate.main, ["(default: 100)", "sampling temperature (0: greedy) (default: 0.0)",
                                 "(default: hello)", "defaults (greedy, 100 tokens)"]),
    "server": (app.main, ["TCP port (default: 8080)", "requests waiting before 429 (default: 16)",
                          "prompt caches kept for reuse (default: 8)", "the OpenAI API", "the Anthropic Messages API"]),
    "cache_prompt": (cache_prompt.main, ["model folder or hub repo id (default: mlx_model)",
                                         "mlx_lm.cache_prompt's flags and file"]),
    "convert": (conversion.main, ["bits per quantized weight (default: 4)", "(default: uniform)", "mlx-lm's layout"]),
    "random_checkpoint": (random_checkpoint.main, ["out                   folder to write (created if needed)",
                                                   "model shape (default: tiny-moe)", "trying the commands offline"]),
}


def output_of(main, args, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # wrapping aside


@pytest.mark.parametrize("command", HELP)
def test_help_shows_defaults_and_what_the_command_serves(command, capsys):
    main, snippets = HELP[command]
    text = output_of(main, ["--help"], capsys)
    for snippet in snippets:
        assert " ".join(snippet.split()) in text, (snippet, text)
    assert "(default: None)" not in text and "(default: False)" not in text


@pytest.mark.parametrize("command", HELP)
def test_version_everywhere(command, capsys):
    text = output_of(HELP[command][0], ["--version"], capsys)
    assert text.startswith(f"mlx-lfm2 {version('mlx-lfm2')} (mlx {version('mlx')}, Python ")


@pytest.mark.parametrize("argv0, usage", [
    (str(PACKAGE / "random_checkpoint.py"), "usage: python -m mlx_lfm2.random_checkpoint [-h] [--version]"),
    ("chat.py", "usage: python chat.py [-h]"),
    ("/somewhere/.venv/bin/mlx-lfm2-server", "usage: mlx-lfm2-server [-h]"),
])
def test_usage_names_the_command_as_typed(argv0, usage, capsys, monkeypatch):
    main = {"random_checkpoint.py": random_checkpoint.main, "chat.py": chat.main}.get(argv0.split("/")[-1], app.main)
    monkeypatch.setattr(sys, "argv", [argv0])
    assert output_of(main, ["--help"], capsys).startswith(usage)


def test_random_checkpoint_usage_from_a_real_shell():
    p = subprocess.run([sys.executable, "-m", "mlx_lfm2.random_checkpoint", "--help"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stdout.startswith("usage: python -m mlx_lfm2.random_checkpoint "), p.stdout
