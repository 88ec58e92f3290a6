"""GPU: the row kernels (token-wise quantization, norm -> quant, activation -> quant, GELU) against their
reference twins on fresh random inputs.

Outputs are allocated from memory poisoned with 0xFF bytes (NaN in fp16/fp32), so an element the kernel
fails to write shows up as NaN or a wrong integer; NaN never passes the checks.
"""

import pytest
import torch
from kernel_cases import poison_cuda_cache, rel_err

from zeroquant.kernels import reference as R

pytestmark = pytest.mark.gpu

MS = [1, 7, 16, 33, 128, 2048]


def assert_quant_close(q, s, q_ref, s_ref):
    assert rel_err(s, s_ref) < 1e-3
    diff = (q.int() - q_ref.int()).abs()
    # Norm/act outputs computed in a different float order may land on the other side of a rounding tie.
    assert diff.max() <= 1 and diff.float().mean() < 1e-3

@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("k", [200, 768, 4096, 11008])
def test_quantize_per_token(m, k):
    from zeroquant.kernels.triton import rowwise

    x = torch.randn(m, k, device="cuda", dtype=torch.float16) * 3
    poison_cuda_cache()
    q, s = rowwise.quantize_per_token(x)
    assert_quant_close(q, s, *R.quantize_per_token(x))

@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("k", [200, 768, 4096])
@pytest.mark.parametrize("kind", ["layernorm", "rmsnorm"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("residual", [False, True])
def test_norm_quant(m, k, kind, dtype, residual):
    from zeroquant.kernels.triton import rowwise

    x = (torch.randn(m, k, device="cuda") * 2 + 0.5).to(dtype)
    w = (torch.rand(k, device="cuda") + 0.5).to(dtype)
    b = torch.randn(k, device="cuda").to(dtype) if kind == "layernorm" else None
    r = (torch.randn(m, k, device="cuda") * 3).to(dtype) if residual else None
    poison_cuda_cache()
    y, q, s = rowwise.norm_quant(x, w, b, 1e-5, kind, residual=r)
    y_ref, q_ref, s_ref = R.norm_quant(x, w, b, 1e-5, kind, residual=r)
    assert rel_err(y, y_ref) < 5e-3
    assert_quant_close(q, s, q_ref, s_ref)
    if not residual:
        q2, s2 = rowwise.norm_quant_only(x, w, b, 1e-5, kind)
        assert torch.equal(q2, q) and torch.equal(s2, s)

@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("act", ["gelu", "gelu_tanh", "relu", "silu"])
@pytest.mark.parametrize("gated", [False, True])
def test_act_quant(m, act, gated):
    from zeroquant.kernels.triton import rowwise

    x = torch.randn(m, 3072, device="cuda", dtype=torch.float16) * 2
    g = torch.randn_like(x) if gated else None
    poison_cuda_cache()
    q, s = rowwise.act_quant(x, act, gate=g)
    assert_quant_close(q, s, *R.act_quant(x, act, gate=g))

def test_quantize_per_token_edge_rows():
    """Rows whose every element is the absmax (each divides to exactly +-127), all-zero rows (the scale floor)
    and rows far below it: no clamp is applied in the kernel, so +-127 must come out of the rounding itself."""
    from zeroquant.kernels.triton import rowwise

    x = torch.randn(6, 4096, device="cuda", dtype=torch.float16)
    x[0] = 3.0
    x[1] = -0.007
    x[2, ::2], x[2, 1::2] = 65504.0, -65504.0
    x[3] = 0.0
    x[4] *= 1e-7
    poison_cuda_cache()
    q, s = rowwise.quantize_per_token(x)
    q_ref, s_ref = R.quantize_per_token(x)
    # torch on CUDA divides by a scalar as a multiply by its reciprocal: the scales may differ by an ulp.
    assert torch.equal(q, q_ref) and rel_err(s, s_ref) < 1e-6
    assert q[0].eq(127).all() and q[1].eq(-127).all() and q[3].eq(0).all()

def test_gelu_erf_accuracy():
    """The kernels' GELU (A&S 7.1.26 on the normal CDF) against float64 erf GELU over [-12, 12]."""
    import triton
    import triton.language as tl

    from zeroquant.kernels.triton.rowwise import gelu_erf

    @triton.jit
    def gelu_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(y_ptr + offs, gelu_erf(tl.load(x_ptr + offs, mask=offs < n)), mask=offs < n)

    x = torch.linspace(-12, 12, 1_000_001, device="cuda")
    y = torch.empty_like(x)
    gelu_kernel[(triton.cdiv(x.numel(), 1024),)](x, y, x.numel(), BLOCK=1024)
    want = torch.nn.functional.gelu(x.double())
    # |y| * (error in Phi), Phi to ~3e-7 absolute; float32 rounding of 1 - h adds 6e-8.
    assert ((y.double() - want).abs() / x.double().abs().clamp(min=1)).max() < 5e-7
