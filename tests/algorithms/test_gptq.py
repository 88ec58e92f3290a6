"""GPTQ rounding: exact where it must reduce to round-to-nearest, better where inputs are correlated, and
composable with LKD and checkpoints."""

import pytest
import torch
from tiny_models import model_output, tiny_input, tiny_model

import zeroquant as zq
from zeroquant.algorithms.gptq import InputHessians, gptq_round
from zeroquant.algorithms.lkd import FakeQuantLinear, Start
from zeroquant.core import quant as Q
from zeroquant.core.config import resolve_config

RULES = [zq.WeightQuant(4, 64, False), zq.WeightQuant(4, 128, True), zq.WeightQuant(4, -1, False),
         zq.WeightQuant(8, -1, True), zq.WeightQuant(3, 48, False)]


def _correlated_inputs(k: int, n: int = 2048, seed: int = 0) -> torch.Tensor:
    """Inputs whose channels are strongly correlated and unevenly scaled, as real activations are."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k**0.5 + torch.eye(k)
    return (torch.randn(n, k, generator=g) @ mix) * torch.linspace(0.2, 3.0, k)


@pytest.mark.parametrize("wq", RULES)
def test_identity_hessian_is_round_to_nearest(wq):
    """With uncorrelated unit inputs nothing is worth compensating: GPTQ's integers are RTN's."""
    w = torch.randn(32, 200)
    q, s, z, _ = gptq_round(w, torch.eye(200), wq)
    q0, s0, z0 = Q.quantize_weight(w, wq.bits, wq.group_size, wq.symmetric)
    assert torch.equal(q, q0) and torch.allclose(s, s0) and torch.equal(z, z0)


@pytest.mark.parametrize("wq", RULES)
def test_gptq_beats_round_to_nearest_on_correlated_inputs(wq):
    k = 200  # 3 groups of 64 and a short one of 8; 48 does not divide it either
    x = _correlated_inputs(k)
    w = torch.randn(48, k) / k**0.5
    h = 2 * x.t() @ x / x.shape[0]
    gs = Q.group_len(k, wq.group_size)
    err = {}
    for name, (q, s, z) in {"gptq": gptq_round(w, h, wq)[:3],
                            "rtn": Q.quantize_weight(w, wq.bits, wq.group_size, wq.symmetric)}.items():
        qmin, qmax = Q.qrange(wq.bits, wq.symmetric)
        assert int(q.min()) >= qmin and int(q.max()) <= qmax
        err[name] = ((x @ (Q.dequantize_weight(q, s, z, gs) - w).t()) ** 2).mean().item()
    assert err["gptq"] < 0.8 * err["rtn"], err


def test_input_hessians_match_explicit_sum():
    lin = torch.nn.Linear(16, 4)
    xs = [torch.randn(3, 5, 16), torch.randn(7, 16)]
    with InputHessians({"l": lin}) as hs:
        for x in xs:
            lin(x)
    flat = torch.cat([x.reshape(-1, 16) for x in xs])
    assert torch.allclose(hs.take("l"), 2 * flat.t() @ flat / 22, atol=1e-5)
    lin(torch.randn(2, 16))  # hooks are gone after the block
    assert hs.rows["l"] == 22


def test_modules_on_one_input_share_a_sum_until_each_took_its_hessian():
    """A Llama block's q/k/v and gate/up read the same tensor: 4 float64 sums for 7 linears, each Hessian
    equal to what a module of its own would get, and every sum freed once its last user took it."""
    from tiny_models import tiny_input, tiny_model

    model = tiny_model("llama")
    block = model.model.layers[0]
    names = [n for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)]
    with InputHessians({n: block.get_submodule(n) for n in names}) as hs:
        for seed in (1, 2):
            model(tiny_input(2, 16, seed=seed))
    assert len(hs.sums) == 4 and hs.owner["self_attn.k_proj"] == hs.owner["self_attn.q_proj"]
    with InputHessians({"self_attn.k_proj": block.self_attn.k_proj}) as alone:
        for seed in (1, 2):
            model(tiny_input(2, 16, seed=seed))
    want = alone.take("self_attn.k_proj")
    assert torch.equal(hs.take("self_attn.q_proj"), want) and "self_attn.q_proj" in hs.owner.values()
    assert torch.equal(hs.take("self_attn.k_proj"), want)
    hs.take("self_attn.v_proj")
    assert len(hs.sums) == 3 and not alone.sums


def test_input_hessians_skip_padding():
    lin = torch.nn.Linear(8, 2)
    x, mask = torch.randn(2, 3, 8), torch.tensor([[1, 1, 0], [1, 0, 0]])
    with InputHessians({"l": lin}) as hs:
        hs.only(mask)
        lin(x)
    real = x.reshape(-1, 8)[mask.reshape(-1).bool()]
    assert hs.rows["l"] == 3 and torch.allclose(hs.take("l"), 2 * real.t() @ real / 3)


def test_fake_quant_linear_starts_from_gptqs_integers():
    """Distillation's master weights start as GPTQ's compensated weights, which round to GPTQ's integers."""
    lin = torch.nn.Linear(96, 8)
    rule = zq.LinearRule(zq.WeightQuant(4, 64, False), None, rounding="gptq")
    x = _correlated_inputs(96, 256)
    init = gptq_round(lin.weight, 2 * x.t() @ x / 256, rule.weight)
    for train in ("rounding", "weights"):
        fq = FakeQuantLinear(lin, rule, start=Start(init.weight, init.scale, init.zero), train=train)
        assert torch.equal(fq.weight.detach(), init.weight) and not torch.equal(init.weight, lin.weight.detach())
        ql = fq.to_quant_linear()
        assert torch.equal(ql.quantized.ints(), init.q) and torch.equal(ql.w_scale.float(), init.scale)
        assert torch.equal(ql.w_zero, init.zero)


