import json

import pytest
import torch
import torch.nn.functional as F
import transformers as T
from tiny_models import CONFIGS, tiny_input, tiny_model

import zeroquant as zq
from zeroquant.algorithms.lkd import FakeQuantLinear

FAST = dict(steps=60, holdout=0.0)  # tiny random models: judge on the training batches


def _lkd(model, preset="w4a8", seed=0, **kw):
    cfg = zq.LKDConfig(**{**FAST, "seed": seed, **kw})
    return zq.quantize(model, preset, calib_data=tiny_input(8, 32, seed=3), calib_batch_size=4, lkd=cfg,
                       progress=False)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert", "opt"])
def test_lkd_lowers_every_block_mse(arch):
    q = _lkd(tiny_model(arch))
    table = q.zeroquant.lkd
    assert len(table) == 2
    for row in table:
        assert row["mse_after"] < 0.8 * row["mse_before"], row


def test_lkd_improves_model_output_and_keeps_input_model():
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = tiny_input(4, 32, seed=9)
    with torch.no_grad():
        ref = model(ids).logits
        rtn = zq.quantize(model, "w4a8", progress=False)(ids).logits
        lkd = _lkd(model)(ids).logits
    assert F.mse_loss(lkd, ref) < F.mse_loss(rtn, ref)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not zq.quantized_modules(model)


