"""Check Triton GEMM kernels against their reference twins on a CPU, under Triton's interpreter.

The interpreter runs a kernel's Python body with numpy, so indexing, masking, group lookups and the order of
scales can be checked without a GPU; it does not run inline PTX, so the PTX helpers get pure-Triton stand-ins
with the same byte-for-byte meaning here (their own arithmetic is checked on the GPU). Needs `pip install
triton` (any CPU host); not a timing.

    python bench/interpret_kernels.py w4_gemm     # the INT4 GEMM for prompts, every format, short last group
    python bench/interpret_kernels.py tile_gemm   # every tile-GEMM configuration at 7, 16 and 33 tokens
    python bench/interpret_kernels.py unpack      # INT4 weights unpacked whole, bit for bit
    python bench/interpret_kernels.py skinny      # the small-M INT4 GEMM on progressive weights
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
import triton.runtime.interpreter as interpreter  # noqa: E402
from kernel_cases import VARIANTS, quant_linear  # noqa: E402

from zeroquant.kernels import act_code  # noqa: E402
from zeroquant.kernels import reference as R  # noqa: E402
from zeroquant.kernels.triton import skinny_gemm, tile_gemm, unpack, w4_gemm  # noqa: E402
from zeroquant.kernels.triton.gemm_common import _chunk  # noqa: E402

_patch_tensor = interpreter._patch_lang_tensor


def _patch_lang_tensor(tensor, scope):
    """Triton 3.6's interpreter turns a scalar into an int with int(array), which numpy 2.4 refuses for the
    one-element arrays it holds scalars in."""
    _patch_tensor(tensor, scope)
    scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))


interpreter._patch_lang_tensor = _patch_lang_tensor


@triton.jit
def _nibble_planes(wb, zo, ety: tl.constexpr, ROWS: tl.constexpr, BYTES: tl.constexpr):
    lo, hi = (wb & 0xF).to(tl.float32), (wb >> 4).to(tl.float32)
    if ety == tl.int8:  # zo: the zero point
        z = zo.to(tl.float32)[:, None]
        return (lo - z).to(tl.int8), (hi - z).to(tl.int8)
    base = (1024.0 if ety == tl.float16 else 128.0) - zo.to(tl.float32)[:, None]  # zo: base + zero point
    return (lo + base).to(ety), (hi + base).to(ety)


@triton.jit
def _progressive_planes(wb, s2, zs, ROWS: tl.constexpr, BYTES: tl.constexpr):
    s, z = s2.to(tl.int32)[:, None], zs.to(tl.int32)[:, None]
    lo = ((wb & 0xF).to(tl.int32) * s - z) & 0xFF
    hi = ((wb >> 4).to(tl.int32) * s - z) & 0xFF
    return tl.where(lo > 127, lo - 256, lo).to(tl.int8), tl.where(hi > 127, hi - 256, hi).to(tl.int8)


@triton.jit
def _tied(z, s):
    return z + 0.0 * s


w4_gemm._nibble_planes = _nibble_planes
w4_gemm._progressive_planes = _progressive_planes
skinny_gemm._tied = _tied
skinny_gemm._nibble_planes = _nibble_planes


def check(label: str, got: torch.Tensor, want: torch.Tensor, tol: float, bad: list[str]) -> None:
    """Print label with the relative error (inf where an element was left unwritten) and keep it in bad if the
    error is not below tol."""
    err = float("inf") if got.isnan().any() else ((got.float() - want.float()).norm() / want.float().norm()).item()
    print(f"{label}: {err:.1e}", flush=True)
    if not err < tol:
        bad.append(f"{label}: {err:.1e}")


def check_w4_gemm() -> list[str]:
    """Both token kinds, progressive and float16 scales, one scale a row, a short last group (576), a group
    longer than BLOCK_K and one shorter, on small tiles so several programs and K steps run; the 16-bit token
    cases again with an accumulator per nibble plane (SPLIT) on the int8 cases' shapes; every case whole and
    split over K (SPLIT_K)."""
    cases = [(70, 256, 96, True, "g128", (64, 64, 64)), (70, 256, 96, False, "g128", (64, 64, 64)),
             (70, 256, 96, True, "progressive", (64, 64, 64)), (70, 256, 96, False, "progressive", (64, 64, 64)),
             (33, 576, 64, True, "g128", (64, 32, 64)), (33, 576, 64, False, "progressive", (64, 32, 64)),
             (40, 256, 64, True, "channel", (64, 64, 128)), (40, 256, 64, False, "channel", (64, 64, 128)),
             (40, 512, 64, True, "g256", (64, 64, 128)), (150, 512, 200, True, "progressive", (256, 128, 128)),
             (150, 512, 200, False, "g128", (128, 128, 64)), (70, 384, 96, True, "g64", (64, 64, 128)),
             (70, 384, 96, False, "g64", (64, 64, 128)), (70, 384, 96, True, "progressive64", (64, 64, 128))]
    formats = {"g128": (128, False), "progressive": (128, False), "channel": (-1, True), "g256": (256, False),
               "g64": (64, False), "progressive64": (64, False)}
    bad = []
    cases += [(m, k, n, False, fmt, tile + (True,)) for m, k, n, a8, fmt, tile in cases if a8]
    # Each case again split over K: slices of whole BLOCK_K steps, 3 of them where that leaves a short last one.
    cases = [(m, k, n, a8, fmt, (*tile[:3], len(tile) > 3, split_k)) for m, k, n, a8, fmt, tile in cases
             for split_k in (1, 3 if k // tile[2] % 3 else 2)]
    for m, k, n, a8, fmt, (bn, bt, bk, split, split_k) in cases:
        group, sym = formats[fmt]
        scale_dtype = "int8" if fmt.startswith("progressive") else "float16"
        ql = quant_linear(k, n, 4, group, sym, a8, "cpu", scale_dtype=scale_dtype)
        kw = ql.quantized.kernel()
        x = torch.randn(m, k)
        if a8:
            xin, xs = R.quantize_per_token(x)
            want = R.quant_linear(xin, xs, ql.qweight, ql.w_scale, ql.w_zero, 4, ql.group_size, ql.bias, "silu",
                                  row_scale=ql.w_row_scale)
        else:  # the kernel's dot of q - z is exact and scaled in float32: against the exact float weights
            xin, xs = x.half(), None
            want = R.apply_act(xin.float() @ ql.quantized.dequantize().t() + ql.bias.float(), "silu")
        c = torch.full((m, n), float("nan"), dtype=torch.float16)
        tiles = triton.cdiv(m, bt) * triton.cdiv(n, bn)
        w4_gemm._w4_gemm_kernel.fn[(tiles, split_k)](
            xin, xs.reshape(-1).float() if a8 else c, kw.qweight, kw.scale,
            kw.zero if kw.zero is not None else kw.scale, kw.row_scale if kw.row_scale is not None else c, ql.bias, c,
            m, n, k, xin.stride(0), kw.qweight.stride(0), c.stride(0), 64, A_INT8=a8, HAS_ZERO=kw.zero is not None,
            GROUP_SIZE=kw.kernel_group, HAS_BIAS=True, ACT=act_code("silu"), SZ_WORD=kw.sz_step == 2,
            PROG=kw.row_scale is not None, BLOCK_N=bn, BLOCK_T=bt, BLOCK_K=bk, SPLIT=split,
            ws_ptr=torch.full((split_k * tiles * bn * bt,), float("nan")),
            cnt_ptr=torch.zeros(tiles, dtype=torch.int32), SPLIT_K=split_k)
        check(f"w4_gemm M={m} K={k} N={n} {'int8' if a8 else 'fp16'} tokens {fmt} tile {bn}x{bt}x{bk}"
              + (" split" if split else "") + (f" split-K {split_k}" if split_k > 1 else ""), c, want, 1e-3, bad)
    return bad


def check_tile_gemm() -> list[str]:
    """Every decode and prefill configuration the autotuner may pick at 7, 16 and 33 tokens."""
    bad = []
    for name, bits, group, sym, a8 in VARIANTS:
        for k, n in ((576, 192), (768, 128)):
            scale_dtype = "float16" if bits == 4 else "float32"
            ql = quant_linear(k, n, bits, group, sym, a8, "cpu", scale_dtype=scale_dtype).half()
            kw = ql.quantized.kernel()
            for m in (7, 16, 33):
                x = torch.randn(m, k).half()
                xin, xs = R.quantize_per_token(x) if a8 else (x, None)
                want = R.quant_linear(xin, xs, ql.qweight, ql.w_scale, ql.w_zero, bits, ql.group_size, ql.bias, None)
                bucket = tile_gemm._m_bucket(m)
                args = {"GROUP_SIZE": kw.kernel_group, "K": k, "W_BITS": bits, "M_BUCKET": bucket}
                for c in tile_gemm._CONFIGS[bucket]:
                    if c not in tile_gemm._prune([c], args):
                        continue
                    bk = c.kwargs["BLOCK_K"]
                    meta = dict(c.kwargs, EVEN_K=k % bk == 0, CH=_chunk({**args, "BLOCK_K": bk}),
                                MASK_M=m < c.kwargs["BLOCK_M"])
                    out = torch.full((m, n), float("nan"), dtype=torch.float16)
                    grid = (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)
                    tile_gemm._qlinear_kernel.fn.fn[grid](
                        xin, xs.reshape(-1).float() if a8 else out, kw.qweight, kw.scale,
                        kw.zero if kw.zero is not None else kw.scale, out, ql.bias, out, m, n, k, xin.stride(0),
                        kw.qweight.stride(0), out.stride(0), bucket, A_INT8=a8, W_BITS=bits,
                        HAS_ZERO=kw.zero is not None, GROUP_SIZE=kw.kernel_group, HAS_BIAS=True, ACT=0,
                        SZ_WORD=kw.sz_step == 2, PROG=False, **meta)
                    check(f"tile_gemm {name} M={m} K={k} N={n} {c.kwargs} warps {c.num_warps}", out, want, 2e-3, bad)
    return bad


def check_unpack() -> list[str]:
    """Every INT4 format into each dtype it unpacks to, bit for bit against the twin: progressive (int8, fp16,
    bf16), float16 group scales (interleaved with the zero points too), one symmetric scale a row, groups of 64,
    256 and 384 (a program's bytes span a part of a group), a short last group, a partial tile."""
    # (N, K, group, symmetric, scales, dtype); "float16 interleaved": stored for INT8 tokens, beside the zero points
    cases = [(100, 576, 128, False, "progressive", "int8"), (100, 576, 128, False, "progressive", "float16"),
             (40, 512, 128, False, "progressive", "bfloat16"), (40, 512, 64, False, "progressive", "int8"),
             (40, 320, -1, True, "float16", "float16"), (72, 576, 128, False, "float16", "float16"),
             (72, 384, 64, False, "float16", "bfloat16"), (72, 576, 128, False, "float16 interleaved", "float16"),
             (40, 896, 384, False, "float16", "float16"), (40, 640, 256, False, "progressive", "int8")]
    bad = []
    for n, k, group, sym, scales, dtype in cases:
        a8 = scales.endswith("interleaved")
        ql = quant_linear(k, n, 4, group, sym, a8, "cpu", scale_dtype="int8" if scales == "progressive" else "float16")
        kw = ql.quantized.kernel()
        assert (kw.sz_step == 2) == a8
        dt = getattr(torch, dtype)
        got = unpack.unpack_int4(kw, dt)
        if dt == torch.bfloat16:  # the interpreter truncates float32 to bfloat16 (the GPU rounds: its test)
            f32 = R.unpacked_weight(ql.qweight, ql.w_scale, ql.w_zero, ql.group_size, torch.float32, ql.w_row_scale)
            want = (f32.view(torch.int32) >> 16).to(torch.int16).view(dt)
        else:
            want = R.unpacked_weight(ql.qweight, ql.w_scale, ql.w_zero, ql.group_size, dt, ql.w_row_scale)
        label = f"unpack N={n} K={k} group {group} {scales} scales -> {dtype}"
        same = torch.equal(got.view(torch.uint8 if dt == torch.int8 else torch.int16),
                           want.view(torch.uint8 if dt == torch.int8 else torch.int16))
        print(f"{label}: {'bit for bit' if same else 'DIFFERS'}", flush=True)
        if not same:
            bad.append(label)
    return bad


def check_skinny() -> list[str]:
    """Progressive INT4 on the small-M kernel: int8 and fp16 tokens, groups of 128 and 64, a short last group, 2 to
    16 tokens, one K slice or several, 64-row and 32-row programs. Not bf16: the interpreter's bf16 dot is wrong
    for every format (float16 scales too), so bf16 is left to the GPU test."""
    bad = []
    for k, group in ((576, 128), (512, 64)):
        for tokens in ("int8", "float16"):
            a8 = tokens == "int8"
            ql = quant_linear(k, 96, 4, group, False, a8, "cpu", scale_dtype="int8").half()
            dt = torch.float16
            kw = ql.quantized.kernel()
            for m, split, rows in ((2, 1, 64), (7, 2, 32), (16, 3, 64)):
                x = torch.randn(m, k).to(dt)
                xin, xs = R.quantize_per_token(x) if a8 else (x, None)
                # the kernel multiplies exact (q - z) by float32 scales after each dot: the float32 twin
                want = R.quant_linear(xin if a8 else xin.float(), xs, ql.qweight, ql.w_scale, ql.w_zero, 4,
                                      ql.group_size, ql.bias, None, torch.float32, row_scale=ql.w_row_scale)
                out = torch.full((m, 96), float("nan"), dtype=dt)
                tiles = triton.cdiv(96, rows)
                ws = torch.zeros(split * tiles * rows * 16)
                cnt = torch.zeros(tiles, dtype=torch.int32)
                skinny_gemm._w4_skinny_kernel.fn[(tiles, split)](
                    xin, xs.reshape(-1).float() if a8 else out, kw.qweight, kw.scale, kw.zero, ql.bias, out, ws, cnt,
                    m, 96, k, xin.stride(0), kw.qweight.stride(0), out.stride(0), A_INT8=a8, HAS_ZERO=True,
                    GROUP_SIZE=kw.kernel_group, HAS_BIAS=True, ACT=0, SPLIT=split, BLOCK_N=rows, BLOCK_K=64,
                    SZ_WORD=False, rs_ptr=kw.row_scale, ROW_SCALE=True)
                check(f"skinny progressive M={m} K={k} group {group} {tokens} tokens, split {split}, {rows} rows",
                      out, want, 1e-3, bad)
    return bad


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("kernel", choices=["w4_gemm", "tile_gemm", "unpack", "skinny"])
    args = p.parse_args()
    torch.manual_seed(0)
    bad = {"w4_gemm": check_w4_gemm, "tile_gemm": check_tile_gemm, "unpack": check_unpack,
           "skinny": check_skinny}[args.kernel]()
    print(f"\n{len(bad)} case(s) off their twin" + "".join(f"\n  {b}" for b in bad))
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
