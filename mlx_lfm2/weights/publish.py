"""What makes a converted folder at home on the hub and in every loader.

* ``compatible_config``: config.json keys for both generations of LFM2 loaders. Checkpoints
  saved by transformers 5 carry only the new keys (``layer_types``, ``intermediate_size``,
  ``rope_parameters``), and mlx-lm's ``lfm2`` (hence LM Studio's MLX engine) requires the old
  ones (``block_dim``, ``block_ff_dim``, ...); old checkpoints lack the new ones. Each missing
  key is derived from its twin, so every reader sees the same model.
* ``write_model_card``: a ``README.md`` with the hub's front matter (``library_name: mlx``,
  ``tags``, ``base_model``, ``pipeline_tag``), the quantization and the command that made it.
* ``upload_to_hub``: ``HfApi.create_repo`` + ``upload_folder``, card retitled for the repo.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Optional

from .loader import links_outside

# transformers' Lfm2Config defaults for the keys that only old configs spell out.
_LFM2_BLOCK_DEFAULTS = {"block_multiple_of": 256, "block_ffn_dim_multiplier": 1.0,
                        "block_auto_adjust_ff_dim": True}


def compatible_config(config: dict) -> dict:
    """``config`` plus each LFM2 key's old/new twin where only one of them is present."""
    c = dict(config)

    def twin(new: str, old: str) -> None:
        if c.get(new) is None and c.get(old) is not None:
            c[new] = c[old]
        elif c.get(old) is None and c.get(new) is not None:
            c[old] = c[new]

    twin("num_attention_heads", "num_heads")
    twin("tie_word_embeddings", "tie_embedding")
    twin("norm_eps", "block_norm_eps")
    n = c.get("num_hidden_layers")
    if c.get("layer_types") is None and c.get("full_attn_idxs") is not None and n:
        c["layer_types"] = ["full_attention" if i in c["full_attn_idxs"] else "conv" for i in range(n)]
    if c.get("full_attn_idxs") is None and c.get("layer_types") is not None:
        c["full_attn_idxs"] = [i for i, t in enumerate(c["layer_types"]) if t == "full_attention"]
    theta = (c.get("rope_parameters") or {}).get("rope_theta")
    if c.get("rope_theta") is None and theta is not None:
        c["rope_theta"] = theta
    elif c.get("rope_parameters") is None and c.get("rope_theta") is not None:
        c["rope_parameters"] = {"rope_theta": c["rope_theta"], "rope_type": "default"}
    if c.get("model_type") == "lfm2":  # the dense model's MLP keys (lfm2_moe never had block_*)
        twin("hidden_size", "block_dim")
        twin("intermediate_size", "block_ff_dim")
        for k, v in _LFM2_BLOCK_DEFAULTS.items():
            if c.get(k) is None:
                c[k] = v
    return c


def convert_command(hf_path, mlx_path, quantization: Optional[dict], dtype: str, quant_recipe: str,
                    revision: Optional[str], q_method: str = "rtn", target_bpw: Optional[float] = None,
                    calibration=None, measure: bool = False) -> str:
    """The ``convert.py`` command line equivalent to a ``convert()`` call (``quantization``:
    the default choice, None when not quantized)."""
    cmd = ["python", "convert.py", "--hf-path", str(hf_path), "--mlx-path", str(mlx_path)]
    if quantization:
        q = quantization
        cmd += ["-q", "--q-mode", q["mode"], "--q-bits", str(q["bits"]), "--q-group-size", str(q["group_size"]),
                "--quant-recipe", quant_recipe, "--q-method", q_method]
        cmd += ["--target-bpw", str(target_bpw)] if target_bpw is not None else []
        cmd += ["--calibration", str(calibration)] if calibration is not None else []
        cmd += ["--measure-kl"] if measure else []
    if dtype != "bfloat16":
        cmd += ["--dtype", dtype]
    if revision:
        cmd += ["--revision", revision]
    return shlex.join(cmd)


def _is_repo_id(name: str) -> bool:
    return name.count("/") == 1 and not name.startswith((".", "/", "~")) and not Path(name).exists()


