"""The Gluon small-M INT4 kernel (kernels/skinny_mma.py) at every K split against Triton's small-M kernel
(kernels/skinny_gemm.py), fp16 tokens, INT4 g128 weights read from HBM (CUDA-graph replays, PDL on), on
Llama-7B's decode shapes at 16, 8 and 3 tokens; marks the split `mma_split` plans.

    python bench/skinny_mma_sweep.py [--out DIR]

Prints one line per shape and token count; writes skinny_mma_sweep.json to --out (default bench/results).
"""

import argparse
import json
from pathlib import Path

import torch
from kernel_table import ms, weights

from zeroquant.kernels.gluon import skinny_mma
from zeroquant.kernels.triton import skinny_gemm
from zeroquant.tools.benchmark import copy_bandwidth

SHAPES = [(4096, 11008), (11008, 4096), (4096, 22016), (4096, 12288), (4096, 4096)]  # (K, N)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results")
    out = Path(ap.parse_args().out)
    out.mkdir(parents=True, exist_ok=True)
    bw = copy_bandwidth("cuda")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    res = {"device": torch.cuda.get_device_name(), "copy_gb_s": bw / 1e9, "rows": []}
    for k, n in SHAPES:
        w = weights(k, n, 4, 128, "cuda", torch.float16)
        for m in (16, 8, 3):
            a = torch.randn(m, k, device="cuda", dtype=torch.float16)
            c = torch.empty(m, n, device="cuda", dtype=torch.float16)
            nbytes = w.qweight.numel() + 2 * w.scale.numel() * 2 + a.numel() * 2

            def at(q, s, z):
                return type(w)(q, s, z, 4, k, n, 128)

            def row(kernel, t, **extra):
                res["rows"].append({"k": k, "n": n, "m": m, "kernel": kernel, "us": t * 1e3,
                                    "fraction": nbytes / (t * 1e-3) / bw, **extra})
                return t * 1e3

            old = row("skinny_gemm", ms(lambda q, s, z: skinny_gemm.w4_skinny(a, None, at(q, s, z), None, None, c),
                                        w.qweight, w.scale, w.zero))
            plan = skinny_mma.mma_split(n, k, sms)
            sweep = {s: row("skinny_mma", ms(lambda q, sc, z, s=s: skinny_mma.w4a16_mma(a, at(q, sc, z), None, None, c,
                                                                                     split=s),
                                              w.qweight, w.scale, w.zero), split=s, plan=plan)
                     for s in range(1, 17)}
            best = min(sweep, key=sweep.get)
            json.dump(res, open(out / "skinny_mma_sweep.json", "w"), indent=1)
            print(f"{k}x{n} {m} tokens: skinny_gemm {old:.1f} us; skinny_mma at its plan (split {plan}) "
                  f"{sweep[plan]:.1f} us ({nbytes / sweep[plan] / 1e-6 / bw:.2f}), best split {best} "
                  f"{sweep[best]:.1f} us", flush=True)


if __name__ == "__main__":
    main()
