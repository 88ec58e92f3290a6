"""Decode GEMMs against the bandwidth limit: bytes each one must read (weights, scales, zero points,
activations) over its time, as a fraction of the device's copy bandwidth, all measured in one run.

    python bench/decode_roofline.py [--out DIR]

Llama-7B's MLP shapes (4096 x 11008, 11008 x 4096) and its attention projection (4096 x 4096), 1, 2, 8 and 16 tokens,
every format the presets use (INT4 with float16 and with float32 scales), beside cuBLAS FP16 at the same
shapes. Writes decode_roofline.{json,md}.
"""

import argparse
import json
from pathlib import Path

import torch
import triton
from kernel_table import ms, weights

from zeroquant.kernels.triton import gemm, gemv, rowwise, skinny_gemm, tile_gemm
from zeroquant.tools.benchmark import copy_bandwidth

SHAPES = [(4096, 11008), (11008, 4096), (4096, 4096)]  # (K, N)
# (name, bits, group, int8 activations, INT4 scale dtype): the INT4 formats with float16 scales (the presets'
# default) and float32 ones, side by side
FORMATS = [("w4a16-g128", 4, 128, False, torch.float16), ("w4a16-g128-fp32s", 4, 128, False, torch.float32),
           ("w4a8-g128", 4, 128, True, torch.float16), ("w4a8-g128-fp32s", 4, 128, True, torch.float32),
           ("w8a16-ch", 8, -1, False, None), ("w8a8-ch", 8, -1, True, None)]


def nbytes(*ts: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in ts if t is not None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results")
    out = Path(ap.parse_args().out)
    out.mkdir(parents=True, exist_ok=True)
    dev = "cuda"
    bw = copy_bandwidth(dev)
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "copy_gb_s": bw / 1e9, "rows": []}
    for k, n in SHAPES:
        for m in (1, 2, 8, 16):
            x = torch.randn(m, k, device=dev, dtype=torch.float16)
            w16 = torch.randn(k, n, device=dev, dtype=torch.float16)
            t = ms(lambda a, b: a @ b, x, w16)
            rows = [("fp16 cuBLAS", t, nbytes(x, w16) + m * n * 2)]
            xq, xs = rowwise.quantize_per_token(x)
            for name, bits, group, a8, scale_dtype in FORMATS:
                kw = weights(k, n, bits, group, dev, scale_dtype or torch.float16, int8_tokens=a8)
                a, a_scale = (xq, xs) if a8 else (x, None)
                # interleaved scales and zero points (float16 INT4) rotate as their one [G, N, 2] allocation
                sz = [torch.stack((kw.scale, kw.zero), -1)] if kw.sz_step == 2 else [kw.scale, kw.zero]
                stored = [t for t in (kw.qweight, *sz) if t is not None]

                def run(q, s, *z, a=a, a_scale=a_scale, kw=kw):
                    s, z = (s[..., 0], s[..., 1]) if s.dim() == 3 else (s, z[0] if z else None)
                    w = gemm.KernelWeight(q, s, z, kw.bits, k, n, kw.group_size)
                    return gemm.quant_linear(a, a_scale, w)

                t = ms(run, *stored)
                b = nbytes(a, a_scale)
                rows.append((name, t, b + kw.nbytes() + m * n * 2))
            for name, t, b in rows:
                r = {"k": k, "n": n, "m": m, "format": name, "us": t * 1e3, "mbytes": b / 1e6,
                     "fraction": b / (t / 1e3) / bw}
                res["rows"].append(r)
                print(f"{k:6d} x {n:6d} m={m:2d} {name:17s} {r['us']:7.1f} us {r['mbytes']:7.1f} MB "
                      f"{r['fraction']:.2f}", flush=True)
            (out / "decode_roofline.json").write_text(json.dumps(res, indent=2))
    # the configurations the autotuners took for each shape (GEMV X_TILE: docs/history.md)
    for name, kernel in (("skinny_picks", skinny_gemm._w4_skinny_kernel),
                         ("skinny_sync_picks", skinny_gemm._w4_skinny_sync_kernel), ("gemv_picks", gemv._gemv_kernel),
                         ("tile_decode_picks", tile_gemm._qlinear_decode_kernel)):
        res[name] = {str(key): str(cfg) for key, cfg in kernel.cache.items()}
    (out / "decode_roofline.json").write_text(json.dumps(res, indent=2))
    lines = [f"device: {res['device']}, torch {res['torch']}, triton {res['triton']}; copy bandwidth "
             f"{res['copy_gb_s']:.0f} GB/s (device-to-device copy, read + write)", "",
             "| K x N | tokens | format | us | MB read | fraction of copy bandwidth |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['k']} x {r['n']} | {r['m']} | {r['format']} | {r['us']:.1f} | {r['mbytes']:.1f} | "
              f"{r['fraction']:.2f} |" for r in res["rows"]]
    (out / "decode_roofline.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
