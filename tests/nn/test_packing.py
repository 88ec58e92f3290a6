"""CPU: q/k/v packing keeps every linear's numbers, state dict and checkpoint, and notices when it is undone."""

import pytest
import torch
from kernel_cases import VARIANTS, quant_linear
from safetensors.torch import load_model, save_model
from tiny_models import model_output, tiny_input, tiny_model

import zeroquant as zq
from zeroquant.kernels.weight_format import KernelWeight
from zeroquant.models.encoder_attention import EncoderAttention
from zeroquant.nn import packing


def three(bits, group, sym, a8, scale_dtype="float32"):
    torch.manual_seed(0)
    return [quant_linear(256, n, bits, group, sym, a8, "cpu", scale_dtype=scale_dtype) for n in (96, 96, 64)]


@pytest.mark.parametrize("scale_dtype", ["float32", "float16"])
@pytest.mark.parametrize("name,bits,group,sym,a8", VARIANTS)
def test_pack_keeps_outputs_and_state_dict(name, bits, group, sym, a8, scale_dtype):
    """Float16 W4A8 scales and zero points (interleaved in each linear) are interleaved in the pack too, and the
    kernel format reads the packed halves in place."""
    lins = three(bits, group, sym, a8, scale_dtype)
    x = torch.randn(5, 256)
    before = [m(x) for m in lins]
    states = [{k: v.clone() for k, v in m.state_dict().items()} for m in lins]
    assert packing.packable(lins) and packing.packed_buffers(lins) is None
    packing.pack(lins)
    bases = packing.packed_buffers(lins)
    assert bases["qweight"].shape[0] == 256 and bases["w_scale"].shape[1] == 256
    assert torch.equal(bases["qweight"], torch.cat([m.qweight for m in lins]))
    assert torch.equal(bases["w_scale"], torch.cat([m.w_scale for m in lins]).t())
    assert torch.equal(bases["bias"], torch.cat([m.bias for m in lins]))
    kw = KernelWeight.from_quant(bases["qweight"], bases["w_scale"].t(),
                                 None if bases["w_zero"] is None else bases["w_zero"].t(), bits, lins[0].group_size)
    assert kw.scale.data_ptr() == bases["w_scale"].data_ptr()
    assert kw.sz_step == (2 if bits == 4 and not sym and a8 and scale_dtype == "float16" else 1)
    for m, want, st in zip(lins, before, states, strict=True):
        assert torch.equal(m(x), want)
        sd = m.state_dict()
        assert sd.keys() == st.keys() and all(torch.equal(sd[k], st[k]) for k in st)
        # saved as the linear's own tensors, not views into the shared allocation
        assert all(v.untyped_storage().nbytes() == v.numel() * v.element_size() for v in sd.values())


def test_packing_is_undone_by_a_copy_and_follows_in_place_updates():
    lins = three(8, -1, True, True)
    packing.pack(lins)
    lins[1].load_state_dict(three(8, 64, True, True)[0].state_dict() | {"w_scale": torch.ones(96, 1)},
                            strict=False)
    assert torch.equal(packing.packed_buffers(lins)["w_scale"][0, 96:192], torch.ones(96))
    lins[2]._apply(lambda t: t.clone())  # what a device move does to each view
    assert packing.packed_buffers(lins) is None


def test_not_packable_across_formats():
    lins = three(8, -1, True, True)
    assert not packing.packable([*lins[:2], quant_linear(256, 96, 4, 128, False, True, "cpu")])
    assert not packing.packable([*lins[:2], quant_linear(256, 96, 8, -1, True, True, "cpu", bias=False)])


def test_packed_bert_saves_and_loads(tmp_path):
    q = zq.quantize(tiny_model("bert"), "w8a8", progress=False)
    ids = tiny_input()
    want = model_output(q, ids)
    for attn in (m for m in q.modules() if isinstance(m, EncoderAttention)):
        packing.pack([getattr(attn, n) for n in attn.names])
    assert torch.equal(model_output(q, ids), want)
    save_model(q, str(tmp_path / "m.safetensors"))
    fresh = zq.quantize(tiny_model("bert", seed=3), "w8a8", progress=False)
    load_model(fresh, str(tmp_path / "m.safetensors"))
    assert torch.equal(model_output(fresh, ids), want)


@pytest.mark.parametrize("preset", ["w8a8", "w4a16"])
def test_decoder_norm_runs_its_linears_packed_and_repacks_after_a_move(preset, monkeypatch):
    """On the kernel path (the ops' CPU twins here) a decoder's input norm packs q/k/v on the first forward and
    hands their outputs over from one GEMM; a device move undoes the pack and the next forward packs again; the
    logits match the unpacked model's."""
    from zeroquant import kernels
    from zeroquant.nn.fused import FusedNorm

    q = zq.quantize(tiny_model("llama"), preset, progress=False).to(torch.bfloat16)
    ids = tiny_input()
    monkeypatch.setattr(kernels, "runs_on", lambda x: True)
    norms = [m for m in q.modules() if isinstance(m, FusedNorm) and m.pack]
    assert norms and all(packing.packed_buffers(list(n.consumers)) is None for n in norms)
    for n in norms:
        n.pack = False
    want = model_output(q, ids)
    for n in norms:
        n.pack = True
    first = model_output(q, ids)
    assert all(packing.packed_buffers(list(n.consumers)) is not None for n in norms)
    q._apply(lambda t: t.clone())  # what a device move does
    assert all(packing.packed_buffers(list(n.consumers)) is None and not hasattr(n, "packed_buffers") for n in norms)
    again = model_output(q, ids)
    assert all(packing.packed_buffers(list(n.consumers)) is not None for n in norms)
    torch.testing.assert_close(first, want, rtol=1e-2, atol=1e-2)
    assert torch.equal(first, again)
