"""W4A8 with progressive INT4 weights for prompts and batches (Hopper, Gluon): C^T = W x^T, one int32
accumulator, the weights' conversion under the tensor cores' work.

Why Gluon: Triton's INT4 GEMM with the weights as the warpgroup MMA's register operand (triton/w4_gemm.py) waits
for each step's MMAs before converting the next step's weights, so the conversion and the MMAs take turns.
Here a step's MMAs are issued asynchronously and left in flight while the next step's weights are unpacked;
the wait that follows retires the previous step, whose ring slot goes back to the loads. One warp issues every
TMA load (warp-specialized, as in tma_pingpong): issued from all warps, each load cost a CTA-wide barrier.

A chunk is 64 channels of the half-split INT4 layout (quant.pack_int4: byte j holds channel j in its low
nibble and channel j + 32 in its high one), a step one or two chunks. A chunk's [BLOCK_N, 32] weight bytes
become the int8 weights s2 * (q - z) of both nibble planes in registers (_progressive_planes), and each plane
meets its own 32 token channels, which TMA loads into their own buffer, so no shared-memory tile is sliced.
The row scale, the per-token scale, bias and activation come in the epilogue.

gemm.quant_linear does not dispatch here: timed against the other INT4 paths (docs/kernels.md), it leads only
where one wave of 128 x 128 tiles fills the GPU (128 tokens of a wide layer) and trails from 256 tokens.
"""

from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from zeroquant.kernels import act_code
from zeroquant.kernels.triton.gemm_common import _progressive_operands, _progressive_planes, _tile
from zeroquant.kernels.triton.launch import device_index, device_info
from zeroquant.kernels.triton.rowwise import apply_act
from zeroquant.kernels.weight_format import PACK, KernelWeight

HALF_BYTES = PACK // 2  # channels of one nibble plane in a chunk, and bytes of a chunk
HALF = gl.constexpr(HALF_BYTES)  # the same inside kernels (host-side shapes take the plain int)


