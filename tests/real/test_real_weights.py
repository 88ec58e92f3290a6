"""Error claims on the real all-MiniLM-L6-v2 weights and activations."""

import torch

from zeroquant.algorithms.calib import tokenize_texts
from zeroquant.core import quant as Q
from zeroquant.tools.evaluate import sentences


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_groupwise_int4_beats_per_row_on_real_weight(minilm):
    model, _ = minilm
    w = model.encoder.layer[0].intermediate.dense.weight.detach()  # [1536, 384]
    errs = {}
    for name, g in (("per-row", -1), ("g128", 128), ("g64", 64), ("g32", 32)):
        q, s, z = Q.quantize_weight(w, 4, g, symmetric=True)
        errs[name] = _rel(Q.dequantize_weight(q, s, z, g), w)
    print("INT4 weight rel. error on layer0 intermediate.dense:", errs)
    assert errs["g128"] < errs["per-row"]
    assert errs["g32"] < errs["g64"] < errs["g128"]


def _inputs_of(model, module, batches):
    got = []
    h = module.register_forward_pre_hook(lambda _m, a: got.append(a[0].detach().reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        for b in batches:
            model(**b)
    h.remove()
    return torch.cat(got)


def test_tokenwise_a8_beats_static_per_tensor_on_real_activations(minilm, wiki_valid, wiki_test):
    model, tok = minilm
    lin = model.encoder.layer[3].output.dense  # FFN2 input: post-GELU, tokens with large outliers
    calib = _inputs_of(model, lin, tokenize_texts(sentences(wiki_valid, 64), tok, 128, 32))
    x = _inputs_of(model, lin, tokenize_texts(sentences(wiki_test, 64), tok, 128, 32))
    amax = x.abs().amax(-1)
    assert amax.max() > 4 * amax.median(), "expected outlier tokens"
    s, z = Q.scale_zero_from_range(calib.min(), calib.max(), 8, symmetric=False)
    static = Q.dequantize(Q.quantize(x, s, z, 8, False), s, z)
    qt, st = Q.quantize_per_token(x)
    token = qt.float() * st
    e_static, e_token = _rel(static, x), _rel(token, x)
    print(f"A8 rel. error: static per-tensor {e_static:.4f}, token-wise {e_token:.4f}")
    assert e_token < 0.7 * e_static
