"""Compile INT4 GEMM kernels for sm_90 without a GPU and report what the compiler made of them.

Per configuration and format: registers a thread, bytes spilled to the stack, shared memory, and whether the
warpgroup MMAs read the weights from registers (RS) or from shared memory (SS), with the count of MMA waits
and shared-memory stores in the PTX. Needs Triton (its bundled ptxas and cuobjdump), not CUDA or a GPU:

    python bench/sm90_compile.py                 # w4_gemm, every configuration it autotunes over
    python bench/sm90_compile.py --tile-gemm     # the tile GEMM's INT4 path at 128 x 128 x 128, for comparison
    python bench/sm90_compile.py --unpack        # the INT4 unpacking kernel, each output it writes
    python bench/sm90_compile.py --gemv          # the INT4 GEMV, float16 and progressive scales, 1 and 2 tokens
    python bench/sm90_compile.py --skinny        # the small-M INT4 GEMM, float16 and progressive scales
    python bench/sm90_compile.py --gluon-progressive  # the Gluon W4A8 GEMM (progressive INT4), with and without bias

A kernel that the interpreter runs may still not compile (a plain Python global read inside it, say): this
catches that without a GPU too.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import tempfile
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from zeroquant.kernels.triton import skinny_gemm, tile_gemm, unpack, w4_gemm, w4_gemv

FORMATS = {"w4a8-g128": (True, False), "w4a8-progressive": (True, True), "w4a16-g128": (False, False),
           "w4a16-progressive": (False, True)}
ALIGNED = ("a_ptr", "w_ptr", "c_ptr", "K", "stride_am", "stride_wn", "stride_cm")


def signature(a_int8: bool, prog: bool) -> dict:
    return {"a_ptr": "*i8" if a_int8 else "*fp16", "as_ptr": "*fp32" if a_int8 else "*fp16", "w_ptr": "*u8",
            "s_ptr": "*i8" if prog else "*fp16", "z_ptr": "*i8" if prog else "*fp16",
            "r_ptr": "*fp32" if prog else "*fp16", "b_ptr": "*fp16", "c_ptr": "*fp16", "M": "i32", "N": "i32",
            "K": "i32", "stride_am": "i32", "stride_wn": "i32", "stride_cm": "i32", "M_BUCKET": "i32"}


def compile_sm90(fn, sig: dict, consts: dict, warps: int, stages: int, aligned=ALIGNED, source=ASTSource) -> dict:
    sig = {**sig, **{c: "constexpr" for c in consts}}
    src = source(fn, sig, {(fn.arg_names.index(k),): v for k, v in consts.items()},
                 {(fn.arg_names.index(k),): [["tt.divisibility", 16]] for k in aligned})
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        usage = subprocess.run([str(tool), "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    line = next(x for x in usage.splitlines() if "REG:" in x)
    ptx = k.asm["ptx"]
    # The accumulator's register list, then the left operand: a register list (RS) or a descriptor (SS).
    mma = re.findall(r"wgmma\.mma_async\S*\s*\{[^}]*\}\s*,\s*(\S)", ptx)
    return {"regs": int(line.split("REG:")[1].split()[0]), "stack": int(line.split("STACK:")[1].split()[0]),
            "shared_kib": k.metadata.shared // 1024,
            "mma": ("RS" if mma[0] == "{" else "SS") if mma else "none",
            "mma_waits": ptx.count("wgmma.wait_group"), "shared_stores": len(re.findall(r"\bst\.shared", ptx))}


def w4_gemm_rows():
    fn = w4_gemm._w4_gemm_kernel.fn
    for c in w4_gemm._EVERY_CONFIG:
        for name, (a8, prog) in FORMATS.items():
            if (c in w4_gemm._ONE_ACC_CONFIGS and a8 and not prog) or (c.kwargs["SPLIT"] and a8):
                continue
            consts = {"A_INT8": a8, "HAS_ZERO": True, "GROUP_SIZE": 128, "HAS_BIAS": True, "ACT": 0,
                      "SZ_WORD": a8 and not prog, "PROG": prog, **c.kwargs}
            sig = {**signature(a8, prog), "ws_ptr": "*fp32", "cnt_ptr": "*i32"}  # the split-K workspace
            yield c, name, compile_sm90(fn, sig, consts, c.num_warps, c.num_stages)


def gluon_progressive_rows():
    """The Gluon W4A8 GEMM (progressive INT4) at each tile its GPU test covers, with and without a bias."""
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.runtime.jit import mangle_type

    from zeroquant.kernels.gluon import progressive_gemm as P

    fn = P._progressive_gemm_kernel
    for (bn, bt), stages, warps in [((128, 128), 4, 8), ((128, 64), 4, 4), ((256, 64), 4, 8)]:
        weights, tokens = torch.zeros(256, 256, dtype=torch.uint8), torch.zeros(256, 256, dtype=torch.int8)
        w_desc, x_desc = P.descriptors(weights, tokens, (bn, bt))
        sig = {"w_desc": mangle_type(w_desc), "x_desc": mangle_type(x_desc), "s_ptr": "*i8", "z_ptr": "*i8",
               "r_ptr": "*fp32", "xs_ptr": "*fp32", "b_ptr": "*fp16", "c_ptr": "*fp16", "M": "i32", "N": "i32",
               "K": "i32", "stride_cm": "i32"}
        for bias in (True, False):
            consts = {"GROUP_SIZE": 128, "HAS_BIAS": bias, "ACT": 0, "STAGES": stages, "CHUNKS": 2}
            config = triton.Config({"BLOCK_N": bn, "BLOCK_T": bt}, num_warps=warps, num_stages=stages)
            yield config, "w4a8-progressive" + ("" if bias else ", no bias"), compile_sm90(
                fn, sig, consts, warps, 1, aligned=(), source=GluonASTSource)


def tile_gemm_rows():
    fn = tile_gemm._qlinear_kernel.fn.fn
    for name, (a8, prog) in FORMATS.items():
        consts = {"A_INT8": a8, "W_BITS": 4, "HAS_ZERO": True, "GROUP_SIZE": 128, "HAS_BIAS": True, "ACT": 0,
                  "EVEN_K": True, "CH": 64, "BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128, "SZ_WORD": False,
                  "MASK_M": False, "PROG": prog}
        yield triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128}, num_warps=8, num_stages=3), name, \
            compile_sm90(fn, signature(a8, prog), consts, 8, 3)


def unpack_rows():
    fn = unpack._unpack_kernel
    for name, out, prog, scales in (("progressive -> int8", "*i8", True, "*i8"),
                                    ("progressive -> fp16", "*fp16", True, "*i8"),
                                    ("float16 scales -> bf16", "*bf16", False, "*fp16")):
        sig = {"w_ptr": "*u8", "s_ptr": scales, "z_ptr": scales, "r_ptr": "*fp32" if prog else scales, "o_ptr": out,
               "N": "i32", "K": "i32", "stride_wn": "i32", "stride_sg": "i32", "stride_sn": "i32"}
        tile = {"BLOCK_N": unpack.BLOCK_N, "BLOCK_B": unpack.block_bytes(128)}  # as unpack_int4 launches it
        consts = {"GROUP_SIZE": 128, "HAS_ZERO": True, "PROG": prog, "OUT_INT8": out == "*i8", **tile}
        config = triton.Config(tile, num_warps=unpack.NUM_WARPS, num_stages=1)
        yield config, name, compile_sm90(fn, sig, consts, unpack.NUM_WARPS, 1, ("w_ptr", "o_ptr", "K", "stride_wn"))


def gemv_rows():
    fn = w4_gemv._w4_gemv_kernel
    for name, tokens, prog in (("int8 tokens, progressive", "*i8", True), ("fp16, progressive", "*fp16", True),
                               ("bf16, progressive", "*bf16", True), ("int8 tokens, float16 scales", "*i8", False)):
        scales = "*i8" if prog else "*fp16"
        sig = {"a_ptr": tokens, "as_ptr": "*fp32" if tokens == "*i8" else tokens, "w_ptr": "*u8", "s_ptr": scales,
               "z_ptr": scales, "b_ptr": "*fp16", "c_ptr": "*fp16", "ws_ptr": "*fp32", "cnt_ptr": "*i32", "N": "i32",
               "K": "i32", "stride_wn": "i32", "stride_am": "i32", "stride_cm": "i32",
               "rs_ptr": "*fp32" if prog else "*fp16"}
        for n_tokens in (1, 2) if tokens != "*bf16" else (1,):
            consts = {"A_INT8": tokens == "*i8", "HAS_ZERO": True, "GROUP_SIZE": 128, "HAS_BIAS": True, "ACT": 0,
                      "GLU": False, "STEP": 128, "SPLIT": 4, "BLOCK_N": w4_gemv.W4_BLOCK_N, "PDL": False,
                      "SZ_WORD": False, "UNROLL": 1, "TOKENS": n_tokens, "ROW_SCALE": prog}
            config = triton.Config({"TOKENS": n_tokens}, num_warps=4, num_stages=1)
            yield config, name, compile_sm90(fn, sig, consts, 4, 1, ("a_ptr", "w_ptr", "K", "stride_wn"))


def skinny_rows():
    fn = skinny_gemm._w4_skinny_kernel.fn
    for name, tokens, prog in (("int8 tokens, progressive", "*i8", True), ("fp16, progressive", "*fp16", True),
                               ("bf16, progressive", "*bf16", True), ("int8 tokens, float16 scales", "*i8", False)):
        scales = "*i8" if prog else "*fp16"
        sig = {"a_ptr": tokens, "as_ptr": "*fp32" if tokens == "*i8" else tokens, "w_ptr": "*u8", "s_ptr": scales,
               "z_ptr": scales, "b_ptr": "*fp16", "c_ptr": "*fp16", "ws_ptr": "*fp32", "cnt_ptr": "*i32", "M": "i32",
               "N": "i32", "K": "i32", "stride_am": "i32", "stride_wn": "i32", "stride_cm": "i32",
               "rs_ptr": "*fp32" if prog else "*fp16"}
        for rows, warps in ((skinny_gemm.SKINNY_BLOCK_N, 4), (skinny_gemm.SKINNY_SYNC_BLOCK_N, 2)):
            if rows == skinny_gemm.SKINNY_SYNC_BLOCK_N and tokens == "*i8":
                continue  # INT8 tokens always take the warpgroup programs (skinny_tile)
            consts = {"A_INT8": tokens == "*i8", "HAS_ZERO": True, "GROUP_SIZE": 128, "HAS_BIAS": True, "ACT": 0,
                      "SPLIT": 4, "BLOCK_N": rows, "BLOCK_K": 128, "SZ_WORD": False, "ROW_SCALE": prog}
            config = triton.Config({"BLOCK_N": rows, "BLOCK_K": 128}, num_warps=warps, num_stages=3)
            yield config, name, compile_sm90(fn, sig, consts, warps, 3, ("a_ptr", "w_ptr", "K", "stride_wn"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tile-gemm", action="store_true", help="the tile GEMM's INT4 path instead of w4_gemm")
    p.add_argument("--unpack", action="store_true", help="the INT4 unpacking kernel instead of w4_gemm")
    p.add_argument("--gemv", action="store_true", help="the INT4 GEMV instead of w4_gemm")
    p.add_argument("--skinny", action="store_true", help="the small-M INT4 GEMM instead of w4_gemm")
    p.add_argument("--gluon-progressive", action="store_true", help="the Gluon W4A8 GEMM instead of w4_gemm")
    args = p.parse_args()
    print(f"Triton {triton.__version__}, sm_90\n")
    print("| tile (warps, stages) | format | MMA | registers | spilled bytes | shared KiB | MMA waits | st.shared |")
    print("|---|---|---|---|---|---|---|---|")
    rows = (tile_gemm_rows() if args.tile_gemm else unpack_rows() if args.unpack else gemv_rows() if args.gemv
            else skinny_rows() if args.skinny else gluon_progressive_rows() if args.gluon_progressive
            else w4_gemm_rows())
    for c, name, r in rows:
        tile = " x ".join(str(v) for d, v in c.kwargs.items() if d not in ("SPLIT", "SPLIT_K"))
        tile += ", split" if c.kwargs.get("SPLIT") else ""
        tile += f", split-K {c.kwargs['SPLIT_K']}" if c.kwargs.get("SPLIT_K", 1) > 1 else ""
        print(f"| {tile} ({c.num_warps}, {c.num_stages}) | {name} | {r['mma']} | {r['regs']} | {r['stack']} "
              f"| {r['shared_kib']} | {r['mma_waits']} | {r['shared_stores']} |", flush=True)


if __name__ == "__main__":
    main()
