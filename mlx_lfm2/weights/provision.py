"""The first run: pick a model that fits this machine, then get it onto disk with the least download.

Order of decisions, all before a byte of weights is fetched:

1. ``machine()`` reads what the model may use: on Apple Silicon MLX reports the GPU's recommended
   working set (about two thirds to three quarters of unified memory); elsewhere the system's
   memory. A model fits when its weights plus ``MARGIN_GB`` (KV cache, activations, the rest of
   the process) fit in that working set.
2. ``choose_default`` walks ``CATALOGUE`` from the largest model down and takes the first that fits.
3. ``provision`` prefers a published MLX folder of the model in our layout (verified from its
   config.json and index before its weights come down); otherwise it downloads only the files
   conversion needs, converts, and offers to remove the original download. Free disk for the
   download and the output is checked first. huggingface_hub resumes interrupted downloads.
4. A download over ``ASK_GB`` is said (what, how big, how long) and asked for at a terminal,
   or refused with the command that confirms it (``--yes``) when nobody is there to ask.
   Without a GPU, ``cpu_note`` says what speed to expect and which smaller models are faster.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import mlx.core as mx

from ..model import device
from .hub import hub_error
from .loader import HUB_PATTERNS

GB = 1e9
ASK_GB = 1.0  # a larger download is confirmed first
# LFM2-24B-A2B's decode on this project's 2-core x86 CPU (MLX CPU backend, 4-bit): 0.62 tok/s;
# on a CPU decode time follows the parameters a token uses, so the others are scaled from it.
CPU_TOKS_24B, CPU_NOTE_MACHINE = 0.62, "a 2-core x86 CPU"
# KV cache of a long conversation (24B-A2B: 10 attention layers x 8 KV heads x 64 dims x 2 x
# bf16 = 20 KB a token, 0.65 GB at 32k), prefill activations and the process itself.
MARGIN_GB = 2.0


class FitError(RuntimeError):
    """The model would not fit this machine's memory or disk; the message names the numbers."""


class DownloadRefused(RuntimeError):
    """A large download was declined, or could not be asked for; the message says how to confirm."""


@dataclass(frozen=True)
class Entry:
    name: str  # also the local folder's stem
    repo: str  # the original (bf16) hub checkpoint
    download_gb: float  # its safetensors, as published
    mlx_gb: float  # converted: experts at 4 bits, the rest at 8 (recipe mixed_8)
    expect: dict = field(default_factory=dict)  # config.json values a pre-quantized folder must match
    prequantized: tuple = ()  # hub repos that may hold an MLX folder of it in mlx-lm's layout
    active_b: float = 0.0  # billions of parameters one token uses (all of them for a dense model)


_MOE = dict(model_type="lfm2_moe", hidden_size=2048, vocab_size=65536)
CATALOGUE = (
    Entry("LFM2-24B-A2B", "LiquidAI/LFM2-24B-A2B", 47.7, 13.8,
          dict(_MOE, num_hidden_layers=40, num_experts=64),
          ("LiquidAI/LFM2-24B-A2B-MLX-4bit", "mlx-community/LFM2-24B-A2B-4bit"), 2.3),
    Entry("LFM2-8B-A1B", "LiquidAI/LFM2-8B-A1B", 16.7, 4.9,
          dict(_MOE, num_hidden_layers=24, num_experts=32),
          ("LiquidAI/LFM2-8B-A1B-MLX-4bit", "mlx-community/LFM2-8B-A1B-4bit"), 1.5),
    Entry("LFM2-2.6B", "LiquidAI/LFM2-2.6B", 5.1, 2.0, dict(model_type="lfm2", hidden_size=2048), (), 2.6),
    Entry("LFM2-1.2B", "LiquidAI/LFM2-1.2B", 2.3, 0.9, dict(model_type="lfm2", hidden_size=2048), (), 1.2),
)


