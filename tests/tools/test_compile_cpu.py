"""torch.compile over quantized models on the reference path (CPU): one graph, no break, the eager outputs.
The kernel path (custom ops, INT8 hand-over) is compiled in test_ops_handoff.py and, on CUDA, test_runtime_gpu.py."""

import pytest
import torch
from tiny_models import model_output, tiny_input, tiny_model

import zeroquant as zq

CASES = [("llama", "w8a8"), ("llama", "w4/8-a8"), ("opt", "w4a16"), ("opt", "w8a8-static"), ("bert", "w8a8"),
         ("gpt2", "w4a8")]


@pytest.mark.parametrize("arch,preset", CASES)
def test_fullgraph_compile_matches_eager(arch, preset):
    q = zq.quantize(tiny_model(arch), preset, calib_data=tiny_input(4, 16, seed=5), progress=False)
    ids = tiny_input()
    torch._dynamo.reset()
    explained = torch._dynamo.explain(q)(input_ids=ids)
    assert explained.graph_break_count == 0, [str(r.reason)[:200] for r in explained.break_reasons]
    want = model_output(q, ids)
    # aot_eager: dynamo's full graph through AOTAutograd, without needing a C++ compiler on the test machine
    compiled = torch.compile(q, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(model_output(compiled, ids), want, rtol=1e-5, atol=1e-5)
