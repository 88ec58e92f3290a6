import json

import pytest
import torch
import torch.nn.functional as F
import transformers as T
from tiny_models import CONFIGS, tiny_input, tiny_model

import zeroquant as zq
from zeroquant.api import find_targets
from zeroquant.lkd import FakeQuantLinear

FAST = dict(steps=60, lr=1e-4)


def _lkd(model, preset="w4a8", seed=0, **kw):
    cfg = zq.LKDConfig(**{**FAST, "seed": seed, **kw})
    return zq.quantize(model, preset, calib_data=tiny_input(8, 32, seed=3), calib_batch_size=4, lkd=cfg,
                       progress=False)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert", "opt"])
def test_lkd_lowers_every_block_mse(arch):
    q = _lkd(tiny_model(arch))
    table = q.zeroquant_lkd
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


def test_one_block_matches_hand_written_loop():
    torch.manual_seed(0)
    model = T.LlamaForCausalLM(T.LlamaConfig(**{**CONFIGS["llama"]().to_dict(), "num_hidden_layers": 1})).eval()
    batches = [{"input_ids": tiny_input(4, 16, seed=s)} for s in (1, 2)]
    cfg = zq.LKDConfig(steps=10, lr=3e-5, train_scales=True, scale_lr_mult=1.0)
    ours = zq.quantize(model, "w4/8-a8", calib_data=batches, lkd=cfg, progress=False)
    assert not ours.zeroquant_lkd[0]["kept_start"]  # training lowered the loss: its result is kept

    # hand-written: capture block inputs, fake-quant copy, Adam on MSE, then freeze to integers
    block = model.model.layers[0]
    inputs = []
    h = block.register_forward_pre_hook(lambda m, a, k: inputs.append((a, k)), with_kwargs=True)
    with torch.no_grad():
        for b in batches:
            model(**b, use_cache=False)
    h.remove()
    import copy

    student = copy.deepcopy(block)
    targets = find_targets(model, zq.PRESETS["w4/8-a8"])
    fqs = {}
    for t in targets:
        fqs[t.local] = FakeQuantLinear(student.get_submodule(t.local), t.rule)
        student.set_submodule(t.local, fqs[t.local])
    params = [p for m in fqs.values() for p in (m.weight, m.bias) if p is not None]
    scales = [m.w_scale for m in fqs.values()]
    opt = torch.optim.Adam([{"params": params, "lr": 3e-5}, {"params": scales, "lr": 3e-5}])
    with torch.no_grad():
        teacher = [block(a[0], *a[1:], **{k: v for k, v in kw.items() if k != "past_key_values"})
                   for a, kw in inputs]
        teacher = [t[0] if isinstance(t, tuple) else t for t in teacher]
    for step in range(10):
        a, kw = inputs[step % 2]
        kw = {k: v for k, v in kw.items() if k != "past_key_values"}
        out = student(a[0], *a[1:], **kw)
        out = out[0] if isinstance(out, tuple) else out
        loss = F.mse_loss(out.float(), teacher[step % 2].float())
        opt.zero_grad()
        loss.backward()
        opt.step()
    mine = {t.name: fqs[t.local].to_quant_linear() for t in targets}
    theirs = zq.quantized_modules(ours)
    for name, ql in mine.items():
        assert torch.equal(ql.qweight, theirs[name].qweight), name
        assert torch.allclose(ql.w_scale, theirs[name].w_scale), name


def test_block_that_training_worsens_keeps_its_start():
    """A learning rate far too high makes the block worse on its own data: LKD then keeps the integers it
    started from (round-to-nearest here) rather than the damaged ones."""
    torch.manual_seed(0)
    model = T.LlamaForCausalLM(T.LlamaConfig(**{**CONFIGS["llama"]().to_dict(), "num_hidden_layers": 1})).eval()
    batches = [{"input_ids": tiny_input(4, 16, seed=s)} for s in (1, 2)]
    ours = zq.quantize(model, "w4/8-a8", calib_data=batches, lkd=zq.LKDConfig(steps=10, lr=3e-3), progress=False)
    row = ours.zeroquant_lkd[0]
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
    zq.quantize(model, "w4a8", calib_data=tiny_input(4, 16), lkd=zq.LKDConfig(steps=3), inplace=True,
                progress=False)
    # 7 linears per llama block: weight + scale each (no biases); none of the model's own params train
    assert seen and all(n == 14 and not model_grad for n, model_grad in seen)
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
    from zeroquant.cli import main

    _, tok = minilm
    d = tmp_path / "m"
    tiny_model("gpt2").save_pretrained(d)
    tok.save_pretrained(d)
    rc = main(["quantize", str(d), "--preset", "w4/8-a8", "-o", str(tmp_path / "q"), "--device", "cpu", "--lkd",
               "--lkd-data", "random", "--lkd-steps", "5", "--lkd-samples", "8", "--lkd-seq-len", "16"])
    assert rc == 0
    rep = json.loads((tmp_path / "q" / "lkd_report.json").read_text())
    assert rep["data"] == "random" and len(rep["blocks"]) == 2 and rep["config"]["steps"] == 5
    # the saved model holds the distilled scales, not round-to-nearest's, in every block that kept them
    saved = zq.quantized_modules(zq.load_quantized(tmp_path / "q"))
    rtn = zq.quantized_modules(zq.quantize(tiny_model("gpt2"), "w4/8-a8", progress=False))
    assert sorted(saved) == sorted(rtn)
    for b, row in enumerate(rep["blocks"]):
        moved = [not torch.equal(saved[n].w_scale, rtn[n].w_scale) for n in saved if f".h.{b}." in n]
        assert len(moved) == 4 and all(moved) != row["kept_start"]


def test_lkd_on_half_precision_model_keeps_dtypes_and_reloads(tmp_path):
    model = tiny_model("gpt2").to(torch.bfloat16)
    q = _lkd(model)
    ql = next(iter(zq.quantized_modules(q).values()))
    # scales keep the rule's storage dtype (w4a8: float16), not the model's bfloat16
    assert ql.w_scale.dtype == torch.float16 and ql.bias.dtype == torch.bfloat16
    assert all(r["mse_after"] < r["mse_before"] for r in q.zeroquant_lkd)
    zq.save_quantized(q, tmp_path / "q")
    ids = tiny_input()
    with torch.no_grad():
        assert torch.equal(q(ids).logits, zq.load_quantized(tmp_path / "q")(ids).logits)