@dataclass(frozen=True)
class Machine:
    memory_gb: float
    working_set_gb: float
    source: str  # where the figures come from, for messages

    def fits(self, weights_gb: float) -> bool:
        return weights_gb + MARGIN_GB <= self.working_set_gb


def machine() -> Machine:
    """What a model may use here: the GPU's recommended working set where MLX reports one."""
    info = mx.device_info() if hasattr(mx, "device_info") else {}
    if "max_recommended_working_set_size" in info:
        return Machine(info.get("memory_size", 0) / GB, info["max_recommended_working_set_size"] / GB,
                       "the GPU's recommended working set")
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GB
    return Machine(total, total, "system memory")


def free_disk_gb(path: Path) -> float:
    path = Path(path).expanduser().resolve()
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free / GB


def _describe(m: Machine) -> str:
    return f"{m.working_set_gb:.1f} GB ({m.source}, {m.memory_gb:.0f} GB installed)"


def choose_default(m: Machine) -> tuple[Entry, str]:
    """The largest catalogue model that fits, and the one line that says so."""
    for e in CATALOGUE:
        if m.fits(e.mlx_gb):
            skipped = [x for x in CATALOGUE[: CATALOGUE.index(e)]]
            why = "" if not skipped else (
                f" ({skipped[0].name} needs {skipped[0].mlx_gb:.1f} GB + {MARGIN_GB:.0f} GB margin)")
            return e, f"Model: {e.name}, 4-bit (~{e.mlx_gb:.1f} GB), for {_describe(m)}{why}"
    smallest = CATALOGUE[-1]
    raise FitError(f"no LFM2 model fits this machine: {_describe(m)}; the smallest, {smallest.name} at "
                   f"4 bits, needs {smallest.mlx_gb:.1f} GB + {MARGIN_GB:.0f} GB margin")


def fit_warning(name: str, weights_gb: float, m: Machine) -> Optional[str]:
    """For ``--model``: a warning (not a refusal) when the weights will not fit."""
    if m.fits(weights_gb):
        return None
    try:
        alt, _ = choose_default(m)
        hint = f"; {alt.name} at 4 bits (~{alt.mlx_gb:.1f} GB) fits"
    except FitError:
        hint = ""
    return (f"warning: {name} has {weights_gb:.1f} GB of weights; with a {MARGIN_GB:.0f} GB margin that "
            f"exceeds {_describe(m)}: expect swapping or a crash{hint}")


def cpu_toks(e: Entry) -> float:
    """Expected decode speed of ``e`` on the CPU of ``CPU_NOTE_MACHINE`` (tokens per second)."""
    return CPU_TOKS_24B * CATALOGUE[0].active_b / e.active_b


def cpu_note(e: Entry) -> Optional[str]:
    """Without a GPU (``device.kind()``: MLX's default device is the CPU), what speed to expect
    from ``e`` and which smaller models are faster; None on a GPU."""
    if device.kind() != "cpu":
        return None
    faster = [x for x in CATALOGUE if cpu_toks(x) > cpu_toks(e) * 1.2]
    hint = "; ".join(f"--model {x.repo} (~{cpu_toks(x):.1f} tok/s)" for x in faster)
    return (f"No GPU: MLX runs on the CPU here, where {e.name} decodes at about {cpu_toks(e):.1f} tokens/s "
            f"(on {CPU_NOTE_MACHINE}; more cores are faster)." + (f" Faster: {hint}." if hint else ""))


def confirm_download(what: str, gb: float, ask: Optional[Callable[[str], bool]], yes: bool, command: str) -> None:
    """Go ahead with a download of ``gb`` GB of ``what``: at once when small or ``yes``; else
    ``ask`` the person at the terminal, or (no terminal: ``ask`` is None) refuse, naming
    ``command``, the command line that confirms."""
    if gb <= ASK_GB or yes:
        return
    size = f"{gb:.1f} GB (~{gb * 80 / 60:.0f} min at 100 Mbit/s)"
    if ask is None:
        raise DownloadRefused(f"{what} needs a download of {size}, and stdin is not a terminal to ask "
                              f"first. To download it run `{command}`; or use a model on disk with --model FOLDER")
    if not ask(f"{what} needs a download of {size}. Download it now? [y/N] "):
        raise DownloadRefused("nothing was downloaded; pick another model with --model REPO_OR_FOLDER")


