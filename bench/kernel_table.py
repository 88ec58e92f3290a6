"""Kernel timings on one GPU, all measured in the same run against cuBLAS FP16.

Per (M, K, N): torch.matmul FP16 (cuBLAS), plain PyTorch W8A8 (token-wise quant + torch._int_mm +
dequant, per-channel scales: its best case), torch._int_mm alone, and our fused kernels. Row kernels
(token-wise quant, norm->quant) are reported as bandwidth against a device-to-device copy.

    python bench/kernel_table.py [--out DIR] [--quick]

Prints a table last; writes kernels.json and kernels.md to --out (default bench/results).
"""

import argparse
import json
from dataclasses import replace
from pathlib import Path

import torch
import triton

from zeroquant.core import quant as Q
from zeroquant.kernels.gluon.progressive_gemm import progressive_gemm
from zeroquant.kernels.triton import gemm, rowwise, tile_gemm, unpack, w4_gemm
from zeroquant.kernels.weight_format import interleavable, interleave

MS = [1, 16, 128, 2048, 8192]
KNS = [(4096, 4096), (4096, 11008), (11008, 4096), (8192, 8192)]


def ms(fn, *tensors: torch.Tensor, reps: int = 15) -> float:
    """Median GPU time of fn(*tensors) in ms, launch overhead excluded and L2 cold.

    The calls are captured in a CUDA graph, so CPU launch cost (which differs between cuBLAS, Triton and
    eager PyTorch and is not what a kernel costs) is not measured; each call gets its own copies of
    `tensors` (the weights), rotated over more bytes than L2 holds, so weights stream from HBM as in a
    model's forward. Autotuning happens in the warm-up call, before capture.
    """
    nbytes = sum(t.numel() * t.element_size() for t in tensors) or 1
    copies = max(1, min(16, -(-(256 << 20) // nbytes)))
    sets = [tensors] + [tuple(t.clone() for t in tensors) for _ in range(copies - 1)]
    fn(*sets[0])
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for a in sets:
            fn(*a)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for a in sets:
            fn(*a)
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / len(sets))
    del graph, sets
    return sorted(times)[len(times) // 2]


def torch_w8a8(x, w8t, sw):
    """What a user gets from plain PyTorch: quantize, torch._int_mm, dequantize (3+ kernels)."""
    q, s = Q.quantize_per_token(x)
    m = q.shape[0]
    if m <= 16:  # torch._int_mm needs M > 16 on CUDA
        q = torch.nn.functional.pad(q, (0, 0, 0, 32 - m))
    y = torch._int_mm(q, w8t)[:m]
    return (y.float() * s * sw).half()


def weights(k, n, bits, group, dev, int4_scale_dtype=torch.float16, int8_tokens=False, progressive=False):
    """Random kernel weights; INT4 scales and zero points in int4_scale_dtype (float16, as the W4 presets store
    them, unless asked), interleaved where QuantLinear would for int8_tokens. progressive: INT4 with integer group
    scales s2 in [1, 16], zero points that keep s2 * (q - z) in int8, and float row scales."""
    g = 1 if group < 0 else k // group
    if progressive:
        q = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device=dev)
        s2 = torch.randint(1, 17, (n, g), dtype=torch.int8, device=dev)
        z = torch.randint(7, 9, (n, g), dtype=torch.int8, device=dev)
        rows = torch.rand(n, device=dev) * 1e-3 + 1e-4
        return gemm.KernelWeight.from_quant(q, s2, z, 4, group, row_scale=rows)
    scale = torch.rand(n, g, device=dev) * 1e-2 + 1e-3
    if bits == 8:
        q = torch.randint(-127, 128, (n, k), dtype=torch.int8, device=dev)
        return gemm.KernelWeight.from_quant(q, scale, None, 8, group if group > 0 else k)
    q = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device=dev)
    zero = torch.randint(0, 16, (n, g), device=dev).float()
    s, z = scale.to(int4_scale_dtype), zero.to(int4_scale_dtype)
    if interleavable(4, int4_scale_dtype, False, int8_tokens):  # as QuantLinear stores them
        s, z = (t.t() for t in interleave(s.t(), z.t()))
    return gemm.KernelWeight.from_quant(q, s, z, 4, group if group > 0 else k)


def _timed_or_none(name: str, fn):
    """fn()'s time, or None (and the error printed) where that column's kernel fails: the others still run."""
    try:
        return fn()
    except Exception as e:  # a kernel that does not compile or launch on this device
        print(f"{name}: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}", flush=True)
        return None


def gemm_rows(dev, gluon: bool = True, only: set[str] | None = None):
    rows = []
    for k, n in KNS:
        w16 = torch.randn(n, k, device=dev, dtype=torch.float16) * k**-0.5
        w8c, w8g = weights(k, n, 8, -1, dev), weights(k, n, 8, 128, dev)
        w4g = weights(k, n, 4, 128, dev)
        w4p = weights(k, n, 4, 128, dev, progressive=True)
        sw = w8c.scale.reshape(1, -1)
        for m in MS:
            x = torch.randn(m, k, device=dev, dtype=torch.float16)
            xq, xs = rowwise.quantize_per_token(x)
            def gluon_prog(q, s, z):
                """The Gluon W4A8 GEMM for progressive weights, called directly, on w4p's layout."""
                c = torch.empty(m, n, device=dev, dtype=torch.float16)
                return progressive_gemm(xq, xs.reshape(-1), replace(w4p, qweight=q, scale=s, zero=z), None, None, c)

            def ours(w, act, kernel=None):
                """(fn, *weight tensors) for ms(); act: 'fp16' input, 'quant' token-wise quant + GEMM, 'int8'.
                kernel: None for gemm.quant_linear's choice, or 'tile' (tile_gemm) / 'wide' (w4_gemm) / 'unpack'
                (unpack_int4, then the W8A8 dispatch or cuBLAS) called directly, so each INT4 kernel is timed
                whichever one the dispatch picks."""
                def fn(q, s, z=None):
                    kw = replace(w, qweight=q, scale=s, zero=z)
                    if kernel is not None:
                        c = torch.empty(m, n, device=dev, dtype=torch.float16)
                        a, scales = (x, None) if act == "fp16" else (xq, xs.reshape(-1))
                        if kernel == "wide":
                            return w4_gemm.w4_gemm(a, scales, kw, None, None, c)
                        if kernel == "unpack" and (kw.row_scale is None or scales is None):  # as the dispatch
                            return unpack.dense_unpacked(a, scales, kw, None, None, c)
                        if kernel == "unpack":
                            w8 = unpack.as_int8_weight(kw, unpack.unpack_int4(kw, torch.int8))
                            return gemm.quant_linear(a, scales.reshape(-1, 1), w8)
                        return tile_gemm.tile_gemm(a, c if scales is None else scales, kw, None, None, c)
                    if act == "fp16":
                        return gemm.quant_linear(x, None, kw)
                    return gemm.quant_linear(*(rowwise.quantize_per_token(x) if act == "quant" else (xq, xs)), kw)
                return (fn, w.qweight, w.scale) + ((w.zero,) if w.zero is not None else ())

            wide = m > 16  # the sizes where the dispatch has a choice of INT4 GEMM
            timed = {  # name: (when, what to time)
                "fp16": (True, lambda: ms(lambda w: torch.matmul(x, w.t()), w16)),
                "torch_w8a8": (True, lambda: ms(lambda w: torch_w8a8(x, w.t(), sw), w8c.qweight)),
                "torch_int_mm_only": (m > 16, lambda: ms(lambda w: torch._int_mm(xq, w.t()), w8c.qweight)),
                "quant": (True, lambda: ms(lambda: rowwise.quantize_per_token(x))),
                "w8a8_channel": (True, lambda: ms(*ours(w8c, "quant"))),
                "w8a8_channel_gemm": (True, lambda: ms(*ours(w8c, "int8"))),
                "w8a8_g128": (True, lambda: ms(*ours(w8g, "quant"))),
                "w8a8_g128_gemm": (True, lambda: ms(*ours(w8g, "int8"))),
                "w4a16_g128": (True, lambda: ms(*ours(w4g, "fp16"))),
                "w4a8_g128": (True, lambda: ms(*ours(w4g, "quant"))),
                "w4a8_g128_gemm": (True, lambda: ms(*ours(w4g, "int8"))),
                "w4a16_prog": (True, lambda: ms(*ours(w4p, "fp16"))),
                "w4a8_prog_gemm": (True, lambda: ms(*ours(w4p, "int8"))),
                "w4a16_g128_tile": (wide, lambda: ms(*ours(w4g, "fp16", "tile"))),
                "w4a8_g128_tile_gemm": (wide, lambda: ms(*ours(w4g, "int8", "tile"))),
                "w4a8_prog_tile_gemm": (wide, lambda: ms(*ours(w4p, "int8", "tile"))),
                "w4a16_g128_wide": (wide, lambda: ms(*ours(w4g, "fp16", "wide"))),
                "w4a8_g128_wide_gemm": (wide, lambda: ms(*ours(w4g, "int8", "wide"))),
                "w4a16_prog_wide": (wide, lambda: ms(*ours(w4p, "fp16", "wide"))),
                "w4a8_prog_wide_gemm": (wide, lambda: ms(*ours(w4p, "int8", "wide"))),
                "w4a8_prog_gluon_gemm": (wide and gluon, lambda: ms(gluon_prog, w4p.qweight, w4p.scale, w4p.zero)),
                "w4a16_g128_unpack": (m >= 256, lambda: ms(*ours(w4g, "fp16", "unpack"))),
                "w4a8_prog_unpack_gemm": (m >= 256, lambda: ms(*ours(w4p, "int8", "unpack"))),
                "w4a8_g128_unpack_gemm": (m >= 256, lambda: ms(*ours(w4g, "int8", "unpack"))),
            }
            t = {name: _timed_or_none(name, fn) if when and (only is None or name in only or name == "fp16") else None
                 for name, (when, fn) in timed.items()}
            row = {"M": m, "K": k, "N": n, "ms": t,
                   "x_fp16": {name: (t["fp16"] / v if v else None) for name, v in t.items()}}
            rows.append(row)
            print(f"M={m:5d} K={k:5d} N={n:5d} fp16 {t['fp16'] * 1e3:8.1f}us | "
                  + " ".join(f"{name} {v:.2f}x" for name, v in row["x_fp16"].items() if v and name != "fp16"),
                  flush=True)
    return rows


def row_kernel_rows(dev, k=4096):
    big = torch.empty(2**28, dtype=torch.uint8, device=dev)
    big2 = torch.empty_like(big)
    copy_gbs = 2 * big.numel() / ms(lambda: big2.copy_(big)) / 1e6  # 256 MiB each way
    w, b = torch.rand(k, device=dev, dtype=torch.float16) + 0.5, torch.randn(k, device=dev, dtype=torch.float16)
    rows = []
    for m in MS:
        x = torch.randn(m, k, device=dev, dtype=torch.float16)
        # bytes each kernel must move: read x (2/elt), write int8 (1/elt) [+ y (2/elt)] + scales
        cases = {
            "quantize_per_token": (lambda x: rowwise.quantize_per_token(x), 3),
            "layernorm_quant(+y)": (lambda x: rowwise.norm_quant(x, w, b, 1e-5, "layernorm"), 5),
            "rmsnorm_quant": (lambda x: rowwise.norm_quant_only(x, w, None, 1e-5, "rmsnorm"), 3),
            "torch: layernorm then quant": (
                lambda x: Q.quantize_per_token(torch.nn.functional.layer_norm(x, (k,), w, b, 1e-5)), 5),
        }
        for name, (fn, per_elt) in cases.items():
            t = ms(fn, x)
            nbytes = m * k * per_elt + m * 4 + 2 * k * 2
            gbs = nbytes / t / 1e6
            rows.append({"kernel": name, "M": m, "K": k, "ms": t, "GB/s": gbs, "of_copy": gbs / copy_gbs})
            print(f"{name:28s} M={m:5d} {t * 1e3:8.2f}us {gbs:7.0f} GB/s = {gbs / copy_gbs:.0%} of copy", flush=True)
    return rows, copy_gbs


def kernel_facts():
    """Which MMA instructions and how many spills the compiled GEMM variants have (from their PTX)."""
    facts = []
    jit = tile_gemm._qlinear_kernel.fn.fn  # autotuner -> heuristics -> JITFunction
    for cache in getattr(jit, "device_caches", {}).values():
        for kern in cache[0].values():
            ptx = kern.asm.get("ptx", "")
            c = {k: v for k, v in kern.src.constants.items()} if hasattr(kern, "src") else {}
            facts.append({"constants": {str(k): str(v) for k, v in c.items()},
                          "wgmma": "wgmma.mma_async" in ptx, "mma_sync": "mma.sync" in ptx,
                          "spills": getattr(kern, "n_spills", None), "regs": getattr(kern, "n_regs", None)})
    return facts


COLUMNS = {"torch_w8a8": "torch W8A8", "w8a8_channel": "W8A8 ch +q", "w8a8_channel_gemm": "W8A8 ch gemm",
           "w8a8_g128": "W8A8 g128 +q", "w8a8_g128_gemm": "W8A8 g128 gemm", "w4a16_g128": "W4A16 g128",
           "w4a8_g128": "W4A8 g128 +q", "w4a8_g128_gemm": "W4A8 g128 gemm", "w4a16_prog": "W4A16 progressive",
           "w4a8_prog_gemm": "W4A8 progressive gemm", "w4a16_g128_tile": "tile: W4A16 g128",
           "w4a8_g128_tile_gemm": "tile: W4A8 g128 gemm", "w4a8_prog_tile_gemm": "tile: W4A8 progressive gemm",
           "w4a16_g128_wide": "w4_gemm: W4A16 g128", "w4a8_g128_wide_gemm": "w4_gemm: W4A8 g128 gemm",
           "w4a16_prog_wide": "w4_gemm: W4A16 progressive", "w4a8_prog_wide_gemm": "w4_gemm: W4A8 progressive gemm",
           "w4a8_prog_gluon_gemm": "Gluon: W4A8 progressive gemm", "w4a16_g128_unpack": "unpack: W4A16 g128",
           "w4a8_prog_unpack_gemm": "unpack: W4A8 progressive gemm", "w4a8_g128_unpack_gemm": "unpack: W4A8 g128 gemm"}


def markdown(res) -> str:
    out = [f"# Kernel timings on {res['device']}", "",
           "Speed-up vs cuBLAS FP16 (`torch.matmul`) in the same run: median GPU time per call from CUDA-graph "
           "replays (launch overhead excluded), weights rotated over >256 MiB so they stream from HBM. "
           "'+q' includes the token-wise quant kernel; 'gemm' is the GEMM alone on pre-quantized input. Unprefixed "
           "columns are gemm.quant_linear's choice of kernel; 'tile:', 'w4_gemm:' and 'Gluon:' call one directly.",
           "",
           "| M | K | N | fp16 us | " + " | ".join(COLUMNS.values()) + " |",
           "|---|---|---|---|" + "---|" * len(COLUMNS)]
    for r in res["gemm"]:
        x = r["x_fp16"]
        out.append(f"| {r['M']} | {r['K']} | {r['N']} | {r['ms']['fp16'] * 1e3:.1f} | "
                   + " | ".join("" if x.get(c) is None else f"{x[c]:.2f}" for c in COLUMNS) + " |")
    if not res["rows"]:
        return "\n".join(out) + "\n"
    out += ["", f"Row kernels, K=4096, vs device copy bandwidth {res['copy_GBps']:.0f} GB/s:", "",
            "| kernel | M | us | GB/s | of copy |", "|---|---|---|---|---|"]
    for r in res["rows"]:
        out.append(f"| {r['kernel']} | {r['M']} | {r['ms'] * 1e3:.2f} | {r['GB/s']:.0f} | {r['of_copy']:.0%} |")
    return "\n".join(out) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--quick", action="store_true", help="two shapes only (smoke run)")
    ap.add_argument("--ms", help="comma-separated token counts instead of the default sweep")
    ap.add_argument("--shapes", help="comma-separated KxN (e.g. 4096x11008,11008x4096) instead of the defaults")
    ap.add_argument("--gemm-only", action="store_true", help="skip the row kernels and the SASS facts")
    ap.add_argument("--skip-gluon", action="store_true", help="leave out the Gluon progressive GEMM's column")
    ap.add_argument("--only", help="comma-separated columns to time (beside fp16), e.g. w8a8_channel_gemm,"
                    "w4a8_prog_unpack_gemm")
    args = ap.parse_args()
    if args.quick:
        MS[:] = [1, 16, 2048, 8192]
        KNS[:] = [(4096, 4096)]
    if args.ms:
        MS[:] = [int(m) for m in args.ms.split(",")]
    if args.shapes:
        KNS[:] = [tuple(int(d) for d in s.split("x")) for s in args.shapes.split(",")]
    dev = "cuda"
    torch.manual_seed(0)
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}
    res["rows"], res["copy_GBps"] = ([], None) if args.gemm_only else row_kernel_rows(dev)
    res["gemm"] = gemm_rows(dev, gluon=not args.skip_gluon, only=set(args.only.split(",")) if args.only else None)
    res["kernel_facts"] = [] if args.gemm_only else kernel_facts()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "kernels.json").write_text(json.dumps(res, indent=1))
    md = markdown(res)
    (out / "kernels.md").write_text(md)
    print(md)
    print(f"MMA in compiled GEMM variants: {sum(f['wgmma'] for f in res['kernel_facts'])} wgmma, "
          f"{sum(f['mma_sync'] for f in res['kernel_facts'])} mma.sync, "
          f"max spills {max([f['spills'] or 0 for f in res['kernel_facts']], default=0)}")


if __name__ == "__main__":
    main()
