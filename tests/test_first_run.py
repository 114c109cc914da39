"""The first run: model choice by memory, disk checks before any download, pre-quantized folders
preferred (and verified), otherwise download + convert + offer to remove. Hub and machine faked."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from rich.console import Console

from conftest import tiny_config
from mlx_lfm2.weights import provision
from mlx_lfm2.weights.hub import HubError
from mlx_lfm2.weights.provision import CATALOGUE, FitError, Machine

E24, E8 = CATALOGUE[0], CATALOGUE[1]


def mac(gb):  # Apple reports a recommended working set of about 2/3 of unified memory
    return Machine(gb, gb * 2 / 3, "the GPU's recommended working set")


@pytest.mark.parametrize("memory, name", [(64, "LFM2-24B-A2B"), (32, "LFM2-24B-A2B"),
                                          (16, "LFM2-8B-A1B"), (8, "LFM2-2.6B")])
def test_default_is_the_largest_model_that_fits(memory, name):
    entry, line = provision.choose_default(mac(memory))
    assert entry.name == name and line.startswith(f"Model: {name}")
    if name != "LFM2-24B-A2B":
        assert "LFM2-24B-A2B needs 13.8 GB + 2 GB margin" in line


def test_nothing_fits_names_the_numbers():
    with pytest.raises(FitError, match=r"no LFM2 model fits this machine: 1\.3 GB .* needs 0\.9 GB \+ 2 GB"):
        provision.choose_default(mac(2))


def test_model_override_too_big_is_a_warning_naming_one_that_fits():
    w = provision.fit_warning("LiquidAI/LFM2-24B-A2B", 47.7, mac(16))
    assert "47.7 GB of weights" in w and "10.7 GB" in w and "LFM2-8B-A1B at 4 bits (~4.9 GB) fits" in w
    assert provision.fit_warning("small", 1.0, mac(16)) is None


class FakeHub:
    """model_info / snapshot_download over a dict {repo: {filename: bytes or generator}}."""

    def __init__(self, root: Path, repos: dict, sizes: dict):
        self.root, self.repos, self.sizes, self.downloads = root, repos, sizes, []

    def model_info(self, repo, files_metadata=False):
        if repo not in self.repos:
            raise FileNotFoundError(repo)
        return SimpleNamespace(siblings=[SimpleNamespace(rfilename=f, size=self.sizes.get((repo, f), 1000))
                                         for f in self.repos[repo]])

    def download(self, repo, allow_patterns=None, **kw):
        import fnmatch

        if repo not in self.repos:
            raise FileNotFoundError(repo)
        self.downloads.append((repo, tuple(allow_patterns or ())))
        out = self.root / repo.replace("/", "--")
        out.mkdir(parents=True, exist_ok=True)
        for name, src in self.repos[repo].items():
            if allow_patterns and not any(fnmatch.fnmatch(name, p) for p in allow_patterns):
                continue
            if isinstance(src, Path):
                (out / name).write_bytes(src.read_bytes())
            else:
                (out / name).write_text(src)
        return str(out)


@pytest.fixture
def setup(tmp_path, monkeypatch, checkpoint):
    """A fake hub holding a tiny real checkpoint under the 24B repo id, and plenty of disk."""
    src = checkpoint(tiny_config("tiny-moe"), tokenizer=True)
    files = {f.name: f for f in src.iterdir() if f.is_file()}
    monkeypatch.setattr(provision, "_hub_cache", lambda: tmp_path / "hf")
    monkeypatch.setattr(provision, "_cached_gb", lambda repo: 0.0)
    monkeypatch.setattr(provision, "free_disk_gb", lambda path: 500.0)
    removed = []
    monkeypatch.setattr(provision, "_remove_from_cache", removed.append)

    def make(repos=None, sizes=None):
        hub = FakeHub(tmp_path / "hf", repos or {E24.repo: files}, sizes or {})
        return hub, removed

    return make, files


def run(hub, tmp_path, memory=32, confirm=None, entry=E24):
    console = Console(record=True, width=200)
    folder = provision.provision(entry, tmp_path / "home", console, m=mac(memory), api=hub,
                                 download=hub.download, confirm=confirm)
    return folder, console.export_text()


def test_no_prequantized_folder_downloads_only_what_conversion_needs_then_converts(setup, tmp_path):
    make, _ = setup
    hub, removed = make()
    folder, out = run(hub, tmp_path, confirm=lambda q: True)
    assert folder == tmp_path / "home" / "models" / "LFM2-24B-A2B-4bit-mixed8"
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["quantization"]["bits"] == 4  # converted, and loadable:
    from mlx_lfm2 import load

    load(folder)
    assert (E24.repo, tuple(provision.HUB_PATTERNS)) in hub.downloads
    assert "downloading LiquidAI/LFM2-24B-A2B" in out and removed == [E24.repo]
    # A second run finds the folder: no hub call at all.
    hub.downloads.clear()
    assert run(hub, tmp_path)[0] == folder and hub.downloads == []


def test_original_download_is_kept_unless_the_user_says_yes(setup, tmp_path):
    make, _ = setup
    hub, removed = make()
    run(hub, tmp_path, confirm=lambda q: False)
    assert removed == []


@pytest.mark.parametrize("before", [3.0, None])  # partly there already / cache unreadable
def test_a_download_that_may_not_be_ours_is_never_offered_for_removal(setup, tmp_path, monkeypatch, before):
    make, _ = setup
    hub, removed = make()
    monkeypatch.setattr(provision, "_cached_gb", lambda repo: before)
    asked = []
    run(hub, tmp_path, confirm=lambda q: asked.append(q) or True)
    assert asked == [] and removed == []


def test_not_enough_disk_is_refused_before_downloading(setup, tmp_path, monkeypatch):
    make, files = setup
    hub, _ = make(sizes={(E24.repo, "model.safetensors"): 47.7e9})
    monkeypatch.setattr(provision, "free_disk_gb", lambda path: 30.0)
    with pytest.raises(FitError, match=r"need 61\.5 GB \(47\.7 GB in .*, 13\.8 GB in .*\), 30\.0 GB free"):
        run(hub, tmp_path)
    assert all(pats != tuple(provision.HUB_PATTERNS) for _, pats in hub.downloads)  # no weights fetched


def prequantized_files(bits=4, expert_bias=True):
    keys = {"model.layers.2.feed_forward.switch_mlp.gate_proj.scales": "model.safetensors"}
    if expert_bias:
        keys["model.layers.2.feed_forward.expert_bias"] = "model.safetensors"
    cfg = dict(E24.expect, quantization={"bits": bits, "group_size": 64})
    return {"config.json": json.dumps(cfg), "model.safetensors.index.json": json.dumps({"weight_map": keys}),
            "model.safetensors": "weights", "tokenizer.json": "{}"}


def test_a_verified_prequantized_folder_is_taken_without_conversion(setup, tmp_path):
    make, files = setup
    hub, _ = make({E24.repo: files, E24.prequantized[0]: prequantized_files()})
    folder, out = run(hub, tmp_path)
    assert Path(folder).name == E24.prequantized[0].replace("/", "--")
    assert (Path(folder) / "model.safetensors").exists()
    assert all(repo != E24.repo for repo, _ in hub.downloads) and "no conversion" in out


@pytest.mark.parametrize("bad, reason", [(dict(bits=8), "not 4-bit"), (dict(expert_bias=False), "expert_bias")])
def test_an_unusable_prequantized_folder_falls_back_to_converting(setup, tmp_path, bad, reason):
    make, files = setup
    hub, _ = make({E24.repo: files, E24.prequantized[1]: prequantized_files(**bad)})
    folder, out = run(hub, tmp_path)
    assert "Skipping mlx-community/LFM2-24B-A2B-4bit" in out and reason in out
    assert folder.name == "LFM2-24B-A2B-4bit-mixed8" and (E24.repo, tuple(provision.HUB_PATTERNS)) in hub.downloads


def test_wrong_architecture_is_rejected():
    cfg = dict(E24.expect, num_experts=32, quantization={"bits": 4, "group_size": 64})
    assert "num_experts is 32" in provision.verify_prequantized(cfg, {}, E24)


def test_chat_default_model_says_what_it_picked(setup, tmp_path, monkeypatch):
    from mlx_lfm2.cli import chat as cli

    make, files = setup
    hub, _ = make({E8.repo: files})
    monkeypatch.setattr(cli, "HOME", tmp_path / "home")
    monkeypatch.setattr(provision, "machine", lambda: mac(16))
    monkeypatch.setattr(provision, "_api", lambda api: hub)
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", hub.download)
    console = Console(record=True, width=200)
    folder = cli.default_model(console)
    assert folder.name == "LFM2-8B-A1B-4bit-mixed8"
    assert "Model: LFM2-8B-A1B, 4-bit (~4.9 GB), for 10.7 GB" in console.export_text()


def test_a_failed_download_says_what_to_do(setup, tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    make, files = setup
    hub, _ = make()

    def offline(repo, allow_patterns=None, **kw):
        if allow_patterns == provision.HUB_PATTERNS:
            raise OSError("Name or service not known")
        return hub.download(repo, allow_patterns, **kw)

    console = Console(record=True)
    with pytest.raises(HubError) as e:
        provision.provision(E24, tmp_path / "home", console, m=mac(32), api=hub, download=offline)
    assert str(e.value) == (
        "could not get LiquidAI/LFM2-24B-A2B from the Hugging Face hub: the hub cannot be reached (OSError: Name "
        "or service not known). To go on: check the network and run again (a partial download is kept and "
        "resumes), use a model on disk with --model FOLDER, or set HF_HUB_OFFLINE=1 to use a copy in the "
        "Hugging Face cache.")


BIG = {(E24.repo, "model.safetensors"): 47.7e9}


def test_a_large_download_without_a_terminal_is_refused_with_the_command_that_confirms(setup, tmp_path):
    make, _ = setup
    hub, _ = make(sizes=BIG)
    with pytest.raises(provision.DownloadRefused) as e:
        provision.provision(E24, tmp_path / "home", Console(record=True), m=mac(64), api=hub,
                            download=hub.download, confirm=None, command="python chat.py --yes")
    assert str(e.value).startswith("LFM2-24B-A2B (the original LiquidAI/LFM2-24B-A2B, converted once to 4-bit: "
                                   "~13.8 GB in ")
    assert ("needs a download of 47.7 GB (~64 min at 100 Mbit/s), and stdin is not a terminal to ask first. "
            "To download it run `python chat.py --yes`; or use a model on disk with --model FOLDER") in str(e.value)
    assert all(pats != tuple(provision.HUB_PATTERNS) for _, pats in hub.downloads)  # no weights fetched


@pytest.mark.parametrize("answer", [True, False])
def test_a_large_download_is_asked_for_at_a_terminal(setup, tmp_path, answer):
    make, _ = setup
    hub, _ = make(sizes=BIG)
    asked = []

    def ask(question):
        asked.append(question)
        return answer

    if answer:
        assert run(hub, tmp_path, memory=64, confirm=ask)[0].name == "LFM2-24B-A2B-4bit-mixed8"
    else:
        with pytest.raises(provision.DownloadRefused, match="nothing was downloaded; pick another model"):
            run(hub, tmp_path, memory=64, confirm=ask)
        assert all(pats != tuple(provision.HUB_PATTERNS) for _, pats in hub.downloads)
    assert asked[0].endswith("needs a download of 47.7 GB (~64 min at 100 Mbit/s). Download it now? [y/N] ")


def test_yes_downloads_without_asking_and_small_downloads_are_not_asked_for(setup, tmp_path):
    make, _ = setup
    hub, _ = make(sizes=BIG)
    folder = provision.provision(E24, tmp_path / "home", Console(record=True), m=mac(64), api=hub,
                                 download=hub.download, confirm=None, yes=True)
    assert folder.name == "LFM2-24B-A2B-4bit-mixed8"
    provision.confirm_download("small", provision.ASK_GB, None, False, "unused")  # 1 GB: no question


def test_an_unreachable_hub_is_said_before_anything_is_asked(setup, tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    make, _ = setup
    hub, _ = make()

    def unreachable(repo, files_metadata=False):
        raise ConnectionError("[Errno -3] Temporary failure in name resolution")

    hub.model_info = unreachable
    asked = []
    with pytest.raises(HubError, match=r"the hub cannot be reached \(ConnectionError: \[Errno -3\] Temporary"):
        run(hub, tmp_path, confirm=lambda q: asked.append(q))
    assert asked == [] and all(pats != tuple(provision.HUB_PATTERNS) for _, pats in hub.downloads)


def test_without_a_gpu_the_first_run_says_what_speed_to_expect_and_names_faster_models():
    from mlx_lfm2.model import device

    with device.assume("cpu"):
        note = provision.cpu_note(E24)
    assert note == ("No GPU: MLX runs on the CPU here, where LFM2-24B-A2B decodes at about 0.6 tokens/s (on a "
                    "2-core x86 CPU; more cores are faster). Faster: --model LiquidAI/LFM2-8B-A1B (~1.0 tok/s); "
                    "--model LiquidAI/LFM2-1.2B (~1.2 tok/s).")
    with device.assume("gpu"):
        assert provision.cpu_note(E24) is None


def test_chat_without_a_terminal_refuses_a_large_first_download_naming_yes(setup, tmp_path, monkeypatch):
    from mlx_lfm2.cli import chat as cli

    make, files = setup
    hub, _ = make({E8.repo: files}, sizes={(E8.repo, "model.safetensors"): 16.7e9})
    monkeypatch.setattr(cli, "HOME", tmp_path / "home")
    monkeypatch.setattr(provision, "machine", lambda: mac(16))
    monkeypatch.setattr(provision, "_api", lambda api: hub)
    monkeypatch.setattr("sys.argv", ["chat.py", "--max-tokens", "64"])
    monkeypatch.setattr("sys.stdin.isatty", lambda: False)
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", hub.download)
    with pytest.raises(SystemExit) as e:
        cli.main(["--max-tokens", "64"])
    assert "needs a download of 16.7 GB" in str(e.value) and "run `python chat.py --max-tokens 64 --yes`" in str(e.value)