@gluon.jit
def _producer(descs, bars, bufs, ptrs, M, N, K, GROUP_SIZE: gl.constexpr, HAS_BIAS: gl.constexpr,
              ACT: gl.constexpr):
    """One warp: the TMA loads of every step (CHUNKS chunks: each one's weight bytes and the tokens of its two
    nibble planes), in order, each into the next slot the consumers have released."""
    w_desc, x_desc = descs
    ready, empty = bars
    w_bufs, lo_bufs, hi_bufs = bufs
    BLOCK_N: gl.constexpr = w_desc.block_type.shape[0]
    BLOCK_T: gl.constexpr = x_desc.block_type.shape[0]
    STAGES: gl.constexpr = ready.type.shape[0]
    CHUNKS: gl.constexpr = w_bufs.type.shape[0] // STAGES
    pid_t, pid_n = _tile(gl.program_id(0), M, N, BLOCK_T, BLOCK_N)
    for k in range(K // (2 * HALF * CHUNKS)):
        s = k % STAGES
        mbarrier.wait(empty.index(s), ((k // STAGES) & 1) ^ 1)  # barriers start with phase 1 complete
        mbarrier.expect(ready.index(s), CHUNKS * (w_desc.block_type.nbytes + 2 * x_desc.block_type.nbytes))
        for c in gl.static_range(CHUNKS):
            j = k * CHUNKS + c
            b = s * CHUNKS + c
            tma.async_copy_global_to_shared(w_desc, [pid_n * BLOCK_N, j * HALF], ready.index(s), w_bufs.index(b))
            tma.async_copy_global_to_shared(x_desc, [pid_t * BLOCK_T, j * 2 * HALF], ready.index(s),
                                            lo_bufs.index(b))
            tma.async_copy_global_to_shared(x_desc, [pid_t * BLOCK_T, j * 2 * HALF + HALF], ready.index(s),
                                            hi_bufs.index(b))


@gluon.jit
def _consumer(descs, bars, bufs, ptrs, M, N, K, GROUP_SIZE: gl.constexpr, HAS_BIAS: gl.constexpr,
              ACT: gl.constexpr):
    """The warpgroups (splitting the weight rows): per chunk the weights unpacked into registers and two
    asynchronous MMAs; a step's MMAs stay in flight while the next step's first chunk unpacks, and a slot is
    released once the MMAs reading it have completed. Then the epilogue."""
    w_desc, x_desc = descs
    ready, empty = bars
    w_bufs, lo_bufs, hi_bufs = bufs
    s_ptr, z_ptr, r_ptr, xs_ptr, b_ptr, c_ptr, stride_cm = ptrs
    BLOCK_N: gl.constexpr = w_desc.block_type.shape[0]
    BLOCK_T: gl.constexpr = x_desc.block_type.shape[0]
    STAGES: gl.constexpr = ready.type.shape[0]
    CHUNKS: gl.constexpr = w_bufs.type.shape[0] // STAGES
    # One warpgroup holds a 128 x 128 int32 tile only by spilling: the warpgroups split the rows.
    ACC: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[gl.num_warps(), 1],
                                                   instr_shape=[16, BLOCK_T, 32])
    A_OP: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=ACC, k_width=4)
    pid_t, pid_n = _tile(gl.program_id(0), M, N, BLOCK_T, BLOCK_N)
    rows = (pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, A_OP))) % N
    acc = gl.zeros([BLOCK_N, BLOCK_T], gl.int32, ACC)
    prev = 0
    for k in range(K // (2 * HALF * CHUNKS)):
        s = k % STAGES
        mbarrier.wait(ready.index(s), (k // STAGES) & 1)
        for c in gl.static_range(CHUNKS):
            b = s * CHUNKS + c
            g = (k * CHUNKS + c) * 2 * HALF // GROUP_SIZE
            s2, zs = _progressive_operands(s_ptr, z_ptr, g * N + rows)
            lo, hi = _progressive_planes(w_bufs.index(b).load(A_OP), s2, zs, BLOCK_N, HALF)
            acc = warpgroup_mma(lo, lo_bufs.index(b).permute((1, 0)), acc, is_async=True)
            acc = warpgroup_mma(hi, hi_bufs.index(b).permute((1, 0)), acc, is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=2 * CHUNKS, deps=(acc,))
        mbarrier.arrive(empty.index(prev), pred=k > 0)  # the previous step's MMAs are done with its slot
        prev = s
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
    mbarrier.arrive(empty.index(prev))

    offs_n = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, ACC))
    offs_t = pid_t * BLOCK_T + gl.arange(0, BLOCK_T, layout=gl.SliceLayout(0, ACC))
    out = acc.to(gl.float32) * gl.load(r_ptr + offs_n % N)[:, None]
    out = out * gl.load(xs_ptr + offs_t % M)[None, :]
    # A masked load, not `if HAS_BIAS`: with the bias pointer unused in every partition, Triton 3.6's lowering of
    # the warp-specialized kernel to LLVM asserts (bench/sm90_compile.py --gluon-progressive reproduces it).
    out += gl.load(b_ptr + offs_n % N, mask=(offs_n < N) & HAS_BIAS, other=0.0).to(gl.float32)[:, None]
    out = apply_act(out, ACT)
    c_ptrs = c_ptr + offs_t[None, :].to(gl.int64) * stride_cm + offs_n[:, None]
    gl.store(c_ptrs, out.to(c_ptr.dtype.element_ty), mask=(offs_t[None, :] < M) & (offs_n[:, None] < N))


@gluon.jit
def _progressive_gemm_kernel(w_desc, x_desc, s_ptr, z_ptr, r_ptr, xs_ptr, b_ptr, c_ptr, M, N, K, stride_cm,
                             GROUP_SIZE: gl.constexpr, HAS_BIAS: gl.constexpr, ACT: gl.constexpr,
                             STAGES: gl.constexpr, CHUNKS: gl.constexpr):
    BLOCK_N: gl.constexpr = w_desc.block_type.shape[0]
    BLOCK_T: gl.constexpr = x_desc.block_type.shape[0]
    w_bufs = gl.allocate_shared_memory(gl.uint8, [STAGES * CHUNKS, BLOCK_N, HALF], w_desc.layout)
    lo_bufs = gl.allocate_shared_memory(gl.int8, [STAGES * CHUNKS, BLOCK_T, HALF], x_desc.layout)
    hi_bufs = gl.allocate_shared_memory(gl.int8, [STAGES * CHUNKS, BLOCK_T, HALF], x_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=1)
    # Every partition takes the same arguments (Gluon's warp_specialize asks for one tuple shape); the ring's
    # depth and chunks a slot they read off the buffers' shapes.
    args = ((w_desc, x_desc), (ready, empty), (w_bufs, lo_bufs, hi_bufs),
            (s_ptr, z_ptr, r_ptr, xs_ptr, b_ptr, c_ptr, stride_cm), M, N, K, GROUP_SIZE, HAS_BIAS, ACT)
    gl.warp_specialize([(_consumer, args), (_producer, args)], [1], [24])


def progressive_gemm_ok(a: torch.Tensor, w: KernelWeight) -> bool:
    """Progressive INT4 weights (group sizes a multiple of 64) against INT8 tokens, more than 16 of them, on
    Hopper+."""
    return (w.row_scale is not None and a.dtype == torch.int8 and a.shape[0] > 16 and w.kernel_group % PACK == 0
            and w.kernel_group > 0 and a.is_cuda and device_info(device_index(a))[0] >= 9)


def descriptors(qweight: torch.Tensor, a: torch.Tensor, block: tuple[int, int]) -> tuple:
    """TMA descriptors of the packed weights and the INT8 tokens: one chunk's bytes of (weight rows, tokens)."""
    bn, bt = block
    w_layout = gl.NVMMASharedLayout.get_default_for([bn, HALF_BYTES], gl.uint8)
    x_layout = gl.NVMMASharedLayout.get_default_for([bt, HALF_BYTES], gl.int8)
    return (TensorDescriptor.from_tensor(qweight, [bn, HALF_BYTES], w_layout),
            TensorDescriptor.from_tensor(a, [bt, HALF_BYTES], x_layout))


def progressive_gemm(a: torch.Tensor, xs: torch.Tensor, w: KernelWeight, bias, act, c: torch.Tensor,
                     block: tuple[int, int] = (128, 128), stages: int = 4, warps: int = 8) -> None:
    """c = act(a * xs @ W^T + bias) for progressive INT4 W; a int8 [M, K], xs float32 [M]; block: (weight rows,
    tokens) a program; stages: ring slots of two chunks each (one where K is an odd number of chunks)."""
    m, k = a.shape
    n = w.out_features
    bn, bt = block
    w_desc, x_desc = descriptors(w.qweight, a, block)
    grid = (triton.cdiv(m, bt) * triton.cdiv(n, bn),)
    _progressive_gemm_kernel[grid](
        w_desc, x_desc, w.scale, w.zero, w.row_scale, xs, bias if bias is not None else c, c, m, n, k, c.stride(0),
        GROUP_SIZE=w.kernel_group, HAS_BIAS=bias is not None, ACT=act_code(act), STAGES=stages,
        CHUNKS=2 if k % (4 * HALF_BYTES) == 0 else 1, num_warps=warps)
