"""Host cost of one launch: why eager quantized models lose to eager FP16 at small batch (see
bench/results/e2e_*). Times each op as eager Python calls (wall, synchronised once per 200 calls) and as
CUDA-graph replays (GPU only), M=1, K=N=4096, on the current GPU.

    python bench/overhead.py [--json FILE]
"""

import argparse
import json
import time

import torch

from zeroquant.core import quant as Q
from zeroquant.kernels.triton import gemm, rowwise


def wall_us(fn, n: int = 200) -> float:
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n * 1e6


def graph_us(fn, n: int = 200) -> float:
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(20):
            fn()
    g.replay()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n // 20):
        g.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n * 1e6


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--json")
    args = p.parse_args()
    k = n = 4096
    x = torch.randn(1, k, device="cuda", dtype=torch.float16)
    w = torch.randn(n, k, device="cuda", dtype=torch.float16)
    q8, s8, _ = Q.quantize_weight(w.float(), 8, -1, True)
    w8 = gemm.KernelWeight.from_quant(q8.to(torch.int8), s8, None, 8, k)
    q4, s4, z4 = Q.quantize_weight(w.float(), 4, 128, False)
    w4 = gemm.KernelWeight.from_quant(Q.pack_int4(q4, False), s4, z4, 4, 128)
    xq, xs = rowwise.quantize_per_token(x)
    ops = {
        "torch.matmul fp16": lambda: torch.matmul(x, w.t()),
        "torch add (1 elementwise op)": lambda: x + x,
        "rowwise.quantize_per_token": lambda: rowwise.quantize_per_token(x),
        "gemm.quant_linear W8A8 (pre-quantized x)": lambda: gemm.quant_linear(xq, xs, w8),
        "gemm.quant_linear W4A16": lambda: gemm.quant_linear(x, None, w4),
    }
    rows = [{"op": name, "eager_us": wall_us(fn), "graph_us": graph_us(fn)} for name, fn in ops.items()]
    if args.json:
        json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, open(args.json, "w"), indent=2)
    print(f"{torch.cuda.get_device_name()}: per-call time, M=1, K=N=4096")
    print("| op | eager call, us | in a CUDA graph, us |\n|---|---|---|")
    for r in rows:
        print(f"| {r['op']} | {r['eager_us']:.1f} | {r['graph_us']:.1f} |")


if __name__ == "__main__":
    main()
