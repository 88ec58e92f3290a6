"""The warp-specialized ping-pong W8A8 GEMM (kernels/tma_pingpong.py) against
the TMA GEMM (kernels/tma_gemm.py, autotuned) on BERT-large's and Llama-7B's prefill shapes: the same bits
first (both compute acc * channel scale * token scale in that order), then GPU time (CUDA-graph replays), each
configuration. Prints a line a shape; writes pingpong_lab.json and .md to --out (default bench/results) after each.

    python bench/pingpong_lab.py [--out DIR]
    python bench/pingpong_lab.py --md-from bench/results/pingpong_lab.json   # only the markdown, from a run's JSON
"""

import argparse
import json
import time
from pathlib import Path

SHAPES = [(4096, 1024, 3072), (4096, 1024, 1024), (4096, 1024, 4096), (4096, 4096, 1024),  # BERT-large 32 x 128
          (4096, 4096, 12288), (4096, 4096, 22016), (4096, 11008, 4096),  # Llama-7B 8 x 512
          (512, 1024, 4096), (1024, 4096, 1024), (300, 4096, 11008)]  # shorter prompts
# (tile, ring stages, consumer registers, scales loaded before the main loop)
CONFIGS = [((128, 128, 128), 4, 232, False), ((128, 128, 128), 4, 232, True), ((128, 128, 128), 5, 232, False),
           ((128, 128, 128), 5, 232, True)]


def markdown(res: dict) -> str:
    """One line a shape: the TMA GEMM's time and each configuration's, with its ratio."""
    names = {}
    for r in res["rows"]:
        names.setdefault(f"{r['stages']} stages{', scales early' if r['early_scales'] else ''}", None)
    lines = [f"device: {res['device']}; us, GPU time by CUDA-graph replays; ratio = TMA GEMM time / ping-pong time", "",
             "| M x K x N | TMA GEMM (autotuned) | " + " | ".join(names) + " |", "|---" * (2 + len(names)) + "|"]
    shapes = {}
    for r in res["rows"]:
        shapes.setdefault((r["m"], r["k"], r["n"]), []).append(r)
    for (m, k, n), rows in shapes.items():
        cells = [f"{r['us']:.1f} ({r['tma_us'] / r['us']:.2f}x){'' if r['same_bits'] else ' differs'}" for r in rows]
        lines.append(f"| {m} x {k} x {n} | {rows[0]['tma_us']:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--md-from", metavar="JSON", help="write the markdown of this run's JSON beside it and stop")
    args = ap.parse_args()
    if args.md_from:
        Path(args.md_from).with_suffix(".md").write_text(markdown(json.load(open(args.md_from))))
        return
    measure(Path(args.out))


def measure(out: Path) -> None:
    import torch  # here, so --md-from runs without a GPU stack
    import triton

    from zeroquant.kernels.gluon import tma_pingpong
    from zeroquant.kernels.triton import rowwise, tma_gemm
    from zeroquant.kernels.weight_format import KernelWeight

    out.mkdir(parents=True, exist_ok=True)
    res = {"device": torch.cuda.get_device_name(), "rows": []}
    t0 = time.time()
    for m, k, n in SHAPES:
        x = torch.randn(m, k, device="cuda", dtype=torch.float16)
        a, xs = rowwise.quantize_per_token(x)
        xs = xs.reshape(-1).float()
        q = torch.randint(-127, 128, (n, k), dtype=torch.int8, device="cuda")
        w = KernelWeight.from_quant(q, torch.rand(n, 1, device="cuda") * 1e-2, None, 8, k)
        bias = torch.randn(n, device="cuda", dtype=torch.float16)
        want = torch.empty(m, n, device="cuda", dtype=torch.float16)
        tma_gemm.w8a8_tma(a, xs, w, bias, "gelu", want)
        spare = torch.empty_like(want)
        base = triton.testing.do_bench_cudagraph(lambda: tma_gemm.w8a8_tma(a, xs, w, bias, None, spare), rep=50)
        row = [f"{m}x{k}x{n}", f"tma {base * 1e3:.1f} us ({2 * m * n * k / base / 1e9:.0f} TOPS)"]
        for block, stages, regs, early in CONFIGS:
            got = torch.full((m, n), float("nan"), device="cuda", dtype=torch.float16)
            tma_pingpong.w8a8_pingpong(a, xs, w, bias, "gelu", got, block, stages, regs, early)
            same = bool(torch.equal(got, want))
            t = triton.testing.do_bench_cudagraph(
                lambda: tma_pingpong.w8a8_pingpong(a, xs, w, bias, None, spare, block, stages, regs, early), rep=50)
            res["rows"].append({"m": m, "k": k, "n": n, "block": block, "stages": stages, "consumer_regs": regs,
                                "early_scales": early, "same_bits": same, "us": t * 1e3, "tma_us": base * 1e3})
            name = f"{stages}{'e' if early else ''}"
            row.append(f"{name}: {t * 1e3:.1f} us ({base / t:.2f}x){'' if same else ' DIFFERS'}")
            json.dump(res, open(out / "pingpong_lab.json", "w"), indent=1)
            (out / "pingpong_lab.md").write_text(markdown(res))
        print("; ".join(row), f"[{time.time() - t0:.0f}s]", flush=True)


if __name__ == "__main__":
    main()