def local_weights_gb(folder: Path) -> float:
    return sum(f.stat().st_size for f in Path(folder).glob("*.safetensors")) / GB


def hub_weights_gb(repo: str, api=None) -> Optional[float]:
    """Published size of a hub repo's safetensors, or None when the hub cannot say."""
    try:
        info = _api(api).model_info(repo, files_metadata=True)
    except Exception:
        return None
    return sum(s.size or 0 for s in info.siblings if s.rfilename.endswith(".safetensors")) / GB


def _api(api):
    if api is not None:
        return api
    from huggingface_hub import HfApi

    return HfApi()


def _hub_cache() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def check_disk(needs: dict) -> None:
    """``needs``: {folder: GB that will land there}; folders on one filesystem add up."""
    by_fs: dict = {}
    for folder, gb in needs.items():
        probe = Path(folder).expanduser().resolve()
        while not probe.exists():
            probe = probe.parent
        key = os.stat(probe).st_dev
        by_fs.setdefault(key, [probe, 0.0, []])
        by_fs[key][1] += gb
        by_fs[key][2].append(f"{gb:.1f} GB in {folder}")
    for probe, gb, parts in by_fs.values():
        have = free_disk_gb(probe)
        if gb > have:
            raise FitError(f"not enough disk: need {gb:.1f} GB ({', '.join(parts)}), "
                           f"{have:.1f} GB free on the disk of {probe}. Free space or set HF_HOME / "
                           f"MLX_LFM2_HOME to a larger disk")


def verify_prequantized(config: dict, index: dict, e: Entry) -> Optional[str]:
    """Why a published MLX folder is not usable as ``e`` (None when it is)."""
    for k, v in e.expect.items():
        if config.get(k) != v:
            return f"{k} is {config.get(k)!r}, expected {v!r}"
    q = config.get("quantization") or {}
    if q.get("bits") != 4 or q.get("group_size") not in (32, 64, 128):
        return f"quantization {q or 'missing'} is not 4-bit in groups of 32/64/128"
    keys = index.get("weight_map", {})
    if e.expect.get("model_type") == "lfm2_moe" and not any(k.endswith("expert_bias") for k in keys):
        return "no expert_bias tensors (an old converter folded them away)"
    if not any(k.endswith(".scales") for k in keys):
        return "its index lists no quantized tensors"
    return None


def _try_prequantized(e: Entry, m: Machine, console, api, download, go) -> Optional[Path]:
    for repo in e.prequantized:
        try:
            info = _api(api).model_info(repo, files_metadata=True)
            cfg = json.loads(Path(download(repo, allow_patterns=["config.json"]), "config.json").read_text())
            idx_path = Path(download(repo, allow_patterns=["*.safetensors.index.json"]))
            idx_files = list(idx_path.glob("*.safetensors.index.json"))
            index = json.loads(idx_files[0].read_text()) if idx_files else {}
        except Exception:
            continue  # not published, or the hub is unreachable: fall back to converting
        problem = verify_prequantized(cfg, index, e)
        if problem:
            console.print(f"Skipping {repo}: {problem}", markup=False)
            continue
        size = sum(s.size or 0 for s in info.siblings) / GB
        if not m.fits(size):
            continue
        check_disk({_hub_cache(): size})
        go(f"{repo} (already 4-bit: no conversion)", missing_gb(repo, size))
        console.print(f"Downloading {repo} (~{size:.1f} GB, already 4-bit: no conversion)", markup=False)
        try:
            return Path(download(repo, allow_patterns=HUB_PATTERNS))
        except Exception as err:
            raise hub_error(repo, err) from err
    return None


