"""Peak RSS of convert on checkpoints of growing size: bounded by a layer, not the file.

Writes random checkpoints with the real per-layer shapes of LFM2-24B-A2B (one bf16
model.safetensors each, as the hub ships it) and converts each to 4-bit in a fresh process.

    python bench/convert_memory.py --layers 3 6
    python bench/convert_memory.py --layers 3 6 --method awq   # calibrated: the same bound
    python bench/convert_memory.py --layers 3 --method awq-gptq --calibration-tokens 512
"""

import argparse
import json
import shutil

from common import OUT, checkpoint, run_json

WORKER = """
import json, sys, time
sys.path.insert(0, {root!r})
sys.path.insert(0, {root!r} + "/bench")
from common import peak_rss_gb
from mlx_lfm2 import convert
t = time.perf_counter()
convert({src!r}, {dst!r}, quantize=True, force=True, progress=False, **{kw!r})
print(json.dumps({{"seconds": time.perf_counter() - t,
                   "peak_rss_gb": peak_rss_gb()}}))
"""


def largest_layer_gb(folder) -> float:
    import json as _json
    import struct

    with open(folder / "model.safetensors", "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = _json.loads(f.read(n))
    sizes = {}
    for k, v in header.items():
        if k == "__metadata__":
            continue
        group = ".".join(k.split(".")[:3]) if k.startswith("model.layers.") else "globals"
        sizes[group] = sizes.get(group, 0) + v["data_offsets"][1] - v["data_offsets"][0]
    return max(sizes.values()) / 1e9


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="24b-a2b")
    p.add_argument("--layers", type=int, nargs="+", default=[3, 6])
    p.add_argument("--keep", action="store_true", help="keep the checkpoints afterwards")
    p.add_argument("--method", default="rtn", choices=["rtn", "awq", "gptq", "awq-gptq", "dynamic-awq",
                                                       "dynamic-awq-gptq"],
                   help="awq/gptq/awq-gptq: that --q-method; dynamic-*: and --target-bpw 4.5 (two passes)")
    p.add_argument("--calibration-tokens", type=int, default=1024)
    a = p.parse_args()
    from common import ROOT

    rows = []
    for n in a.layers:
        src = checkpoint(a.preset, n, vocab_size=65536)  # the LFM2 tokenizer's: calibration text needs it
        dst = OUT / f"{src.name}-convert-memory-q4"
        method = a.method.removeprefix("dynamic-")
        kw = {} if a.method == "rtn" else dict(q_method=method, calibration_tokens=a.calibration_tokens,
                                                **({"target_bpw": 4.5} if a.method.startswith("dynamic") else {}))
        r = run_json(["-c", WORKER.format(root=str(ROOT), src=str(src), dst=str(dst), kw=kw)])
        size = (src / "model.safetensors").stat().st_size / 1e9
        rows.append({"layers": n, "checkpoint_gb": size, "largest_layer_gb": largest_layer_gb(src),
                     "output_gb": sum(f.stat().st_size for f in dst.glob("*.safetensors")) / 1e9, **r})
        shutil.rmtree(dst, ignore_errors=True)
        if not a.keep:
            shutil.rmtree(src, ignore_errors=True)
    print(json.dumps({"bench": "convert_memory", "preset": a.preset, "method": a.method, "runs": rows}))


if __name__ == "__main__":
    main()
