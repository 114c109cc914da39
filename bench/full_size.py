"""The whole LFM2-24B-A2B shape (40 layers, random weights): convert the 47.7 GB bf16
checkpoint to 4-bit and decode from it on this machine; reports convert peak RSS, load
time, tok/s and peak memory. Needs ~62 GB of free disk (the source is deleted afterwards
unless --keep).

    python bench/full_size.py --decode 8
"""

import argparse
import json
import shutil

from common import OUT, ROOT, checkpoint, run_json
from convert_memory import WORKER


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=40)
    p.add_argument("--decode", type=int, default=8)
    p.add_argument("--prefill", type=int, default=64)
    p.add_argument("--keep", action="store_true")
    a = p.parse_args()
    src = checkpoint("24b-a2b", a.layers)
    dst = OUT / f"{src.name}-q4"
    conv = {}
    if not (dst / "config.json").exists():
        conv = run_json(["-c", WORKER.format(root=str(ROOT), src=str(src), dst=str(dst))], timeout=7200)
    source_gb = (src / "model.safetensors").stat().st_size / 1e9
    if not a.keep:
        shutil.rmtree(src, ignore_errors=True)
    speed = run_json(["bench/speed_worker.py", "mlx_lfm2", str(dst), "--decode", str(a.decode),
                      "--prefill", str(a.prefill)], timeout=7200)
    print(json.dumps({"bench": "full_size", "layers": a.layers, "source_gb": source_gb,
                      "output_gb": sum(f.stat().st_size for f in dst.glob("*.safetensors")) / 1e9,
                      "convert": conv, "mlx_lfm2": speed}))


if __name__ == "__main__":
    main()
