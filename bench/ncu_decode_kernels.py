"""The one-token decode kernels at Llama-7B's 4096 x 11008, for Nsight Compute: each runs once inside a profiled
range, after its autotuning (bench/results/ncu_int4_decode.json, docs/history.md).

    ncu --clock-control none --profile-from-start off --section WarpStateStats --section SourceCounters \\
        --section Occupancy -o int4 python bench/ncu_decode_kernels.py

Kernels, in order: the small-M INT4 kernel with fp16 and with int8 tokens, the GEMV with INT4 and with INT8
weights (fp16 tokens). INT4: group 128, float16 scales and zero points, as the presets store them.
"""

import torch
from kernel_table import weights

from zeroquant.kernels.triton import gemv, rowwise, skinny_gemm


def main() -> None:
    k, n = 4096, 11008
    x = torch.randn(1, k, device="cuda", dtype=torch.float16)
    xq, xs = rowwise.quantize_per_token(x)
    w4, w8 = weights(k, n, 4, 128, "cuda"), weights(k, n, 8, -1, "cuda")
    c = torch.empty(1, n, device="cuda", dtype=torch.float16)
    runs = [lambda: skinny_gemm.w4_skinny(x, None, w4, None, None, c),
            lambda: skinny_gemm.w4_skinny(xq, xs, w4, None, None, c),
            lambda: gemv.gemv(x, c, w4, None, None, c),  # fp16 tokens: the scale argument is unused (c)
            lambda: gemv.gemv(x, c, w8, None, None, c)]
    for run in runs:  # autotune and compile outside the profiled range
        for _ in range(3):
            run()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    for run in runs:
        run()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()


if __name__ == "__main__":
    main()
