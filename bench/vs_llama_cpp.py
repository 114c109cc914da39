"""mlx_lfm2 vs llama.cpp (llama-cpp-python) on the same random checkpoint.

llama.cpp gets GGUFs made by its own converter (``convert_hf_to_gguf.py`` from the llama.cpp
source that llama-cpp-python vendors; pass that folder) and quantized by its own quantizer
(Q4_K_M and Q4_0); mlx_lfm2 gets our 4-bit conversion of the same checkpoint.

    pip download --no-deps --no-binary :all: llama-cpp-python && tar xzf llama_cpp_python-*.tar.gz
    pip install ./llama_cpp_python-*/
    python bench/vs_llama_cpp.py --llama-cpp-src ./llama_cpp_python-*/vendor/llama.cpp
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from common import OUT, alternating_medians, checkpoint, converted, run_json

WORKER = """
import json, sys, time
sys.path.insert(0, "bench")
from common import peak_rss_gb
import numpy as np
from llama_cpp import Llama
llm = Llama(model_path={path!r}, n_ctx={ctx}, n_batch=512, n_threads={threads}, verbose=False)
rng = np.random.default_rng(0)
out = {{}}
for n in {prefill}:
    llm.reset()
    ids = rng.integers(10, 8000, n).tolist()
    t = time.perf_counter(); llm.eval(ids); out[f"prefill_{{n}}_tps"] = n / (time.perf_counter() - t)
llm.reset()
llm.eval(rng.integers(10, 8000, 16).tolist())
t = time.perf_counter()
for _ in range({decode}):
    scores = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),)).copy()
    scores[7] = -1e9
    llm.eval([int(np.argmax(scores))])
out["decode_tps"] = {decode} / (time.perf_counter() - t)
out["max_rss_gb"] = peak_rss_gb()
print(json.dumps(out))
"""

FTYPES = {"Q4_0": 2, "Q4_K_M": 15}


def gguf(src: Path, llama_src: Path, kind: str) -> Path:
    base = OUT / f"{src.name}-bf16.gguf"
    if not base.exists():
        env = dict(os.environ, PYTHONPATH=str(llama_src / "gguf-py"))
        subprocess.run([sys.executable, str(llama_src / "convert_hf_to_gguf.py"), str(src), "--outfile", str(base),
                        "--outtype", "bf16"], check=True, env=env, capture_output=True)
    out = OUT / f"{src.name}-{kind}.gguf"
    if not out.exists():
        import llama_cpp

        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = FTYPES[kind]
        params.nthread = os.cpu_count() or 1
        if llama_cpp.llama_model_quantize(str(base).encode(), str(out).encode(), params) != 0:
            raise RuntimeError(f"llama.cpp could not quantize {base} to {kind}")
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--llama-cpp-src", type=Path, required=True)
    p.add_argument("--preset", default="24b-a2b-narrow")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--decode", type=int, default=128)
    p.add_argument("--prefill", type=int, nargs="*", default=[512])
    a = p.parse_args()
    # llama.cpp's converter wants the tokenizer's ids to fit the vocabulary
    src = checkpoint(a.preset, a.layers, vocab_size=65536)
    engines = {"mlx_lfm2": converted(src, 4), **{k: gguf(src, a.llama_cpp_src, k) for k in FTYPES}}
    threads = os.cpu_count() or 1

    def runner(e):
        if e == "mlx_lfm2":
            return lambda: run_json(["bench/speed_worker.py", "mlx_lfm2", str(engines[e]), "--decode",
                                     str(a.decode), "--prefill", *map(str, a.prefill)])
        return lambda: run_json(["-c", WORKER.format(path=str(engines[e]), ctx=max(a.prefill) + 256,
                                                     threads=threads, prefill=a.prefill, decode=a.decode)])

    med = alternating_medians({e: runner(e) for e in engines}, a.runs)
    keys = ["decode_tps", "max_rss_gb"] + [f"prefill_{n}_tps" for n in a.prefill]
    med = {e: {k: m[k] for k in keys} for e, m in med.items()}
    ratio = {k: {k2: med["mlx_lfm2"][k2] / med[k][k2] for k2 in keys} for k in FTYPES}
    print(json.dumps({"bench": "llama_cpp", "preset": a.preset, "layers": a.layers, "runs": a.runs,
                      "threads": threads, "median": med, "ratio_mlx_lfm2_over": ratio}))


if __name__ == "__main__":
    main()
