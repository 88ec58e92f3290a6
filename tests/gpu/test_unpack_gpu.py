"""GPU: INT4 weights unpacked whole (kernels/triton/unpack.py) bit for bit against the twin, and gemm.quant_linear's
unpack-first path for many tokens against the reference."""

import pytest
import torch
from kernel_cases import poison_cuda_cache, quant_linear, rel_err

from zeroquant.kernels import reference as R

pytestmark = pytest.mark.gpu

# (group, symmetric, progressive, dtype)
FORMATS = [(128, False, True, torch.int8), (128, False, True, torch.float16), (128, False, True, torch.bfloat16),
           (64, False, True, torch.int8), (128, False, False, torch.float16), (128, False, False, torch.bfloat16),
           (-1, True, False, torch.float16)]


def _skip_without_cuda():
    if not torch.cuda.is_available():
        pytest.skip("CUDA kernel")


@pytest.mark.parametrize("group,sym,prog,dtype", FORMATS)
@pytest.mark.parametrize("k,n", [(576, 1000), (4096, 11008)])
def test_unpack_matches_its_twin_bit_for_bit(k, n, group, sym, prog, dtype):
    _skip_without_cuda()
    from zeroquant.kernels.triton.unpack import unpack_int4

    ql = quant_linear(k, n, 4, group, sym, False, "cuda", scale_dtype="int8" if prog else "float16")
    want = R.unpacked_weight(ql.qweight, ql.w_scale, ql.w_zero, ql.group_size, dtype, ql.w_row_scale)
    poison_cuda_cache()
    got = unpack_int4(ql.quantized.kernel(), dtype)
    bits = torch.uint8 if dtype == torch.int8 else torch.int16
    assert torch.equal(got.view(bits), want.view(bits))


@pytest.mark.parametrize("tokens,prog", [("int8", True), ("int8", False), ("fp16", False), ("bf16", False),
                                         ("fp16", True)])
@pytest.mark.parametrize("m", [256, 1000 + 1024, 4096])
@pytest.mark.parametrize("k", [576, 1024])
def test_quant_linear_unpacks_first_for_many_tokens(m, k, tokens, prog):
    """From gemm.UNPACK_TOKENS on: progressive weights against INT8 tokens through the W8A8 GEMMs, everything else
    through cuBLAS (INT8 tokens dequantized first), each equal to the reference; K 576 ends on a short group."""
    _skip_without_cuda()
    from zeroquant.kernels.triton import gemm, rowwise

    assert m >= gemm.UNPACK_TOKENS
    n = 1536
    a8 = tokens == "int8"
    ql = quant_linear(k, n, 4, 128, False, a8, "cuda", scale_dtype="int8" if prog else "float16")
    dtype = torch.bfloat16 if tokens == "bf16" else torch.float16
    ql = ql.to(dtype)
    kw = ql.quantized.kernel()
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    if a8:
        q, s = rowwise.quantize_per_token(x)
        want = R.quant_linear(q, s, ql.qweight, ql.w_scale, ql.w_zero, 4, ql.group_size, ql.bias, "silu",
                              row_scale=ql.w_row_scale)
        got = gemm.quant_linear(q, s, kw, ql.bias, "silu")
    else:
        want = R.quant_linear(x, None, ql.qweight, ql.w_scale, ql.w_zero, 4, ql.group_size, ql.bias, "silu", dtype,
                              row_scale=ql.w_row_scale)
        got = gemm.quant_linear(x, None, kw, ql.bias, "silu")
    assert got.dtype == want.dtype
    # INT8 tokens with float scales meet 16-bit weights and tokens: each rounded to float16 once; bf16 keeps 8
    # mantissa bits, so two bf16 results a rounding apart differ by more than 3e-3 in norm
    assert rel_err(got, want) < (5e-3 if tokens == "bf16" else 3e-3 if a8 and not prog else 1e-3)
