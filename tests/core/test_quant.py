import pytest
import torch

from zeroquant.core import quant as Q


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("symmetric", [True, False])
def test_roundtrip_error_within_half_step(bits, symmetric):
    w = torch.randn(64, 256)
    q, s, z = Q.quantize_weight(w, bits, 64, symmetric)
    qmin, qmax = Q.qrange(bits, symmetric)
    assert q.shape == w.shape and s.shape == (64, 4) and z.shape == (64, 4)
    assert int(q.min()) >= qmin and int(q.max()) <= qmax
    err = (Q.dequantize_weight(q, s, z, 64) - w).abs()
    bound = Q.expand_groups(s, 256, 64) / 2 + 1e-6
    assert bool((err <= bound).all())


def test_error_shrinks_with_bits():
    w = torch.randn(128, 512)
    errs = []
    for bits in range(2, 9):
        q, s, z = Q.quantize_weight(w, bits, 128, True)
        errs.append(((Q.dequantize_weight(q, s, z, 128) - w).norm() / w.norm()).item())
    assert all(a > b for a, b in zip(errs, errs[1:], strict=False))
    assert errs[-1] < 0.01  # INT8 group-wise on Gaussian weights: well under 1%
    assert errs[2] < 0.12  # INT4


def test_per_row_and_per_tensor_shapes():
    w = torch.randn(16, 64)
    _, s, _ = Q.quantize_weight(w, 8, -1, True)
    assert s.shape == (16, 1)
    _, s, _ = Q.quantize_weight(w, 8, -1, True, per_tensor=True)
    assert s.shape == (16, 1) and torch.equal(s, s[:1].expand(16, 1))


