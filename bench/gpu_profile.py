"""Where the GPU time of one forward goes: FP16 vs each preset, kernel by kernel (torch.profiler).

Random weights of a named shape (zeroquant.tools.benchmark.RANDOM_CONFIGS), one forward over [B, T] tokens
(causal LMs: the prompt pass, no cache). Prints, per variant, the summed GPU time of each kernel family
per forward and the total; the total is what a CUDA graph leaves once host launch cost is gone.

    python bench/gpu_profile.py --config bert-large --batch 32 --seq 128 --presets w8a8,w8a8-g128 [--json F]

--decode N profiles N replays of the one-token decode step instead (zeroquant.tools.runtime.GreedyDecoder after a
--seq-token prompt; --compile compiles the step as `zeroquant bench --compile` does): where a decode step's
time goes between the GEMMs.

--host adds the host side of an eager forward, op by op (self CPU time): what to cut where the wall time is
above the GPU time (docs/history.md: eager Llama-7B prefill).
"""

import argparse
import functools
import json
import re
import statistics
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from zeroquant.api import quantize
from zeroquant.tools.benchmark import BenchSettings, build_model, wall_times
from zeroquant.tools.runtime import GraphedForward, GreedyDecoder


def family(name: str) -> str:
    """Enough of a kernel's name to tell ATen's elementwise functors apart, so launches of one op add up."""
    name = re.sub(r"^void ", "", name)
    name = re.sub(r"(at::native::|\(anonymous namespace\)::|unsigned int|int, )", "", name)
    return name[:110]


def kernel_times(fwd, reps: int) -> tuple[dict[str, float], float, float, list[tuple[str, float]]]:
    """Per-kernel-family GPU ms per call, their sum, the wall ms per call (median of reps), and every kernel
    of the profiled calls in launch order as (family, us)."""
    with torch.no_grad():
        fwd()  # a second warm-up beside wall_times' own
        walls = [1e3 * t for t in wall_times(fwd, reps, "cuda")]
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(reps):
                fwd()
            torch.cuda.synchronize()
    per = defaultdict(float)
    kernels = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                     key=lambda e: e.time_range.start)
    for e in kernels:
        per[family(e.name)] += e.device_time / 1e3 / reps  # ms per forward
    order = [(family(e.name), e.device_time) for e in kernels]
    return dict(per), sum(per.values()), statistics.median(walls), order


def host_times(fwd, reps: int) -> list[tuple[str, float, int]]:
    """Where the host's time per call goes, op by op: (name, self CPU ms, calls) per call, largest first. The
    profiler adds its own cost to every op, so compare shares, not absolute times. Eager forwards whose wall
    time exceeds their GPU time are bound here."""
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(reps):
            fwd()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    rows = [(e.key, e.self_cpu_time_total / 1e3 / reps, e.count // reps) for e in prof.key_averages()]
    return sorted(rows, key=lambda r: -r[1])


def decode_steps(model, ids: torch.Tensor, n: int, compile: bool, calls: int):
    """A function running n graph-replayed decode steps, callable `calls` times, after the prompt `ids`; the
    prompt and the step's capture run here, outside what is profiled."""
    dec = GreedyDecoder(model, ids.shape[0], ids.shape[1] + n * (calls + 1), compile=compile)
    with torch.no_grad():
        dec.prefill(ids)
        dec.decode(n)
    return functools.partial(dec.decode, n)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True)
    p.add_argument("--layers", type=int)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--presets", default="w8a8,w8a8-g128")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--graph", action="store_true", help="profile a CUDA-graph replay of the forward")
    p.add_argument("--trace", type=int, default=0, help="also print the first N kernels of a forward in order")
    p.add_argument("--decode", type=int, default=0, help="profile N decode steps (graph replays) instead")
    p.add_argument("--compile", action="store_true", help="with --decode: compile the step (torch.compile)")
    p.add_argument("--host", action="store_true", help="also profile the host: self CPU time per op (eager rows)")
    p.add_argument("--json")
    a = p.parse_args()
    s = BenchSettings(config=a.config, layers=a.layers, batch=a.batch, prompt_len=a.seq)
    out = {"device": torch.cuda.get_device_name(), "args": vars(a), "variants": {}}
    for preset in ["fp16"] + a.presets.split(","):
        model = build_model(s)
        if preset != "fp16":
            model = quantize(model, preset, inplace=True, progress=False)
        ids = torch.randint(1000, model.config.vocab_size, (a.batch, a.seq), device="cuda")
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}  # as zeroquant bench runs it
        if a.decode:
            fwd = decode_steps(model, ids, a.decode, a.compile, 2 * a.reps + 2)
        elif a.graph:
            graphed = GraphedForward(model, **inputs)
            fwd = functools.partial(graphed, **inputs)
        else:
            fwd = functools.partial(model, **inputs)
        per, total, wall, order = kernel_times(fwd, a.reps)
        out["variants"][preset] = {"total_ms": total, "wall_ms": wall, "kernels_ms": per,
                                   "first_kernels_us": order[: max(a.trace, 0)]}
        what = f"{a.decode} decode steps" if a.decode else "forward"
        print(f"\n== {preset}{' graph' if a.graph else ''}{' compiled' if a.compile else ''}: GPU {total:.2f} ms, "
              f"wall {wall:.2f} ms per {what} ({a.config}, {a.batch} x {a.seq})")
        for name, ms in sorted(per.items(), key=lambda kv: -kv[1])[: a.top]:
            print(f"  {ms:8.3f} ms {100 * ms / total:5.1f}%  {name}")
        for name, us in order[: a.trace]:
            print(f"    {us:8.1f} us  {name[:70]}")
        if a.host:
            host = host_times(fwd, a.reps)
            out["variants"][preset]["host_ms"] = host[: a.top * 2]
            print(f"  host: {sum(r[1] for r in host):.2f} ms self CPU per forward (profiled)")
            for name, ms, calls in host[: a.top]:
                print(f"  {ms:8.3f} ms {calls:6d} calls  {name[:80]}")
        del model
        torch.cuda.empty_cache()
    from zeroquant.kernels.triton import tma_gemm

    # What the autotuner chose per shape key: a slower config picked on a noisy measurement shows up here.
    out["tma_configs"] = {str(k): str(v) for k, v in tma_gemm._w8a8_tma_kernel.cache.items()}
    for k, v in out["tma_configs"].items():
        print(f"  TMA autotune {k}: {v}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
