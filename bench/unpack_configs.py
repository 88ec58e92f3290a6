"""The INT4 unpack kernel's launch configurations (weight rows a program, warps) on Llama-7B MLP shapes: microseconds
and GB/s (packed bytes read plus unpacked bytes written), each checked bit for bit against the default launch.

    python bench/unpack_configs.py --out bench/results/unpack_configs
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from kernel_cases import quant_linear  # noqa: E402

from zeroquant.kernels.triton import unpack  # noqa: E402

# (group scales' dtype, unpacked dtype): progressive INT4 to INT8 (W4A8) and to fp16, float16-scale INT4 to fp16
FORMATS = [("int8", torch.int8), ("int8", torch.float16), ("float16", torch.float16)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}
    rows = []
    for k, n in [(4096, 11008), (11008, 4096)]:
        for scales, dtype in FORMATS:
            w = quant_linear(k, n, 4, 128, False, False, "cuda", scale_dtype=scales).quantized.kernel()
            want = unpack.unpack_int4(w, dtype)
            got = torch.empty_like(want)
            nbytes = n * k // 2 + want.numel() * want.element_size()
            for block_n in (32, 64, 128):
                for warps in (4, 8):
                    fn = lambda: unpack._launch(w, got, block_n, warps)  # noqa: E731
                    fn()
                    us = triton.testing.do_bench(fn, warmup=25, rep=100) * 1e3
                    rows.append({"n": n, "k": k, "group_scales": scales, "dtype": str(dtype).split(".")[1],
                                 "block_n": block_n, "warps": warps, "us": us, "gb_s": nbytes / us / 1e3,
                                 "equal": torch.equal(got.view(torch.uint8), want.view(torch.uint8))})
                    print(json.dumps(rows[-1]), flush=True)
                    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [f"{meta['device']}, torch {meta['torch']}, Triton {meta['triton']}; INT4 group 128, microseconds "
             "(GB/s)", "", "| N x K | group scales -> unpacked | " + " | ".join(
                 f"{b} rows, {w} warps" for b in (32, 64, 128) for w in (4, 8)) + " |", "|---|---|" + "---|" * 6]
    for i in range(0, len(rows), 6):
        r = rows[i]
        cells = [f"{x['us']:.1f} ({x['gb_s']:.0f})" + ("" if x["equal"] else " DIFFERS") for x in rows[i:i + 6]]
        lines.append(f"| {r['n']} x {r['k']} | {r['group_scales']} -> {r['dtype']} | " + " | ".join(cells) + " |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
