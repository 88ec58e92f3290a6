"""SmoothQuant smoothing (zeroquant.algorithms.smooth): exact folding on every architecture, the alpha search,
and its place in quantize(), checkpoints and the CLI."""

import pytest
import torch
from tiny_models import CAUSAL, ENCODER, model_output, tiny_input, tiny_model

import zeroquant as zq
from zeroquant.algorithms.smooth import choose_alpha, quantized_error, smooth_model, smooth_scales, weight_max
from zeroquant.algorithms.targets import find_targets
from zeroquant.core.config import resolve_config


def calib(n=4):
    return [{"input_ids": tiny_input(4, 16, seed=10 + i)} for i in range(n)]


def with_outliers(model):
    """Give a few channels of every norm a large gain, as trained LLMs have: what smoothing is for."""
    with torch.no_grad():
        for m in model.modules():
            w = getattr(m, "weight", None)
            if w is not None and w.dim() == 1 and "norm" in type(m).__name__.lower():
                w[:3] *= 20
    return model


@pytest.mark.parametrize("arch", [*CAUSAL, *ENCODER])
def test_folding_leaves_the_fp_model_unchanged(arch):
    model = with_outliers(tiny_model(arch))
    rules = {t.name: t.rule for t in find_targets(model, resolve_config("w8a8"))}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = tiny_input()
    ref = model_output(model, ids)
    report = smooth_model(model, rules, calib(), alpha=0.5, progress=False)
    assert report and all(r["alpha"] == 0.5 for r in report)
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed  # scales moved between sources and consumers
    torch.testing.assert_close(model_output(model, ids), ref, rtol=1e-4, atol=1e-5)


def test_weight_only_linears_are_not_smoothed():
    model = tiny_model("llama")
    rules = {t.name: t.rule for t in find_targets(model, resolve_config("w4/8-a16"))}
    assert smooth_model(model, rules, calib(), alpha=0.5, progress=False) == []


def test_search_shrinks_outlier_channels_error():
    """Inputs with two channels 50x the rest: smoothing cuts the quantized output error, and the search never
    returns an alpha worse than leaving the pair alone."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 64, generator=g)
    x[:, :2] *= 50
    ws = [torch.randn(32, 64, generator=g) * 0.05, torch.randn(16, 64, generator=g) * 0.05]
    rules = [resolve_config("w8a8").attention] * 2
    amax = x.abs().amax(0)
    wmax = weight_max(ws)
    alpha = choose_alpha(x, amax, wmax, ws, rules, None)
    assert alpha is not None
    plain = quantized_error(x, ws, rules, None)
    assert quantized_error(x, ws, rules, smooth_scales(amax, wmax, alpha)) < 0.5 * plain
    flat = torch.randn(512, 64, generator=g)  # no outliers: whatever it picks is no worse than nothing
    a = choose_alpha(flat, flat.abs().amax(0), wmax, ws, rules, None)
    s = None if a is None else smooth_scales(flat.abs().amax(0), wmax, a)
    assert quantized_error(flat, ws, rules, s) <= quantized_error(flat, ws, rules, None)


def test_smooth_lowers_w8a8_error_and_is_seeded():
    model = with_outliers(tiny_model("llama"))
    ids = tiny_input()
    ref = model_output(model, ids)
    err = {}
    outs = []
    for preset in ["w8a8", "w8a8+smooth", "w8a8+smooth"]:
        q = zq.quantize(model, preset, calib_data=calib(), progress=False)
        out = model_output(q, ids)
        err[preset] = (out - ref).pow(2).mean().item()
        outs.append(out)
    assert err["w8a8+smooth"] < err["w8a8"]
    assert torch.equal(outs[1], outs[2])
    assert model_output(model, ids).equal(ref)  # the input model is not touched


def test_smooth_then_lkd_trains_a8_blocks():
    model = with_outliers(tiny_model("llama"))
    lkd = zq.LKDConfig(steps=100, holdout=0.0)
    q = zq.quantize(model, "w8a8+smooth", calib_data=calib(8), lkd=lkd, progress=False)
    assert q.zeroquant.smooth and len(q.zeroquant.lkd) == 2
    assert all(r["mse_after"] < 0.9 * r["mse_before"] for r in q.zeroquant.lkd)


@pytest.mark.parametrize("fmt", ["zeroquant", "compressed-tensors"])
def test_smoothed_checkpoint_reloads_identically(tmp_path, fmt):
    if fmt == "compressed-tensors":
        pytest.importorskip("compressed_tensors")
    model = with_outliers(tiny_model("llama"))
    q = zq.quantize(model, "w8a8+smooth0.6", calib_data=calib(), progress=False)
    zq.save_quantized(q, tmp_path / "q", format=fmt)
    back = zq.load_quantized(tmp_path / "q")
    ids = tiny_input()
    assert torch.equal(model_output(back, ids), model_output(q, ids))
    if fmt == "zeroquant":
        assert back.zeroquant.config.smooth == 0.6 and back.zeroquant.config.name == "w8a8+smooth0.6"


def test_config_errors():
    with pytest.raises(zq.ZeroQuantError, match="smoothing needs calib_data"):
        zq.quantize(tiny_model("llama"), "w8a8+smooth", progress=False)
    with pytest.raises(zq.ZeroQuantError, match="alpha in"):
        resolve_config("w8a8+smooth1.5")
    with pytest.raises(zq.ZeroQuantError, match="unknown preset"):
        resolve_config("w8a8+smoothly")
    assert resolve_config("w4/8-a8-g64+gptq+smooth").smooth == "auto"
    with pytest.raises(zq.ZeroQuantError, match=r"\+smooth does nothing for 'w4a16'"):
        resolve_config("w4a16+smooth")  # weight-only: nothing to smooth, so the name must not say it was


def test_cli_smooth_flag(tmp_path, minilm):
    import json

    from zeroquant.tools.cli import main

    _, tok = minilm
    src = tmp_path / "tiny-llama"
    with_outliers(tiny_model("llama")).save_pretrained(src)
    tok.save_pretrained(src)
    assert main(["quantize", str(src), "--preset", "w8a8", "--smooth", "-o", str(tmp_path / "q"),
                 "--device", "cpu", "--lkd-samples", "8", "--lkd-seq-len", "32"]) == 0  # data: self-written
    cfg = json.loads((tmp_path / "q" / "quantization.json").read_text())["config"]
    assert cfg["smooth"] == "auto" and cfg["name"] == "w8a8+smooth"
    with pytest.raises(SystemExit):  # argparse: usage and exit status 2
        main(["quantize", str(src), "--smooth", "two", "-o", str(tmp_path / "r")])


def test_smoothing_builds_no_autograd_graph(monkeypatch):
    """The block outputs carried to the next block hold no graph (a graph kept per block grows memory with depth)."""
    import zeroquant.algorithms.smooth as S

    seen = []
    real = S.call_block

    def spy(*a, **k):
        out = real(*a, **k)
        seen.append(out.requires_grad)
        return out

    monkeypatch.setattr(S, "call_block", spy)
    model = tiny_model("llama")  # its parameters require grad, as a loaded model's do
    rules = {t.name: t.rule for t in find_targets(model, resolve_config("w8a8"))}
    smooth_model(model, rules, calib(), progress=False)
    assert seen and not any(seen)
