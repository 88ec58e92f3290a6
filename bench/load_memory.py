"""Peak memory of `zq.load_quantized` on a Llama-7B-shaped w4/8-a8 checkpoint (random integers), against the
checkpoint's file size: host RSS on CPU; with --device cuda also the GPU's peak allocation (an FP16 copy of the
model would be 13.5 GB). The checkpoint is written without ever building the FP16 model: the skeleton is made
on the meta device and each quantized linear is filled with random integers.

    python bench/load_memory.py --dir /tmp/llama7b-w48a8 --out bench/results/load_memory
    python bench/load_memory.py --dir /tmp/llama7b-w48a8 --device cuda --out bench/results/load_memory_cuda
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

MEASURE = """
import resource, sys, time, torch
import zeroquant as zq
dev = sys.argv[2]
if dev == "cuda":
    torch.cuda.init()
t = time.perf_counter()
m = zq.load_quantized(sys.argv[1], device=dev) if sys.argv[1] != "-" else None
if dev == "cuda":
    torch.cuda.synchronize()
secs = time.perf_counter() - t
gpu = torch.cuda.max_memory_allocated() if dev == "cuda" else 0
rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
loaded = rss()
if m is not None:  # read every byte: tensors may still be pages of the mapped file
    for x in [*m.parameters(), *m.buffers()]:
        x.float().sum() if x.is_floating_point() else x.view(-1)[:: 4096].sum()
        x.view(torch.uint8).sum() if x.element_size() == 1 else None
print(secs, loaded, rss(), gpu)
"""


def write_checkpoint(out: Path, preset: str) -> None:
    from accelerate import init_empty_weights
    from transformers import LlamaForCausalLM

    import zeroquant as zq
    from zeroquant.algorithms.targets import find_targets
    from zeroquant.nn.qlinear import QuantLinear
    from zeroquant.tools.benchmark import random_config

    cfg = zq.core.config.resolve_config(preset)
    with init_empty_weights():
        model = LlamaForCausalLM(random_config("llama-7b")).half()
    g = torch.Generator().manual_seed(0)
    for t in find_targets(model, cfg):
        w = t.rule.weight
        n, k = t.module.out_features, t.module.in_features
        ql = QuantLinear(k, n, False, w, t.rule.act, torch.float16)
        ql.qweight.copy_(torch.randint(0, 127, ql.qweight.shape, generator=g).to(ql.qweight.dtype))
        ql.w_scale.copy_(torch.rand(ql.w_scale.shape, generator=g) * 1e-3)
        model.set_submodule(t.name, ql)
    for name, p in list(model.named_parameters()):
        if p.is_meta:
            mod, _, attr = name.rpartition(".")
            setattr(model.get_submodule(mod), attr, torch.nn.Parameter(torch.randn(p.shape, dtype=p.dtype) * 0.02))
    model.zeroquant = zq.core.state.QuantState(cfg)
    zq.save_quantized(model, out)


def measure(path: str, device: str) -> tuple[float, int, int, int]:
    """(load seconds, peak RSS after loading, peak RSS once every tensor was read, peak GPU allocation) in a
    fresh process."""
    r = subprocess.run([sys.executable, "-c", MEASURE, path, device], capture_output=True, text=True, check=True)
    secs, loaded, touched, gpu = r.stdout.split()[-4:]
    return float(secs), int(loaded), int(touched), int(gpu)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", required=True, help="where to write (or find) the checkpoint")
    p.add_argument("--preset", default="w4/8-a8")
    p.add_argument("--device", default="cpu", help="cpu or cuda: where the model is loaded")
    p.add_argument("--out", help="output prefix: OUT.json, OUT.md")
    p.add_argument("--write-only", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    ckpt = Path(args.dir)
    if args.write_only:
        write_checkpoint(ckpt, args.preset)
        return
    if not (ckpt / "model.safetensors").exists():
        # in a child process: Linux keeps a process's peak RSS across fork and exec, so the measuring children
        # must come from a parent that never held the model
        subprocess.run([sys.executable, __file__, "--dir", str(ckpt), "--preset", args.preset, "--write-only"],
                       check=True)
    size = (ckpt / "model.safetensors").stat().st_size
    _, base, _, _ = measure("-", args.device)  # the interpreter with torch, transformers and zeroquant imported
    secs, loaded, peak, gpu = measure(str(ckpt), args.device)
    row = {"preset": args.preset, "device": args.device, "file_bytes": size, "baseline_rss": base,
           "rss_after_load": loaded, "peak_rss": peak, "load_s": secs, "peak_over_file": peak / size,
           "added_over_file": (peak - base) / size, "gpu_peak_allocated": gpu, "gpu_peak_over_file": gpu / size,
           "torch": torch.__version__}
    if args.device == "cuda":
        row["gpu"] = torch.cuda.get_device_name()
    Path(args.out).with_suffix(".json").write_text(json.dumps(row, indent=2))
    gib = 2**30
    if args.device == "cuda":
        md = (f"Llama-7B shape, {args.preset}, loaded onto {row['gpu']}: file {size / gib:.2f} GiB; loaded in "
              f"{secs:.1f} s; GPU peak allocation {gpu / gib:.2f} GiB ({row['gpu_peak_over_file']:.2f}x the file; "
              f"the FP16 model would be 12.6 GiB); host peak RSS {peak / gib:.2f} GiB, of which {base / gib:.2f} GiB "
              "is the interpreter with its imports and CUDA context")
    else:
        md = (f"Llama-7B shape, {args.preset}, CPU: file {size / gib:.2f} GiB; loaded in {secs:.1f} s with peak "
              f"RSS {loaded / gib:.2f} GiB (tensors still pages of the mapped file); after reading every tensor "
              f"{peak / gib:.2f} GiB ({row['peak_over_file']:.2f}x the file), of which {base / gib:.2f} GiB is the "
              f"interpreter with its imports ({row['added_over_file']:.2f}x the file added)")
    Path(args.out).with_suffix(".md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