def _published_gb(e: Entry, api, cached: Optional[float]) -> float:
    """The original checkpoint's size; the hub must answer unless the cache holds all of it."""
    try:
        info = _api(api).model_info(e.repo, files_metadata=True)
    except Exception as err:
        if cached is not None and cached >= 0.99 * e.download_gb:  # HF_HUB_OFFLINE with a full cache
            return cached
        raise hub_error(e.repo, err) from err
    return sum(s.size or 0 for s in info.siblings if s.rfilename.endswith(".safetensors")) / GB or e.download_gb


def provision(e: Entry, home: Path, console, m: Optional[Machine] = None, api=None, download=None,
              confirm: Optional[Callable[[str], bool]] = None, yes: bool = False,
              command: str = "python chat.py --yes") -> Path:
    """A local MLX folder of ``e``: converted before, published pre-quantized, or converted now.
    ``confirm``: asks the person at the terminal (None: nobody there); ``yes``: downloads over
    ``ASK_GB`` need no question; ``command``: the command line that says yes, for the refusal."""
    from ..weights.conversion import convert

    target = Path(home) / "models" / f"{e.name}-4bit-mixed8"
    if (target / "config.json").exists():
        return target
    m = m or machine()
    if download is None:
        from huggingface_hub import snapshot_download as download

    def go(what, gb):
        confirm_download(what, gb, confirm, yes, command)

    folder = _try_prequantized(e, m, console, api, download, go)
    if folder is not None:
        return folder
    cached = _cached_gb(e.repo)  # None: the cache could not be read, so nothing of it is ours to delete
    published = _published_gb(e, api, cached)
    missing = max(0.0, published - (cached or 0.0))
    check_disk({_hub_cache(): missing, target.parent: e.mlx_gb})
    go(f"{e.name} (the original {e.repo}, converted once to 4-bit: ~{e.mlx_gb:.1f} GB in {target})", missing)
    console.print(f"First run: downloading {e.repo} (~{published:.1f} GB"
                  + (f", {cached:.1f} GB already here" if cached else "")
                  + f") and converting it once to 4-bit (~{e.mlx_gb:.1f} GB) in {target}", markup=False)
    try:
        src = Path(download(e.repo, allow_patterns=HUB_PATTERNS))
    except Exception as err:  # the hub's own errors are many and wordy: one message says what to do
        raise hub_error(e.repo, err) from err
    convert(src, target, quantize=True, quant_recipe="mixed_8", force=True)
    if cached == 0.0 and confirm is not None and confirm(
            f"Remove the original download ({published:.1f} GB in {_hub_cache()})? The 4-bit folder "
            "is all chat.py needs. [y/N] "):
        _remove_from_cache(e.repo)
        console.print(f"Removed {e.repo} from the Hugging Face cache.", markup=False)
    return target


def missing_gb(repo: str, gb: float) -> float:
    """What of a ``gb`` GB repo a download would still fetch (all of it when the cache cannot be read)."""
    return max(0.0, gb - (_cached_gb(repo) or 0.0))


def _cached_gb(repo: str) -> Optional[float]:
    """GB of ``repo`` already in the Hugging Face cache (a resumed first run), or None when the
    cache cannot be read."""
    try:
        from huggingface_hub import scan_cache_dir

        if not _hub_cache().exists():
            return 0.0
        return sum(r.size_on_disk for r in scan_cache_dir(_hub_cache()).repos if r.repo_id == repo) / GB
    except Exception:
        return None


def _remove_from_cache(repo: str) -> None:
    """Delete every cached revision of ``repo``: files we downloaded, nothing else."""
    from huggingface_hub import scan_cache_dir

    info = scan_cache_dir(_hub_cache())
    revisions = [rev.commit_hash for r in info.repos if r.repo_id == repo for rev in r.revisions]
    if revisions:
        info.delete_revisions(*revisions).execute()
