"""Prefill W8A8 with per-channel weights and 16-bit outputs on Hopper as a warp-specialized ping-pong GEMM (Gluon).

Why: at K = 1024 (BERT-large) the TMA GEMM (tma_gemm) spends much of each tile outside its eight K steps
(loads before the first MMA, the epilogue and store after the last; docs/kernels.md). Here one
warp issues every TMA load for all of the program's tiles into a STAGES-deep ring, and two consumer warpgroups
take alternate tiles: while one runs its epilogue the other's MMAs run, and the loads of a tile are in flight
before its consumer reaches it. Stage g of the ring holds K step g % k_steps of the program's tile g // k_steps,
so each partition computes every barrier's slot and phase from (tile, step) alone.
"""

from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from zeroquant.kernels import act_code
from zeroquant.kernels.triton.gemm_common import _tile
from zeroquant.kernels.triton.launch import device_index, device_info, pdl_flags, wait_for_producer
from zeroquant.kernels.triton.rowwise import apply_act
from zeroquant.kernels.weight_format import KernelWeight

# 4 default warps (consumer 0) + 1 producer + 4 (consumer 1), counted as 12 warps: registers a thread before
# the partitions re-balance them (the producer drops to 24, the consumers share the rest).
MAX_REGS = 65536 // (12 * 32) // 8 * 8


@gluon.jit
def _slot(i, k, k_steps, STAGES: gl.constexpr):
    """(ring slot, barrier phase) of the program's tile i, K step k."""
    g = i * k_steps + k
    return g % STAGES, (g // STAGES) & 1


@gluon.jit
def _producer(descs, bars, bufs, ptrs, M, N, K, HAS_BIAS: gl.constexpr, ACT: gl.constexpr, EARLY: gl.constexpr,
              ROLE: gl.constexpr):
    """One warp: TMA loads of every K step of the program's tiles, in order, each into the next free slot."""
    a_desc, w_desc, c_desc = descs
    ready, empty, order = bars
    a_bufs, w_bufs, c_bufs = bufs
    BLOCK_M: gl.constexpr = a_desc.block_type.shape[0]
    BLOCK_K: gl.constexpr = a_desc.block_type.shape[1]
    BLOCK_N: gl.constexpr = w_desc.block_type.shape[0]
    STAGES: gl.constexpr = a_bufs.type.shape[0]
    k_steps = gl.cdiv(K, BLOCK_K)
    tiles = gl.cdiv(M, BLOCK_M) * gl.cdiv(N, BLOCK_N)
    i = 0
    for t in range(gl.program_id(0), tiles, gl.num_programs(0)):
        pid_m, pid_n = _tile(t, M, N, BLOCK_M, BLOCK_N)
        for k in range(k_steps):
            s, phase = _slot(i, k, k_steps, STAGES)
            mbarrier.wait(empty.index(s), phase ^ 1)  # barriers start with phase 1 complete: the first round passes
            mbarrier.expect(ready.index(s), a_desc.block_type.nbytes + w_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(a_desc, [pid_m * BLOCK_M, k * BLOCK_K], ready.index(s), a_bufs.index(s))
            tma.async_copy_global_to_shared(w_desc, [pid_n * BLOCK_N, k * BLOCK_K], ready.index(s), w_bufs.index(s))
        i += 1


@gluon.jit
def _epilogue_vectors(ptrs, pid_m, pid_n, M, N, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HAS_BIAS: gl.constexpr,
                      ACC: gl.constexpr):
    """A tile's channel scales, token scales and bias (float32; the bias is the channel scales where there is
    none, never read)."""
    as_ptr, s_ptr, b_ptr = ptrs
    offs_m = pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, ACC))
    offs_n = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, ACC))
    s_n = gl.load(s_ptr + offs_n % N).to(gl.float32)
    b_n = s_n
    if HAS_BIAS:
        b_n = gl.load(b_ptr + offs_n % N).to(gl.float32)
    return s_n, gl.load(as_ptr + offs_m % M), b_n