@pytest.mark.parametrize("k,group", [(576, 128), (172, 64), (96, 64), (1536, 128)])
def test_short_last_group_is_its_own_group(k, group):
    """A group size that does not divide K gives full groups and one shorter last group, each with the range
    of exactly its own channels."""
    w = torch.randn(6, k)
    w[:, -1] = 50.0  # an outlier in the last channel must only widen the last group's scale
    q, s, z = Q.quantize_weight(w, 4, group, False)
    groups = -(-k // group)
    assert s.shape == (6, groups) and z.shape == (6, groups)
    last = slice((groups - 1) * group, k)
    _, s_last, _ = Q.quantize_weight(w[:, last], 4, -1, False)
    assert torch.equal(s[:, -1:], s_last)
    _, s_first, _ = Q.quantize_weight(w[:, :group], 4, -1, False)
    assert torch.equal(s[:, :1], s_first) and bool((s[:, :1] < s[:, -1:]).all())
    err = (Q.dequantize_weight(q, s, z, group) - w).abs()
    assert bool((err <= Q.expand_groups(s, k, group) / 2 + 1e-5).all())
    sizes = [sl.stop - sl.start for sl in Q.group_slices(k, group, groups)]
    assert sizes == [group] * (groups - 1) + [k - (groups - 1) * group]


def test_asymmetric_keeps_zero_exact():
    w = torch.rand(8, 32) + 0.5  # all positive: the range is extended to contain 0
    w[:, 0] = 0
    q, s, z = Q.quantize_weight(w, 4, 32, False)
    assert torch.equal(Q.dequantize_weight(q, s, z, 32)[:, 0], torch.zeros(8))


@pytest.mark.parametrize("symmetric", [True, False])
def test_int4_pack_roundtrip(symmetric):
    qmin, qmax = Q.qrange(4, symmetric)
    q = torch.randint(qmin, qmax + 1, (8, 100)).to(Q.storage_dtype(4, symmetric))
    p = Q.pack_int4(q, symmetric)
    assert p.dtype == torch.uint8 and p.shape == (8, 50)
    assert torch.equal(Q.unpack_int4(p, symmetric), q)
    # documented order: half-split chunks of 64 channels (byte j = channel j | channel j + 32), then the
    # 36 channels left form one chunk (byte 32 + j = channel 64 + j | channel 82 + j)
    off = 8 if symmetric else 0
    nib = lambda i: int(q[0, i]) + off
    assert int(p[0, 0]) == nib(0) | (nib(32) << 4)
    assert int(p[0, 31]) == nib(31) | (nib(63) << 4)
    assert int(p[0, 32]) == nib(64) | (nib(82) << 4)
    assert int(p[0, 49]) == nib(81) | (nib(99) << 4)


def test_ste_gradient_is_identity_inside_and_zero_outside():
    scale = torch.tensor(0.1)
    x = torch.tensor([-20.0, -0.33, 0.0, 0.26, 20.0], requires_grad=True)
    y = Q.fake_quantize(x, scale, torch.tensor(0.0), 8, True)
    y.sum().backward()
    assert torch.allclose(y.detach()[1:4], torch.tensor([-0.3, 0.0, 0.3]))
    assert torch.equal(x.grad, torch.tensor([0.0, 1.0, 1.0, 1.0, 0.0]))


def test_ste_scale_gets_gradient():
    scale = torch.tensor(0.1, requires_grad=True)
    x = torch.randn(100)
    Q.fake_quantize(x, scale, torch.tensor(0.0), 4, True).pow(2).sum().backward()
    assert scale.grad is not None and scale.grad.abs().item() > 0


def test_per_token_quant_bound():
    x = torch.randn(3, 5, 64) * torch.logspace(-2, 2, 5).view(1, 5, 1)
    q, s = Q.quantize_per_token(x)
    assert q.dtype == torch.int8 and s.shape == (3, 5, 1)
    assert bool(((q.float() * s - x).abs() <= s / 2 + 1e-6).all())
    assert torch.allclose(Q.fake_quantize_per_token(x), q.float() * s, atol=1e-6)


def test_int_matmul_exact():
    a = torch.randint(-127, 128, (33, 96), dtype=torch.int8)
    b = torch.randint(-127, 128, (40, 96), dtype=torch.int8)
    ref = a.long() @ b.long().t()
    assert torch.equal(Q.int_matmul(a, b).long(), ref)
    a16 = a.to(torch.int16) - 100
    assert torch.equal(Q.int_matmul(a16, b).long(), a16.long() @ b.long().t())


@pytest.mark.parametrize("k,group", [(256, 128), (576, 128), (192, 64), (128, -1)])
def test_progressive_scales_give_int8_weights(k, group):
    """s2 * (q - z) is an INT8 weight for every q in 0..15, even in heavy-tailed rows; the group scale
    s1 * s2 is exact; the weight error is below what the smallest covering s2 (no clipping) gives."""
    w = torch.distributions.StudentT(2.0).sample((48, k)) * 0.02
    w[3, 5] = 40.0  # one outlier row
    w[7] = 0.0  # an all-zero row
    scale, zero, s1, s2 = Q.progressive_scale_zero(w, group)
    assert torch.equal(s1, s1.half().float()) and torch.equal(scale, s1 * s2)
    assert torch.equal(s2, s2.round()) and s2.min() >= 1 and s2.max() <= 127
    assert s2.max() <= 16 and (s2 * zero).max() <= 128 and (s2 * (15 - zero)).max() <= 127  # every level in int8
    q = Q.quantize(w, Q.expand_groups(scale, k, group), Q.expand_groups(zero, k, group), 4, False)
    err = (Q.dequantize_weight(q, scale, zero, group) - w).norm()
    # the no-clipping choice: the largest s2 of each group's candidates (s2 never exceeds the covering one)
    g = s2.shape[1]
    wg = w / s1
    hi = torch.stack([wg[:, sl].amax(1).clamp_min(0) for sl in Q.group_slices(k, group, g)], 1)
    lo = torch.stack([wg[:, sl].amin(1).clamp_max(0) for sl in Q.group_slices(k, group, g)], 1)
    cover = ((hi - lo) / 15).ceil().clamp(1, 16)
    zc = (-lo / cover).round().clamp(0, 15)
    qc = Q.quantize(w, Q.expand_groups(s1 * cover, k, group), Q.expand_groups(zc, k, group), 4, False)
    assert err <= (Q.dequantize_weight(qc, s1 * cover, zc, group) - w).norm()
    assert (s2 <= cover).all() and (s2 < cover).any()
