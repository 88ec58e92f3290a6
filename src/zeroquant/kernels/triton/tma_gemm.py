"""The TMA GEMM: prefill W8A8 with per-channel weights on Hopper, operands and output by the bulk copy engine."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from zeroquant.kernels import act_code
from zeroquant.kernels.triton.gemm_common import _gpu_time, _tile
from zeroquant.kernels.triton.launch import device_index, device_info, pdl_flags, wait_for_producer
from zeroquant.kernels.triton.rowwise import apply_act
from zeroquant.kernels.weight_format import KernelWeight

try:  # host-side TMA descriptors (Triton >= 3.4)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # older Triton: the pointer-based kernel takes every shape
    TensorDescriptor = None

def _tma_block_shapes(nargs):
    """Autotune pre-hook: a TMA descriptor's box is the tile each config loads."""
    nargs["a_desc"].block_shape = [nargs["BLOCK_M"], nargs["BLOCK_K"]]
    nargs["w_desc"].block_shape = [nargs["BLOCK_N"], nargs["BLOCK_K"]]
    nargs["c_desc"].block_shape = [nargs["BLOCK_M"], nargs["BLOCK_N"]]


def _tma_cfg(bm, bn, bk, warps, stages, persist=False):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "PERSIST": persist}, num_warps=warps,
                         num_stages=stages, pre_hook=_tma_block_shapes)


# Persistent configs (one program per SM looping over tiles) win where K is short and N long (BERT-large's
# FFN1): the flattened loop issues the next tile's loads while this tile's epilogue runs. One tile per
# program wins at K = 4096 and up (docs/history.md, kernel choices). 128 x 256 x 128 with 4 stages
# does not fit shared memory next to the TMA store's 64 KiB output tile.
_TMA_CONFIGS = [_tma_cfg(*c) for c in [
    (128, 256, 128, 8, 3), (256, 128, 128, 8, 3), (128, 128, 128, 8, 4), (128, 128, 128, 4, 4), (128, 256, 64, 8, 4),
    (64, 256, 128, 4, 4), (128, 256, 128, 8, 3, True), (128, 128, 128, 4, 4, True)]]


@triton.autotune(
    configs=_TMA_CONFIGS,
    key=["M_BUCKET", "N", "K", "OUT_BYTES", "HAS_BIAS", "ACT"],
    do_bench=_gpu_time,
)
@triton.jit
def _w8a8_tma_kernel(
    a_desc, w_desc, c_desc, as_ptr, s_ptr, b_ptr, M, N, K, M_BUCKET, OUT_BYTES,
    HAS_BIAS: tl.constexpr, ACT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PERSIST: tl.constexpr, PDL: tl.constexpr,
):
    """Prefill W8A8 with per-channel weights: the int8 x int8 tiles arrive by TMA (Hopper's bulk copy
    engine, out-of-range parts zero-filled), which frees the warps' load instructions and registers for the
    MMAs (faster than the pointer-based _qlinear_kernel at M = 4096: docs/history.md, kernel choices). One int32
    accumulator, the same epilogue, stored by TMA. Each program takes tiles pid, pid + programs, ... (one tile unless
    PERSIST). OUT_BYTES, the output's element size, is only an autotune key: a configuration that fits shared
    memory beside a 16-bit output tile may not beside a float32 one."""
    wait_for_producer(PDL)
    num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    for t in tl.range(tl.program_id(0), num_tiles, tl.num_programs(0), flatten=PERSIST):
        pid_m, pid_n = _tile(t, M, N, BLOCK_M, BLOCK_N)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            a = a_desc.load([pid_m * BLOCK_M, k * BLOCK_K])
            w = w_desc.load([pid_n * BLOCK_N, k * BLOCK_K])
            acc = tl.dot(a, w.T, acc, out_dtype=tl.int32)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rm = offs_m % M
        rn = offs_n % N
        out = acc.to(tl.float32) * tl.load(s_ptr + rn).to(tl.float32)[None, :] * tl.load(as_ptr + rm)[:, None]
        if HAS_BIAS:
            out += tl.load(b_ptr + rn).to(tl.float32)[None, :]
        out = apply_act(out, ACT)
        # A TMA store: asynchronous, clipped to the tensor's bounds, and the registers are free sooner.
        c_desc.store([pid_m * BLOCK_M, pid_n * BLOCK_N], out.to(c_desc.dtype))


def tma_ok(a: torch.Tensor, w: KernelWeight) -> bool:
    """Large-M per-channel W8A8 with TMA-legal operands (16-byte aligned bases and row strides) on Hopper+."""
    return (TensorDescriptor is not None and a.is_cuda and a.shape[0] > 256 and w.bits == 8 and w.scale.shape[0] == 1
            and a.shape[1] % 16 == 0 and a.stride(0) % 16 == 0 and w.qweight.stride(0) % 16 == 0
            and w.out_features % 8 == 0  # the fp16/bf16 output's rows, 16-byte aligned for the TMA store
            and a.data_ptr() % 16 == 0 and w.qweight.data_ptr() % 16 == 0
            and device_info(device_index(a))[0] >= 9)


def w8a8_tma(a, xs, w: KernelWeight, bias, act, c, config: triton.Config | None = None) -> None:
    """Launch _w8a8_tma_kernel (autotuned, or one given configuration: the tests run each of them)."""
    m, k = a.shape
    n = w.out_features
    sms = device_info(device_index(a))[1]

    def grid(meta):
        tiles = triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"])
        return (min(tiles, sms) if meta["PERSIST"] else tiles,)

    # Placeholder boxes: the autotune pre-hook sets each config's own before it launches.
    descs = {name: TensorDescriptor(t, list(t.shape), list(t.stride()), [16, 16])
             for name, t in (("a_desc", a), ("w_desc", w.qweight), ("c_desc", c))}
    m_bucket = min(triton.next_power_of_2(m), 16384)
    args = (*descs.values(), xs, w.scale, bias if bias is not None else c, m, n, k, m_bucket, c.element_size())
    flags = {"HAS_BIAS": bias is not None, "ACT": act_code(act), **pdl_flags(a, graph_only=True)}
    if config is None:
        _w8a8_tma_kernel[grid](*args, **flags)
        return
    config.pre_hook({**descs, **config.kwargs})
    _w8a8_tma_kernel.fn[grid](*args, **flags, **config.kwargs, num_warps=config.num_warps,
                              num_stages=config.num_stages)