@gluon.jit
def _consumer(descs, bars, bufs, ptrs, M, N, K, HAS_BIAS: gl.constexpr, ACT: gl.constexpr, EARLY: gl.constexpr,
              ROLE: gl.constexpr):
    """One warpgroup: the program's tiles ROLE, ROLE + 2, ...: int32 accumulation by warpgroup MMA from the ring
    (one MMA in flight; a slot is released once the MMA reading it has completed), then the epilogue (token
    and channel scales, bias, activation) stored by TMA from this consumer's own output buffer."""
    a_desc, w_desc, c_desc = descs
    ready, empty, order = bars
    a_bufs, w_bufs, c_bufs = bufs
    BLOCK_M: gl.constexpr = a_desc.block_type.shape[0]
    BLOCK_K: gl.constexpr = a_desc.block_type.shape[1]
    BLOCK_N: gl.constexpr = w_desc.block_type.shape[0]
    STAGES: gl.constexpr = a_bufs.type.shape[0]
    ACC: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_N, 32])
    c_smem = c_bufs.index(ROLE)
    k_steps = gl.cdiv(K, BLOCK_K)
    tiles = gl.cdiv(M, BLOCK_M) * gl.cdiv(N, BLOCK_N)
    programs = gl.num_programs(0)
    i = ROLE
    j = 0
    for t in range(gl.program_id(0) + ROLE * programs, tiles, 2 * programs):
        pid_m, pid_n = _tile(t, M, N, BLOCK_M, BLOCK_N)
        # Start after the other consumer's main loop on tile i - 1: a ring slot's barrier may then be at most
        # one phase behind the one waited for (a wait two phases ahead would pass at once), and the two main
        # loops alternate, each overlapping the other's epilogue.
        if ROLE == 1:
            mbarrier.wait(order.index(0), j & 1)
        else:
            mbarrier.wait(order.index(1), (j + 1) & 1, pred=j > 0)
        if EARLY:  # the epilogue's scales and bias in flight under the main loop
            s_n, s_m, b_n = _epilogue_vectors(ptrs, pid_m, pid_n, M, N, BLOCK_M, BLOCK_N, HAS_BIAS, ACC)
        acc = gl.zeros([BLOCK_M, BLOCK_N], gl.int32, ACC)
        prev = 0
        for k in range(k_steps):
            s, phase = _slot(i, k, k_steps, STAGES)
            mbarrier.wait(ready.index(s), phase)
            acc = warpgroup_mma(a_bufs.index(s), w_bufs.index(s).permute((1, 0)), acc, is_async=True)
            acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))
            mbarrier.arrive(empty.index(prev), pred=k > 0)  # the MMA before this one is done with its slot
            prev = s
        mbarrier.arrive(order.index(ROLE))
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
        mbarrier.arrive(empty.index(prev))

        if not EARLY:
            s_n, s_m, b_n = _epilogue_vectors(ptrs, pid_m, pid_n, M, N, BLOCK_M, BLOCK_N, HAS_BIAS, ACC)
        out = acc.to(gl.float32) * s_n[None, :]
        out = out * s_m[:, None]
        if HAS_BIAS:
            out += b_n[None, :]
        out = apply_act(out, ACT)
        tma.store_wait(pendings=0)  # this buffer's previous tile has left
        c_smem.store(out.to(c_desc.dtype))
        fence_async_shared()
        tma.async_copy_shared_to_global(c_desc, [pid_m * BLOCK_M, pid_n * BLOCK_N], c_smem)
        i += 2
        j += 1
    tma.store_wait(pendings=0)


