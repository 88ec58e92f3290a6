"""Attention in Triton that reads the model's mask as it is: encoder (bidirectional) blocks, and one query
against a decoder's KV cache.

torch's SDPA turns a boolean mask into a float one on every call (a fill kernel per layer) and its
fused kernels take no stride-0 masks; this kernel reads Hugging Face's expanded [B, 1, Sq, Sk] mask (bool
keep-mask or additive float) through its strides, so a key-padding mask costs one cached row per program.
Flash-style: one program per (query block, batch x head), online softmax over key blocks, P rounded to
the input dtype for the second dot as FlashAttention does. One query (decode) takes _decode_attn_kernel
instead: no MMA (a single row wastes a tensor-core tile), the keys split over programs so a short cache
still fills the GPU, and the last program of each head merges the splits. Both read grouped K/V heads
(GQA) in place. Twin: reference.attention.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from zeroquant.kernels.triton.gemm_common import split_counters
from zeroquant.kernels.triton.launch import device_index, device_info, pdl_flags, wait_for_producer

_LOG2E = 1.4426950408889634
MASK_NONE, MASK_KEEP, MASK_ADD = 0, 1, 2


@triton.jit
def _heads(bh, H, HK):
    """Program index b * H + h -> (batch b, query head h, the K/V head it reads: h // (H / HK)), as int64."""
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    return b, h, h // (H // HK)


@triton.jit
def _apply_mask(s, mv, MASK: tl.constexpr):
    """Scores s (log2 domain) with the model's mask values mv: a bool keep-mask (MASK 1) or additive (MASK 2)."""
    if MASK == 1:
        return tl.where(mv != 0, s, float("-inf"))
    return s + mv.to(tl.float32) * 1.4426950408889634


@triton.jit
def _attn_kernel(
    q_ptr, k_ptr, v_ptr, m_ptr, o_ptr,
    sqb, sqh, sqs, skb, skh, sks, svb, svh, svs, smb, smh, smq, smk, sob, soh, sos,
    H, HK, SQ, SK, D, qk_scale,
    MASK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr,
):
    wait_for_producer(PDL)
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b, h, hk = _heads(bh, H, HK)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    rows = offs_m < SQ
    dmask = offs_d < D
    q = tl.load(q_ptr + b * sqb + h * sqh + offs_m[:, None] * sqs + offs_d[None, :],
                mask=rows[:, None] & dmask[None, :], other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(0, SK, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        cols = offs_n < SK
        k = tl.load(k_ptr + b * skb + hk * skh + offs_n[None, :] * sks + offs_d[:, None],
                    mask=cols[None, :] & dmask[:, None], other=0.0)
        s = tl.dot(q, k) * qk_scale  # log2 domain: exp2 below
        if MASK != 0:
            mv = tl.load(m_ptr + b * smb + h * smh + offs_m[:, None] * smq + offs_n[None, :] * smk,
                         mask=rows[:, None] & cols[None, :], other=0)
            s = _apply_mask(s, mv, MASK)
        s = tl.where(cols[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # Rows with every key masked so far keep m = -inf; subtract 0 instead so exp2 gives 0, not NaN.
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_use[:, None])
        alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + b * svb + hk * svh + offs_n[:, None] * svs + offs_d[None, :],
                    mask=cols[:, None] & dmask[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    # A fully masked row has l = 0: it outputs zeros (torch's math path would give NaN).
    o = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(o_ptr + b * sob + h * soh + offs_m[:, None] * sos + offs_d[None, :], o.to(o_ptr.dtype.element_ty),
             mask=rows[:, None] & dmask[None, :])


@triton.jit
def _decode_attn_kernel(
    q_ptr, k_ptr, v_ptr, m_ptr, o_ptr, ws_ptr, cnt_ptr,
    sqb, sqh, skb, skh, sks, svb, svh, svs, smb, smh, smk, sob, soh,
    H, HK, SK, D, qk_scale,
    MASK: tl.constexpr, SPLIT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr,
):
    """Program (b * H + h, s): query head h of batch b against the s-th of SPLIT slices of the keys, online
    softmax over BLOCK_N keys at a time on CUDA cores. With SPLIT > 1 each program stores (max, sum, weighted
    values) in float32 and the last of the head's programs to arrive merges them in slice order."""
    wait_for_producer(PDL)
    bh = tl.program_id(0)
    sp = tl.program_id(1)
    b, h, hk = _heads(bh, H, HK)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    q = tl.load(q_ptr + b * sqb + h * sqh + offs_d, mask=dmask, other=0.0).to(tl.float32) * qk_scale
    per = tl.cdiv(tl.cdiv(SK, BLOCK_N), SPLIT) * BLOCK_N
    m_i = tl.full([1], float("-inf"), tl.float32)
    l_i = tl.zeros([1], tl.float32)
    acc = tl.zeros([BLOCK_D], tl.float32)
    for start in range(sp * per, tl.minimum(SK, sp * per + per), BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        cols = offs_n < SK
        kv = cols[:, None] & dmask[None, :]
        k = tl.load(k_ptr + b * skb + hk * skh + offs_n[:, None] * sks + offs_d[None, :], mask=kv, other=0.0)
        v = tl.load(v_ptr + b * svb + hk * svh + offs_n[:, None] * svs + offs_d[None, :], mask=kv, other=0.0)
        s = tl.sum(k.to(tl.float32) * q[None, :], 1)  # log2 domain: exp2 below
        if MASK != 0:
            s = _apply_mask(s, tl.load(m_ptr + b * smb + h * smh + offs_n * smk, mask=cols, other=0), MASK)
        s = tl.where(cols, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 0))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # all masked so far: exp2 gives 0, not NaN
        p = tl.exp2(s - m_use)
        alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 0)
        acc = acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), 0)
        m_i = m_new
    out = o_ptr + b * sob + h * soh + offs_d
    if SPLIT == 1:
        tl.store(out, (acc / tl.where(l_i == 0.0, 1.0, l_i)).to(o_ptr.dtype.element_ty), mask=dmask)
    else:
        row = ws_ptr + (bh * SPLIT + sp) * (BLOCK_D + 2)
        tl.store(row + offs_d, acc)
        tl.store(row + BLOCK_D + tl.arange(0, 1), m_i)
        tl.store(row + BLOCK_D + 1 + tl.arange(0, 1), l_i)
        tl.debug_barrier()  # every thread's partial is written before the arrival is released
        if tl.atomic_add(cnt_ptr + bh, 1) == SPLIT - 1:
            first = ws_ptr + bh * SPLIT * (BLOCK_D + 2)
            m_all = tl.load(first + tl.arange(0, SPLIT) * (BLOCK_D + 2) + BLOCK_D, cache_modifier=".cg")
            top = tl.max(m_all, 0)
            top = tl.where(top == float("-inf"), 0.0, top)
            acc = tl.zeros([BLOCK_D], tl.float32)
            l_all = tl.zeros([1], tl.float32)
            for i in tl.static_range(SPLIT):
                part = first + i * (BLOCK_D + 2)
                w = tl.exp2(tl.load(part + BLOCK_D + tl.arange(0, 1), cache_modifier=".cg") - top)
                l_all += w * tl.load(part + BLOCK_D + 1 + tl.arange(0, 1), cache_modifier=".cg")
                acc += w * tl.load(part + offs_d, cache_modifier=".cg")
            tl.store(out, (acc / tl.where(l_all == 0.0, 1.0, l_all)).to(o_ptr.dtype.element_ty), mask=dmask)
            tl.store(cnt_ptr + bh, 0)


def _mask_4d(mask: torch.Tensor | None, b: int, h: int, sq: int, sk: int) -> tuple[int, torch.Tensor | None]:
    if mask is None:
        return MASK_NONE, None
    if mask.dim() != 4:
        raise ValueError(f"attention mask must be 4-D [B, 1 or H, Sq, Sk], got shape {tuple(mask.shape)}")
    m = mask.expand(b, h, sq, sk)  # broadcast dims get stride 0: nothing is materialised
    return (MASK_KEEP, m.view(torch.uint8)) if m.dtype == torch.bool else (MASK_ADD, m)


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v for q [B, H, Sq, D], k/v [B, HK, Sk, D] with HK dividing H (grouped
    heads: query head h reads K/V head h // (H / HK)); any strides, last dim dense.

    mask: None, bool (True = attend) or additive float, broadcastable to [B, H, Sq, Sk]. Returns [B, H, Sq, D]
    as a transposed view of a [B, Sq, H, D] tensor, the layout the output projection reads.
    """
    b, h, sq, d = q.shape
    hk, sk = k.shape[1], k.shape[2]
    if h % hk or v.shape[1] != hk:
        raise ValueError(f"{h} query heads cannot share {hk} key / {v.shape[1]} value heads")
    if any(t.stride(-1) != 1 for t in (q, k, v)):
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    kind, m = _mask_4d(mask, b, h, sq, sk)
    o = torch.empty(b, sq, h, d, dtype=q.dtype, device=q.device)
    ms = m.stride() if m is not None else (0, 0, 0, 0)
    block_d = max(16, triton.next_power_of_2(d))
    if not o.numel():
        return o.transpose(1, 2)
    if sq == 1:
        _decode_attention(q, k, v, m, ms, o, kind, hk, scale, block_d)
        return o.transpose(1, 2)
    # 128 x 64 tiles, 8 warps, 2 stages: the fastest tiling measured for BERT-large's heads (docs/history.md).
    block_m = 64 if sq <= 64 else 128
    _attn_kernel[(triton.cdiv(sq, block_m), b * h)](
        q, k, v, m if m is not None else q, o,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), *ms, o.stride(0), o.stride(2), o.stride(1),
        h, hk, sq, sk, d, scale * _LOG2E,
        MASK=kind, BLOCK_M=block_m, BLOCK_N=64, BLOCK_D=block_d, num_warps=4 if block_m == 64 else 8,
        num_stages=2, **pdl_flags(q),
    )
    return o.transpose(1, 2)


# Keys a decode program reads per step, and its warps: of 3 x 5 x 2 (BLOCK_N, split, warps) variants at 1 x 192,
# 1 x 1024 and 16 x 192 (batch x keys, 32 heads), 64 keys with 4 warps and about 4 programs per SM was the
# fastest or close to it at each (docs/history.md).
DECODE_BLOCK_N = 64
DECODE_WARPS = 4
DECODE_PROGRAMS_PER_SM = 4
MAX_DECODE_SPLIT = 16


def decode_split(heads: int, keys: int, sms: int) -> int:
    """Key slices per query head: about DECODE_PROGRAMS_PER_SM programs per SM, at most one slice per
    DECODE_BLOCK_N keys, a power of two (the merge reads every slice's maximum at once; trailing slices may
    be empty)."""
    blocks = triton.cdiv(keys, DECODE_BLOCK_N)
    per_head = DECODE_PROGRAMS_PER_SM * sms // max(heads, 1)
    return triton.next_power_of_2(max(1, min(blocks, per_head, MAX_DECODE_SPLIT)))


def _decode_attention(q, k, v, m, ms, o, kind, hk, scale, block_d) -> None:
    b, h, _, d = q.shape
    split = decode_split(b * h, k.shape[2], device_info(device_index(q))[1])
    ws = torch.empty(b * h * split * (block_d + 2), dtype=torch.float32, device=q.device)
    _decode_attn_kernel[(b * h, split)](
        q, k, v, m if m is not None else q, o, ws, split_counters(q.device, b * h),
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        ms[0], ms[1], ms[3], o.stride(0), o.stride(2),
        h, hk, k.shape[2], d, scale * _LOG2E,
        MASK=kind, SPLIT=split, BLOCK_N=DECODE_BLOCK_N, BLOCK_D=block_d, num_warps=DECODE_WARPS, **pdl_flags(q),
    )