def test_quantize_with_gptq_needs_data_and_beats_rtn_on_a_model(tmp_path):
    model = tiny_model("llama")
    calib = tiny_input(8, 32, seed=3)
    with pytest.raises(zq.ZeroQuantError, match="GPTQ rounding needs calib_data"):
        zq.quantize(model, "w4a16+gptq")
    cfg = resolve_config("w4a16-g64+gptq")
    assert cfg.name == "w4a16-g64+gptq" and cfg.mlp.rounding == "gptq" and cfg.uses_gptq
    ids = tiny_input(4, 32, seed=4)
    ref = model_output(model, ids)
    errs = {}
    for preset in ("w4a16-g64", "w4a16-g64+gptq"):
        q = zq.quantize(model, preset, calib_data=calib, progress=False)
        errs[preset] = ((model_output(q, ids) - ref) ** 2).mean().item()
    assert errs["w4a16-g64+gptq"] < errs["w4a16-g64"], errs
    loaded = zq.load_quantized(zq.save_quantized(q, tmp_path / "g"))
    assert loaded.zeroquant.config == cfg
    assert torch.equal(model_output(loaded, ids), model_output(q, ids))


def test_gptq_then_lkd_is_seeded_and_no_worse_than_gptq():
    model = tiny_model("opt")
    calib = tiny_input(8, 32, seed=3)
    lkd = zq.LKDConfig(steps=30, device="cpu")
    a = zq.quantize(model, "w4a8+gptq", calib_data=calib, lkd=lkd, progress=False)
    b = zq.quantize(model, "w4a8+gptq", calib_data=calib, lkd=lkd, progress=False)
    ids = tiny_input(2, 32, seed=9)
    assert torch.equal(model_output(a, ids), model_output(b, ids))
    assert all(r["mse_after"] <= r["mse_before"] for r in a.zeroquant.lkd)


def test_gptq_runs_blocks_without_autograd(monkeypatch):
    """Each block's outputs feed the next: with autograd on, every block's graph would stay alive (memory
    grew by hundreds of MB a second on SmolLM2 when it was)."""
    import zeroquant.algorithms.blockwise as B

    seen = []
    real = B.call_block

    def spy(*a, **k):
        seen.append(torch.is_grad_enabled())
        return real(*a, **k)

    monkeypatch.setattr(B, "call_block", spy)
    zq.quantize(tiny_model("llama"), "w4a16+gptq", calib_data=tiny_input(4, 16, seed=3), progress=False)
    assert seen and not any(seen)


def test_hessian_sums_of_one_input_width_at_a_time(monkeypatch):
    """GPTQ takes a block's input sums one input width at a time, widest first (a Llama block: the down
    projection alone, then the six linears that read the hidden size), so the widest sum never shares memory
    with the others."""
    from zeroquant.algorithms import gptq

    passes = []

    class Recording(gptq.InputHessians):
        def __enter__(self):
            passes.append(sorted(self.modules))
            return super().__enter__()

    monkeypatch.setattr(gptq, "InputHessians", Recording)
    model = tiny_model("llama")
    zq.quantize(model, "w4a16+gptq", calib_data=[tiny_input(2, 16, seed=s) for s in (1, 2)], progress=False)
    others = sorted(["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "mlp.gate_proj", "mlp.up_proj"])
    assert passes == [["mlp.down_proj"], others] * 2