def test_lkd_deterministic_with_seed():
    a = _lkd(tiny_model("gpt2"), seed=1).state_dict()
    b = _lkd(tiny_model("gpt2"), seed=1).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_frozen_linear_computes_what_training_computed_last():
    """After sign steps that move offsets and clipping, the frozen QuantLinear holds exactly the integers,
    scales and zero points of the last training forward, and its fake-quant output is the same bitwise."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(192, 16)
    rule = zq.LinearRule(zq.WeightQuant(4, 64, False, scale_dtype="float16"), zq.ActQuant(8))
    fq = FakeQuantLinear(lin, rule, train="all")
    x = torch.randn(4, 192)
    for _ in range(5):
        loss = fq(x).square().mean()
        fq.zero_grad()
        loss.backward()
        with torch.no_grad():
            for p in fq.sign_params():
                p.add_(p.grad.sign(), alpha=-0.2)
            fq.weight.add_(fq.weight.grad.sign(), alpha=-1e-3)
        fq.project()
    with torch.no_grad():
        q, s, z = fq.quantized()
        y = fq(x)
    assert fq.offset.abs().max() <= 0.5 and 0.5 <= fq.clip_lo.min() <= fq.clip_hi.max() <= 1.0
    assert not torch.equal(fq.clip_hi, torch.ones_like(fq.clip_hi))  # clipping moved
    ql = fq.to_quant_linear()
    ql.mode = "fake"
    assert torch.equal(ql.quantized.ints().float(), q) and torch.equal(ql.w_scale.float(), s)
    assert torch.equal(ql.w_zero.float(), z)
    with torch.no_grad():
        assert torch.equal(ql(x), y)


def test_rounding_start_is_round_to_nearest():
    lin = torch.nn.Linear(96, 8)
    for preset in ("w4a16", "w8a8", "w8a8-static"):
        rule = zq.PRESETS[preset].mlp
        rtn = zq.QuantLinear.from_float(lin, rule, (torch.tensor(-1.0), torch.tensor(1.0)))
        ql = FakeQuantLinear(lin, rule, (torch.tensor(-1.0), torch.tensor(1.0))).to_quant_linear()
        assert torch.equal(ql.qweight, rtn.qweight) and torch.equal(ql.w_scale, rtn.w_scale), preset


def test_input_streams():
    """The first block reads the model's own embeddings in every mode; from the second on, "quantized" reads
    the quantized blocks' outputs, so it trains (and ends) differently from the paper's "fp" inputs."""
    model = tiny_model("llama")
    runs = {m: _lkd(model, "w4a16", inputs=m) for m in ("fp", "quantized", "mixed")}
    q = {m: zq.quantized_modules(r) for m, r in runs.items()}
    first = [n for n in q["fp"] if ".layers.0." in n]
    second = [n for n in q["fp"] if ".layers.1." in n]
    assert all(torch.equal(q["fp"][n].qweight, q["quantized"][n].qweight) for n in first)
    assert any(not torch.equal(q["fp"][n].qweight, q["quantized"][n].qweight) for n in second)
    assert any(not torch.equal(q["mixed"][n].qweight, q["quantized"][n].qweight) for n in first + second)
    again = zq.quantized_modules(_lkd(model, "w4a16", inputs="mixed"))
    assert all(torch.equal(again[n].qweight, q["mixed"][n].qweight) for n in again)


def test_best_iterate_is_judged_on_held_apart_batches():
    from zeroquant.algorithms.lkd import _split

    assert _split(16, 0.125) == (list(range(14)), [14, 15])
    assert _split(2, 0.125) == ([0], [1])
    assert _split(1, 0.125) == ([0], [0])
    q = _lkd(tiny_model("gpt2"), holdout=0.25)
    assert all(r["judged_on"] == "held-apart" and r["mse_after"] <= r["mse_before"] for r in q.zeroquant.lkd)


def test_bad_config():
    for bad in (dict(inputs="teacher"), dict(train="scales"), dict(steps=-1), dict(holdout=1.0)):
        with pytest.raises(zq.ZeroQuantError):
            zq.LKDConfig(**bad)


def test_block_that_training_worsens_keeps_its_start():
    """A learning rate far too high makes the block worse: LKD then keeps the integers it started from
    (round-to-nearest here) rather than the damaged ones."""
    torch.manual_seed(0)
    model = T.LlamaForCausalLM(T.LlamaConfig(**{**CONFIGS["llama"]().to_dict(), "num_hidden_layers": 1})).eval()
    batches = [{"input_ids": tiny_input(4, 16, seed=s)} for s in (1, 2)]
    cfg = zq.LKDConfig(steps=10, train="weights", weight_lr=1.0, clip=False)
    ours = zq.quantize(model, "w4/8-a8", calib_data=batches, lkd=cfg, progress=False)
    row = ours.zeroquant.lkd[0]
    assert row["kept_start"] and row["mse_after"] == row["mse_before"]
    rtn = zq.quantized_modules(zq.quantize(model, "w4/8-a8", progress=False))
    for name, ql in zq.quantized_modules(ours).items():
        assert torch.equal(ql.qweight, rtn[name].qweight), name


def test_only_one_block_trains_at_a_time(monkeypatch):
    model = tiny_model("llama")
    seen = []
    real_step = torch.optim.Adam.step

    def step(self, *a, **k):
        trainable = {id(p) for g in self.param_groups for p in g["params"]}
        seen.append((len(trainable), any(p.requires_grad for p in model.parameters())))
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.Adam, "step", step)
    zq.quantize(model, "w4a8", calib_data=tiny_input(4, 16), lkd=zq.LKDConfig(steps=3, train="weights"),
                inplace=True, progress=False)
    # 7 linears per llama block, their master weights (no biases); none of the model's own params train
    assert seen and all(n == 7 and not model_grad for n, model_grad in seen)
    assert len(seen) == 2 * 3


@pytest.mark.parametrize("source", ["random", "self", "text", "jsonl"])
@pytest.mark.parametrize("arch", ["gpt2", "bert"])
def test_data_sources(tmp_path, minilm, source, arch):
    _, tok = minilm
    model = tiny_model(arch)
    if source == "text":
        src = tmp_path / "t.txt"
        src.write_text(" ".join(f"the sentence number {i} is here ." for i in range(400)))
    elif source == "jsonl":
        src = tmp_path / "t.jsonl"
        src.write_text("\n".join(json.dumps({"text": f"row {i} says hello to the world"}) for i in range(40)))
    else:
        src = source
    a = zq.lkd_batches(str(src), model, tok, num_sequences=8, seq_len=16, batch_size=4, seed=0)
    b = zq.lkd_batches(str(src), model, tok, num_sequences=8, seq_len=16, batch_size=4, seed=0)
    assert len(a) == 2 and all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, b, strict=True))
    ids = torch.cat([x["input_ids"] for x in a])
    assert ids.shape[0] == 8 and ids.shape[1] <= 16 and int(ids.max()) < 30522
    if source in ("random", "self"):
        assert ids.shape[1] == 16
        assert not torch.isin(ids[:, 1:-1], torch.tensor(tok.all_special_ids)).any()


def test_bad_lkd_source():
    with pytest.raises(zq.ZeroQuantError, match="'self' or 'random'"):
        zq.lkd_batches("nope.txt", tiny_model("gpt2"))


def test_cli_lkd_writes_report(tmp_path, minilm):
    from zeroquant.tools.cli import main

    _, tok = minilm
    d = tmp_path / "m"
    tiny_model("gpt2").save_pretrained(d)
    tok.save_pretrained(d)
    rc = main(["quantize", str(d), "--preset", "w4/8-a8", "-o", str(tmp_path / "q"), "--device", "cpu", "--lkd",
               "--lkd-data", "random", "--lkd-steps", "5", "--lkd-samples", "8", "--lkd-seq-len", "16"])
    assert rc == 0
    rep = json.loads((tmp_path / "q" / "lkd_report.json").read_text())
    assert rep["data"] == "random" and len(rep["blocks"]) == 2 and rep["config"]["steps"] == 5
    # the saved model holds the distilled values, not round-to-nearest's, in every block that kept them
    saved = zq.quantized_modules(zq.load_quantized(tmp_path / "q"))
    rtn = zq.quantized_modules(zq.quantize(tiny_model("gpt2"), "w4/8-a8", progress=False))
    assert sorted(saved) == sorted(rtn)
    def values(m):  # progressive INT4 (the MLP here) clips in whole steps of its row scale: few in 5 steps
        return [m.qweight, m.w_scale, m.w_zero] if m.w_zero is not None else [m.qweight, m.w_scale]

    for b, row in enumerate(rep["blocks"]):
        moved = [not all(map(torch.equal, values(saved[n]), values(rtn[n]))) for n in saved if f".h.{b}." in n]
        assert len(moved) == 4 and all(moved) != row["kept_start"]


def test_lkd_on_half_precision_model_keeps_dtypes_and_reloads(tmp_path):
    model = tiny_model("gpt2").to(torch.bfloat16)
    q = _lkd(model)
    ql = next(iter(zq.quantized_modules(q).values()))
    # scales keep the rule's storage dtype (w4a8: int8 group scales, float32 row scales), not the model's bfloat16
    assert ql.w_scale.dtype == torch.int8 and ql.w_row_scale.dtype == torch.float32
    assert ql.bias.dtype == torch.bfloat16
    assert all(r["mse_after"] < r["mse_before"] for r in q.zeroquant.lkd)
    zq.save_quantized(q, tmp_path / "q")
    ids = tiny_input()
    with torch.no_grad():
        assert torch.equal(q(ids).logits, zq.load_quantized(tmp_path / "q")(ids).logits)


def test_default_data_is_as_long_as_the_model_takes():
    """128 x 2,048 tokens by default, clamped to the positions the model takes (128 for the tiny GPT-2)."""
    model = tiny_model("gpt2")
    batches = zq.lkd_batches("random", model, num_sequences=16)
    assert len(batches) == 2 and batches[0]["input_ids"].shape == (8, model.config.max_position_embeddings)


def test_one_batch_is_split_to_judge_on_held_apart_sequences():
    from zeroquant.algorithms.calib import split_batch

    ids, mask = tiny_input(5, 8, seed=1), torch.ones(5, 8, dtype=torch.long)
    a, b = split_batch({"input_ids": ids, "attention_mask": mask})
    assert torch.equal(torch.cat([a["input_ids"], b["input_ids"]]), ids) and a["attention_mask"].shape == (3, 8)
    one = {"input_ids": ids[:1]}
    assert len(split_batch(one)) == 1 and split_batch(one)[0] is one
    q = zq.quantize(tiny_model("llama"), "w4a16", calib_data=[{"input_ids": ids}], lkd=zq.LKDConfig(steps=5),
                    progress=False)
    assert all(r["judged_on"] == "held-apart" for r in q.zeroquant.lkd)


def test_short_runs_take_small_sign_steps():
    assert zq.LKDConfig(steps=20).sign_lr == 0.005 and zq.LKDConfig(steps=1000).sign_lr == 0.001
    assert zq.LKDConfig(steps=20, lr=0.05).sign_lr == 0.05
