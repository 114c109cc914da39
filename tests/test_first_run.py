"""The first run: model choice by memory, disk checks before any download, pre-quantized folders
preferred (and verified), otherwise download + convert + offer to remove. Hub and machine faked."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from rich.console import Console

from conftest import tiny_config
from mlx_lfm2.weights import provision
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


def test_a_failed_download_says_what_to_do(setup, tmp_path):
    make, files = setup
    hub, _ = make()

    def offline(repo, allow_patterns=None, **kw):
        if allow_patterns == provision.HUB_PATTERNS:
            raise OSError("Name or service not known")
        return hub.download(repo, allow_patterns, **kw)

    console = Console(record=True)
    with pytest.raises(FileNotFoundError, match="could not download LiquidAI/LFM2-24B-A2B .* resumes"):
        provision.provision(E24, tmp_path / "home", console, m=mac(32), api=hub, download=offline)