def write_model_card(folder: Path, name: str, source: Path, hf_path, config: dict, quantization: Optional[dict],
                     recipe: str, dtype: str, command: str, quality: Optional[dict] = None) -> None:
    """``folder/README.md`` for the model ``name``: hub front matter, the quantization (with
    ``quality``: method, bits per weight, and the measured KL when there is one) and how the
    folder was made (``folder`` may be the conversion's temporary one)."""
    from huggingface_hub import ModelCard, ModelCardData

    meta = dict(library_name="mlx", pipeline_tag="text-generation",
                tags=["mlx", config.get("model_type", "lfm2"), "liquid", "mlx_lfm2"])
    if _is_repo_id(str(hf_path)):
        meta["base_model"] = str(hf_path)
    if (source / "README.md").exists():  # keep the original license and languages
        try:
            old = ModelCard.load(source / "README.md").data
            meta.update({k: getattr(old, k) for k in ("license", "license_name", "license_link", "language")
                         if getattr(old, k, None)})
        except Exception:
            pass  # a card without front matter: nothing to keep
    if quantization:
        meta["quantization"] = {"bits": quantization["bits"], "group_size": quantization["group_size"],
                                "mode": quantization.get("mode", "affine"), "recipe": recipe,
                                "per_path": sum(isinstance(v, dict) for v in quantization.values())}
        for k, v in (quality or {}).items():
            meta["quantization"][k] = round(v, 6) if isinstance(v, float) else v
    meta["dtype"] = dtype
    meta["conversion_command"] = command
    data = ModelCardData(**meta)
    ModelCard("---\n" + data.to_yaml() + "\n---\n" + _card_text(data.to_dict(), name)).save(
        folder / "README.md")


def _card_text(meta: dict, name: str) -> str:
    base = meta.get("base_model")
    q = meta.get("quantization")
    weights = _quant_text(q) if q else f"unquantized {meta.get('dtype', 'bfloat16')} weights"
    origin = f"[{base}](https://huggingface.co/{base})" if base else "An LFM2 checkpoint"
    return f"""
# {name}

{origin} converted to MLX by mlx_lfm2: {weights}. The folder has mlx-lm's layout:
mlx-lm, LM Studio and mlx_lfm2 load it.

Made with:

```sh
{meta.get("conversion_command", "")}
```

## Use

```sh
python -m mlx_lfm2.generate --model {name} --prompt "Hello!"
mlx_lm.generate --model {name} --prompt "Hello!"
```

```python
from mlx_lfm2 import load, generate

model, tokenizer = load("{name}")
print(generate(model, tokenizer, [{{"role": "user", "content": "Hello!"}}], max_tokens=128))
```
"""


_METHODS = {"rtn": "round-to-nearest", "awq": "activation-aware scales (AWQ, fitted per expert)",
            "gptq": "GPTQ error compensation (Hessians per expert)",
            "awq-gptq": "activation-aware scales (AWQ) then GPTQ error compensation, both per expert",
            "dynamic": "sensitivity-driven mixed precision"}
for _m in ("awq", "gptq", "awq-gptq"):
    _METHODS[f"dynamic-{_m}"] = f"sensitivity-driven mixed precision with {_METHODS[_m]}"


def _quant_text(q: dict) -> str:
    mode = q.get("mode", "affine")
    text = (f"{q['bits']}-bit {mode} weights in groups of {q['group_size']} (recipe `{q['recipe']}`: "
            + (f"every quantizable weight at {q['bits']} bits" if q["recipe"] == "uniform" else
               f"experts at {q['bits']} bits, the rest at {q['recipe'].split('_')[1]}")
            + "; the MoE router at 8 bits)")
    if q.get("method"):
        text += f", quantized by {_METHODS.get(q['method'], q['method'])}"
        if q.get("method", "").startswith("dynamic"):
            text += f" ({q.get('per_path', 0)} paths with their own precision in config.json)"
        if q.get("gptq_kept"):
            text += (f" (GPTQ kept for {q['gptq_kept']} weights, an expert counting as one; the rest rounded to "
                     "nearest, where GPTQ fitted on half the calibration text did not beat it on the other half)")
    if q.get("bits_per_weight"):
        text += f"; {q['bits_per_weight']:.2f} bits per weight"
    if q.get("kl") is not None:
        text += (f". Measured on {q.get('held_out_tokens')} held-out tokens of the calibration text "
                 f"({q.get('calibration', 'bundled')}): KL(unquantized || quantized) {q['kl']:.4g} nats per "
                 f"token, top-1 agreement {100 * q['top1_agreement']:.1f}%")
    return text


def upload_to_hub(folder, repo: str, private: bool = False) -> str:
    """Create ``repo`` (if needed) and upload ``folder``; returns the repo URL."""
    from huggingface_hub import HfApi, ModelCard

    folder = Path(folder)
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"{folder} is not a converted model folder (no config.json)")
    outside = links_outside(folder, folder.rglob("*"))
    if outside:  # upload_folder would publish the target's contents
        raise ValueError(f"not uploading {folder}: {outside[0]} is a symlink to a file outside it")
    card_path = folder / "README.md"
    if card_path.exists():  # name the card after the repo, so its snippets load it from the hub
        card = ModelCard.load(card_path)
        card.text = _card_text(card.data.to_dict(), repo)
        card.save(card_path)
    api = HfApi()
    url = api.create_repo(repo_id=repo, repo_type="model", private=private, exist_ok=True)
    api.upload_folder(folder_path=str(folder), repo_id=repo, repo_type="model",
                      commit_message="Upload an MLX conversion made with mlx_lfm2")
    return str(url)
