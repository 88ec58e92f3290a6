import pytest
import torch
import transformers as T

import zeroquant as zq


def _peak_lkd(layers: int) -> int:
    torch.manual_seed(0)
    cfg = T.GPT2Config(vocab_size=1000, n_embd=512, n_layer=layers, n_head=8, n_positions=256)
    model = T.GPT2LMHeadModel(cfg).half().eval()  # stays on the CPU: LKD moves one block at a time
    ids = torch.randint(0, 1000, (16, 128))
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    zq.quantize(model, "w4/8-a8", calib_data=ids, lkd=zq.LKDConfig(steps=5, device="cuda"), inplace=True,
                progress=False)
    assert next(model.parameters()).device.type == "cpu"
    return torch.cuda.max_memory_allocated()


@pytest.mark.gpu
def test_lkd_peak_gpu_memory_does_not_grow_with_blocks():
    p2, p8 = _peak_lkd(2), _peak_lkd(8)
    print(f"LKD peak GPU memory: 2 blocks {p2 / 2**20:.1f} MiB, 8 blocks {p8 / 2**20:.1f} MiB")
    assert p8 < 1.1 * p2
