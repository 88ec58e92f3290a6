"""The block runner that GPTQ and LKD share: its streams of hidden states and where it keeps them."""

import torch
from tiny_models import tiny_input, tiny_model

import zeroquant as zq
import zeroquant.algorithms.blockwise as B
from zeroquant.models.adapters import get_blocks


class _Record:
    """A swap step that records what it sees and returns the block unchanged."""

    phase = "swap"

    def __init__(self, streams):
        self.streams, self.seen = frozenset(streams), []

    def block(self, k, block, inputs, targets):
        self.seen.append((inputs.fp, inputs.quant, targets))
        return block


def _run(model, carry_fp=True, carry_quantized=True):
    """Run every block through a step that records its inputs and returns the block unchanged."""
    step = _Record({s for s, on in (("fp", carry_fp), ("quant", carry_quantized)) if on})
    batches = [{"input_ids": tiny_input(2, 8, seed=s)} for s in (1, 2)]
    B.run_pipeline(model, B.ModelBlocks(get_blocks(model)), batches, [step], torch.device("cpu"), progress=False)
    return step.seen


def test_streams_follow_the_blocks():
    """With unchanged blocks both streams carry the FP hidden states: block k's input is block k-1's target."""
    seen = _run(tiny_model("llama"))
    assert len(seen) == 2
    (fp0, q0, t0), (fp1, q1, _) = seen
    for i in range(2):
        assert torch.equal(fp0.get(i), q0.get(i)) and torch.equal(fp1.get(i), t0.get(i))
        assert torch.equal(q1.get(i), t0.get(i)) and not torch.equal(fp1.get(i), fp0.get(i))


def test_streams_not_carried_are_none():
    (fp, q, t), _ = _run(tiny_model("llama"), carry_fp=False)
    assert fp is None and t is None and q is not None
    (fp, q, t), _ = _run(tiny_model("llama"), carry_quantized=False)
    assert q is None and fp is not None and t is not None
    calls = []
    model = tiny_model("llama")

    class NoData(_Record):
        def block(self, k, block, inputs, targets):  # a step that reads no stream runs without data
            calls.append((k, inputs, targets))
            return block

    B.run_pipeline(model, B.ModelBlocks(get_blocks(model)), None, [NoData(())], torch.device("cpu"), progress=False)
    assert calls == [(0, None, None), (1, None, None)]


def test_hidden_states_kept_on_the_host_give_the_same_model(monkeypatch):
    """When the streams do not fit on the device they live in host memory; the result does not change."""
    model = tiny_model("llama")
    calib = tiny_input(8, 16, seed=3)
    lkd = zq.LKDConfig(steps=10)
    ref = zq.quantize(model, "w4a8+gptq", calib_data=calib, calib_batch_size=4, lkd=lkd, progress=False)
    monkeypatch.setattr(B, "hidden_fits", lambda *a, **k: False)
    made = []
    real = B.Hidden.__init__

    def spy(self, tensors, device, on_host):
        made.append(on_host)
        real(self, tensors, device, on_host)

    monkeypatch.setattr(B.Hidden, "__init__", spy)
    host = zq.quantize(model, "w4a8+gptq", calib_data=calib, calib_batch_size=4, lkd=lkd, progress=False)
    assert made and all(made)
    a, b = ref.state_dict(), host.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_hidden_answers_on_its_device():
    h = B.Hidden([torch.ones(2, 3)], torch.device("cpu"), on_host=True)
    doubled = h.map(lambda i, x: 2 * x)
    assert doubled.on_host and torch.equal(doubled.get(0), 2 * torch.ones(2, 3)) and len(doubled) == 1
