"""torchrun --nproc-per-node 2 (gloo, CPU): each process quantizes with half of the calibration batches, and the
checkpoint equals the one-process checkpoint, tensor for tensor (one thread a process on both sides: the CPU
kernels' sums run in another order on another number of threads)."""

import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from test_hostile_inputs import STORIES, run
from tiny_models import tiny_model

VARIANTS = {
    "gptq": ["--preset", "w4/8-a8+gptq"],
    "smooth": ["--preset", "w8a8+smooth"],
    "static": ["--preset", "w8a8-static"],
    "lkd": ["--preset", "w4/8-a8", "--lkd", "--lkd-steps", "6", "--lkd-seq-len", "64"],
}


def _torchrun(args, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "zeroquant.tools.cli", *map(str, args)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tmp_path, timeout=300)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A tiny random Llama with stories260K's tokenizer, saved as safetensors."""
    out = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama").save_pretrained(out)
    for f in STORIES.glob("tokenizer*"):
        shutil.copy(f, out)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("model", ["stories260K", "tiny-llama"])
def test_two_processes_equal_one(model, variant, tmp_path, capsys, tiny_llama):
    src = STORIES if model == "stories260K" else tiny_llama
    calib = tmp_path / "c.txt"
    calib.write_text("Once upon a time, there was a little girl named Lily. She loved to play outside. " * 80)
    data = (["--lkd-data", calib, "--lkd-samples", "16"] if variant == "lkd"
            else ["--calib", calib, "--calib-samples", "16"])  # two batches of 8: one per process
    args = ["quantize", src, *VARIANTS[variant], *data, "--device", "cpu"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun process: CPU kernels add up in another order on other thread counts
    try:
        assert run([*args, "-o", tmp_path / "one"], capsys)[0] == 0
    finally:
        torch.set_num_threads(threads)
    two = _torchrun([*args, "-o", tmp_path / "two"], tmp_path)
    assert two.returncode == 0, two.stderr[-2000:]
    a, b = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    assert sorted(a) == sorted(b)
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    assert '"processes": 2' in (tmp_path / "two" / "quantization.json").read_text()
