"""Every command says the same one thing when the hub cannot give it a model: the repo, the
cause, and what to do instead (a folder, HF_HUB_OFFLINE, the network). Real commands in
subprocesses, against an empty cache and a hub that refuses connections (or offline mode)."""

import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT, free_port

REPO = "LiquidAI/LFM2-350M"
COMMANDS = {
    "chat": ["chat.py", "--model", REPO],
    "generate": ["-m", "mlx_lfm2.generate", "--model", REPO],
    "server": ["-m", "mlx_lfm2.server", "--model", REPO, "--port", "0"],
    "convert": ["convert.py", "--hf-path", REPO, "--mlx-path", "{tmp}/out"],
}


def error_of(command, tmp_path, **env):
    args = [a.format(tmp=tmp_path) for a in COMMANDS[command]]
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), **env}
    p = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and not (tmp_path / "out").exists(), p.stdout + p.stderr
    return p.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("command", COMMANDS)
def test_offline_mode_without_a_cached_copy_is_one_message(command, tmp_path):
    flag = "--hf-path" if command == "convert" else "--model"
    assert error_of(command, tmp_path, HF_HUB_OFFLINE="1") == (
        f"error: could not get {REPO} from the Hugging Face hub: HF_HUB_OFFLINE is set and the Hugging Face "
        f"cache holds no complete copy of it. To go on: use a model on disk with {flag} FOLDER, or unset "
        "HF_HUB_OFFLINE to download it.")


@pytest.mark.parametrize("command", COMMANDS)
def test_an_unreachable_hub_is_one_message_naming_the_cause(command, tmp_path):
    flag = "--hf-path" if command == "convert" else "--model"
    line = error_of(command, tmp_path, HF_HUB_OFFLINE="0", HF_ENDPOINT=f"http://127.0.0.1:{free_port()}")
    assert re.match(rf"error: could not get {REPO} from the Hugging Face hub: the hub cannot be reached "
                    r"\(ConnectionRefusedError: \[Errno \d+\] Connection refused\)\. ", line), line
    assert line.endswith(
        "To go on: check the network and run again (a partial download is kept and resumes), use a model on "
        f"disk with {flag} FOLDER, or set HF_HUB_OFFLINE=1 to use a copy in the Hugging Face cache."), line
