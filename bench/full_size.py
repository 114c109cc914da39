"""The whole LFM2-24B-A2B shape (40 layers, random weights): convert the 47.7 GB bf16
checkpoint to 4-bit and decode from it on this machine; reports convert peak RSS, load
time, tok/s and peak memory. Needs ~62 GB of free disk (the source is deleted afterwards
unless --keep).

    python bench/full_size.py --decode 8
    python bench/full_size.py --peer      # + mlx-lm on the same folder: peak memory side by side

mlx-lm on this CPU runs the full model at a few hundredths of a token per second, so the
--peer comparison is a short one (8-token prompt, 4 new tokens, no warm-up) for both engines:
it is about memory, not speed.
"""

import argparse
import json
import shutil

from common import OUT, ROOT, checkpoint, ratios, run_json
from convert_memory import WORKER


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=40)
    p.add_argument("--decode", type=int, default=8)
    p.add_argument("--prefill", type=int, default=64)
    p.add_argument("--keep", action="store_true")
    p.add_argument("--peer", action="store_true", help="short run of both engines for peak memory")
    a = p.parse_args()
    dst = OUT / f"24b-a2b-{a.layers}L-bfloat16-q4"
    conv, source_gb = {}, None
    if not (dst / "config.json").exists():  # convert once; later runs reuse the 4-bit folder
        src = checkpoint("24b-a2b", a.layers)
        conv = run_json(["-c", WORKER.format(root=str(ROOT), src=str(src), dst=str(dst))], timeout=7200)
        source_gb = (src / "model.safetensors").stat().st_size / 1e9
        if not a.keep:
            shutil.rmtree(src, ignore_errors=True)
    out = {"bench": "full_size", "layers": a.layers, "source_gb": source_gb,
           "output_gb": sum(f.stat().st_size for f in dst.glob("*.safetensors")) / 1e9, "convert": conv}
    if a.peer:
        short = ["--no-warmup", "--prefill", "--decode-prompt", "8", "--decode", "4"]
        for engine in ("mlx_lfm2", "mlx_lm"):
            out[engine] = run_json(["bench/speed_worker.py", engine, str(dst), *short], timeout=7200)
        out["ratio_over_mlx_lm"] = ratios({e: out[e] for e in ("mlx_lfm2", "mlx_lm")}, "mlx_lm")["mlx_lfm2"]
    else:
        out["mlx_lfm2"] = run_json(["bench/speed_worker.py", "mlx_lfm2", str(dst), "--decode", str(a.decode),
                                    "--prefill", str(a.prefill)], timeout=7200)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
