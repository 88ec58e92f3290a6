import math

import pytest
import torch
import transformers as T
from tiny_models import CONFIGS, tiny_model

import zeroquant as zq
from zeroquant.tools.evaluate import EvalSettings, cosine_stats, format_table, mlm_loss, perplexity, sentences
from zeroquant.tools.report import report

TEXT = " ".join(f"the quick brown fox number {i} jumps over the lazy dog ." for i in range(200))


def test_sentences_skip_headings_and_short():
    text = " = Title = \n\n First sentence has words . Short . Second one has more words \n"
    assert sentences(text) == ["First sentence has words .", "Second one has more words ."]


def test_perplexity_counts_tokens(minilm):
    _, tok = minilm
    model = tiny_model("gpt2")
    r = perplexity(model, tok, TEXT, seq_len=64, progress=False)
    n_ids = len(tok(TEXT)["input_ids"])
    assert r["tokens"] == (n_ids // 64) * 63
    assert math.isfinite(r["ppl"]) and r["ppl"] > 1
    # random 30k-vocab model: perplexity near the vocabulary size
    assert 0.3 * 30522 < r["ppl"] < 3 * 30522


def test_report_causal_lm(minilm):
    _, tok = minilm
    model = tiny_model("llama")
    rows = report(model, tok, TEXT, ["w8a8", "rtn-w4"], settings=EvalSettings(seq_len=64, progress=False))
    assert [r["scheme"] for r in rows] == ["float32", "w8a8", "rtn-w4"]
    assert rows[0]["ppl"] == perplexity(model, tok, TEXT, seq_len=64, progress=False)["ppl"]  # the FP model's own
    assert rows[1]["ppl"] != rows[0]["ppl"] and abs(rows[1]["ppl_vs_fp"] - 1) < 0.01  # quantized, and close
    assert rows[2]["ppl_vs_fp"] == rows[2]["ppl"] / rows[0]["ppl"]
    assert rows[1]["weights_mb"] < rows[0]["weights_mb"]


def test_report_checks_every_preset_first(minilm, monkeypatch):
    """A preset that cannot quantize the model fails before the FP row is evaluated."""
    _, tok = minilm
    model = tiny_model("gpt2")
    model.transformer.h[0].mlp.c_proj = type(model.transformer.h[0].mlp.c_proj)(64, 127)  # odd input size
    evaluated = []
    monkeypatch.setattr("zeroquant.tools.report.evaluate_model", lambda *a, **k: evaluated.append(1) or {})
    with pytest.raises(zq.ZeroQuantError, match="INT4 packing needs an even input size"):
        report(model, tok, TEXT, ["w8a8", "w4a16"], settings=EvalSettings(seq_len=64, progress=False))
    assert not evaluated


def test_report_keeps_a_failed_rows_error(minilm, monkeypatch):
    _, tok = minilm
    real = zq.api.quantize

    def flaky(model, cfg, **kw):
        if cfg.name == "w4a16":
            raise RuntimeError("CUDA out of memory\nmore detail")
        return real(model, cfg, **kw)

    monkeypatch.setattr("zeroquant.tools.report.quantize", flaky)
    rows = report(tiny_model("llama"), tok, TEXT, ["w4a16", "w8a8"], settings=EvalSettings(seq_len=64, progress=False))
    assert [r["scheme"] for r in rows] == ["float32", "w4a16", "w8a8"]
    assert rows[1]["error"] == "RuntimeError: CUDA out of memory" and "ppl" not in rows[1]
    assert "ppl" in rows[2] and "error" not in rows[2]
    assert "CUDA out of memory" in format_table(rows)


def test_mlm_loss_on_tiny_masked_lm(minilm):
    _, tok = minilm
    model = T.BertForMaskedLM(CONFIGS["bert"]()).eval()
    sents = sentences(TEXT, 40)
    loss = mlm_loss(model, tok, sents, progress=False)
    assert loss == mlm_loss(model, tok, sents, progress=False)  # seeded mask
    assert abs(loss - math.log(30522)) < 1.0
    rows = report(model, tok, TEXT, ["w8a8"], settings=EvalSettings(max_sentences=40, progress=False))
    assert "mlm_loss" in rows[1] and abs(rows[1]["mlm_loss"] - rows[0]["mlm_loss"]) < 0.05


def test_cosine_stats():
    a = torch.randn(10, 8)
    s = cosine_stats(a, a)
    assert s["cos_mean"] == pytest.approx(1.0) and s["n"] == 10


@pytest.mark.slow
def test_minilm_fidelity_shape(minilm, wiki_test, wiki_valid):
    """The README's claim on a CI-sized sample: w8a8 >= 0.99 cosine, baselines clearly worse."""
    model, tok = minilm
    calib = sentences(wiki_valid, 128)
    rows = report(model, tok, wiki_test, ["w8a8", "w8a8-static", "rtn-w4"], calib,
                  EvalSettings(max_sentences=200, progress=False))
    cos = {r["scheme"]: r["cos_mean"] for r in rows}
    print(cos)
    assert cos["w8a8"] >= 0.99
    assert cos["w8a8-static"] < cos["w8a8"] - 0.02
    assert cos["rtn-w4"] < cos["w8a8"] - 0.02
    assert zq.PRESETS["w8a8"].mlp.act.dynamic


def test_verdict_lines_say_size_and_accuracy_cost():
    from zeroquant.tools.report import verdict

    ref = {"scheme": "float32", "weights_mb": 500.0, "ppl": 20.0}
    assert verdict({"scheme": "w8a8", "weights_mb": 200.0, "ppl": 20.1}, ref) == (
        "w8a8: 2.5x smaller weights, perplexity 20.10 vs 20.00 (+0.5%, close to float32)")
    assert "worse than float32" in verdict({"scheme": "w4", "weights_mb": 100.0, "ppl": 25.0}, ref)
    enc = {"scheme": "float32", "weights_mb": 90.0, "cos_mean": 1.0}
    assert verdict({"scheme": "w8a8", "weights_mb": 60.0, "cos_mean": 0.95}, enc).endswith("(noticeably off)")
    assert verdict({"scheme": "x", "error": "ValueError: no"}, ref) == "x: failed (ValueError: no)"