@gluon.jit
def _w8a8_pingpong_kernel(a_desc, w_desc, c_desc, as_ptr, s_ptr, b_ptr, M, N, K, HAS_BIAS: gl.constexpr,
                          ACT: gl.constexpr, STAGES: gl.constexpr, EARLY: gl.constexpr, PDL: gl.constexpr,
                          CONSUMER_REGS: gl.constexpr):
    BLOCK_M: gl.constexpr = a_desc.block_type.shape[0]
    BLOCK_K: gl.constexpr = a_desc.block_type.shape[1]
    BLOCK_N: gl.constexpr = w_desc.block_type.shape[0]
    a_bufs = gl.allocate_shared_memory(gl.int8, [STAGES, BLOCK_M, BLOCK_K], a_desc.layout)
    w_bufs = gl.allocate_shared_memory(gl.int8, [STAGES, BLOCK_N, BLOCK_K], w_desc.layout)
    c_bufs = gl.allocate_shared_memory(c_desc.dtype, [2, BLOCK_M, BLOCK_N], c_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    order = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(STAGES):
        mbarrier.init(ready.index(s), count=1)
        mbarrier.init(empty.index(s), count=1)
    for r in gl.static_range(2):
        mbarrier.init(order.index(r), count=1)
    wait_for_producer(PDL)  # before any load of the tokens (the parent region runs before every partition)
    descs = (a_desc, w_desc, c_desc)
    bars = (ready, empty, order)
    bufs = (a_bufs, w_bufs, c_bufs)
    ptrs = (as_ptr, s_ptr, b_ptr)
    # Every partition takes the same arguments (Gluon's warp_specialize asks for one tuple shape); ROLE tells
    # the two consumers apart.
    gl.warp_specialize([(_consumer, (descs, bars, bufs, ptrs, M, N, K, HAS_BIAS, ACT, EARLY, 0)),
                        (_producer, (descs, bars, bufs, ptrs, M, N, K, HAS_BIAS, ACT, EARLY, 1)),
                        (_consumer, (descs, bars, bufs, ptrs, M, N, K, HAS_BIAS, ACT, EARLY, 1))],
                       [1, 4], [24, CONSUMER_REGS])


def pingpong_ok(a: torch.Tensor, c: torch.Tensor) -> bool:
    """Whether a GEMM tma_gemm.tma_ok takes runs here: 512 tokens or more (below, the autotuned TMA GEMM's
    other tile shapes win: docs/kernels.md), and a 16-bit output (the two consumers' output tiles fit shared
    memory beside the ring only in 16 bits)."""
    return a.shape[0] >= 512 and c.dtype in (torch.float16, torch.bfloat16)


def w8a8_pingpong(a, xs, w: KernelWeight, bias, act, c, block=(128, 128, 128), stages: int = 5,
                  consumer_regs: int = 232, early: bool | None = None) -> None:
    """Launch one persistent program an SM (fewer where there are fewer tiles). early: load the epilogue's
    scales before each main loop (default: at 1024 tokens or fewer, where it measured faster)."""
    m, k = a.shape
    n = w.out_features
    bm, bn, bk = block
    layouts = {t: gl.NVMMASharedLayout.get_default_for(shape, dt)
               for t, shape, dt in (("a", [bm, bk], gl.int8), ("w", [bn, bk], gl.int8),
                                    ("c", [bm, bn], gl.float16 if c.dtype == torch.float16 else gl.bfloat16))}
    a_desc = TensorDescriptor.from_tensor(a, [bm, bk], layouts["a"])
    w_desc = TensorDescriptor.from_tensor(w.qweight, [bn, bk], layouts["w"])
    c_desc = TensorDescriptor.from_tensor(c, [bm, bn], layouts["c"])
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    grid = (min(tiles, device_info(device_index(a))[1]),)
    early = m <= 1024 if early is None else early
    _w8a8_pingpong_kernel[grid](
        a_desc, w_desc, c_desc, xs, w.scale, bias if bias is not None else c, m, n, k,
        HAS_BIAS=bias is not None, ACT=act_code(act), STAGES=stages, EARLY=early, CONSUMER_REGS=consumer_regs,
        num_warps=4, maxnreg=MAX_REGS, **pdl_flags(a, graph_only=True))
