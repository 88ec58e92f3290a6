"""Is a row's time repeatable? The same quantized prefill measured on fresh models, several rows in one process;
run it twice for two processes (issue 19, item 6).

    python bench/stability.py [--preset w8a8] [--rows 3] [--tag p1] [--out DIR]

Per row: a fresh random Llama-7B (same seed), quantized, prefill 8 x 512 eagerly and as a CUDA-graph replay
(median, min and max of --reps), the GPU time of one eager forward from the profiler (kernels only: the gap to
the eager wall time is host time), the GPU's SM clock, power and temperature before the row, and every
autotuner's pick. Writes stability_<tag>.json after every row, then stability.md over every stability_*.json
in --out; prints one line per row.
"""

import argparse
import json
import statistics
import subprocess
from pathlib import Path

import torch
import triton

from zeroquant.api import quantize
from zeroquant.kernels.triton import gemv, skinny_gemm, tile_gemm, tma_gemm
from zeroquant.tools.benchmark import BenchSettings, build_model, wall_times
from zeroquant.tools.runtime import GraphedForward, last_logits_only

KERNELS = {"tma": tma_gemm._w8a8_tma_kernel, "tile": tile_gemm._qlinear_kernel,
           "tile decode": tile_gemm._qlinear_decode_kernel, "skinny": skinny_gemm._w4_skinny_kernel,
           "skinny sync": skinny_gemm._w4_skinny_sync_kernel, "gemv": gemv._gemv_kernel}


def times_ms(fn, reps: int) -> list[float]:
    return [1e3 * t for t in wall_times(fn, reps, "cuda")]


def kernel_ms(fn) -> float:
    """GPU time of the CUDA kernels one call launches (the profiler's device-time sum)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    return sum(e.self_device_time_total for e in kernels) / 1e3


def gpu_state() -> str:
    q = "clocks.sm,clocks.mem,power.draw,temperature.gpu"
    r = subprocess.run(["nvidia-smi", f"--query-gpu={q}", "--format=csv,noheader"], capture_output=True, text=True)
    return r.stdout.strip()


def picks() -> dict[str, str]:
    """Every autotuner's chosen config, by kernel and key."""
    return {f"{name} {key}": str(cfg) for name, k in KERNELS.items() for key, cfg in k.cache.items()}


def summary(ts: list[float]) -> dict:
    return {"median": statistics.median(ts), "min": min(ts), "max": max(ts)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="w8a8")
    ap.add_argument("--rows", type=int, default=3)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--layers", type=int, help="fewer blocks (quick looks only)")
    ap.add_argument("--tag", default="p1", help="names this process's file")
    ap.add_argument("--out", default="bench/results")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    s = BenchSettings(config="llama-7b", layers=a.layers, batch=8, prompt_len=512, gen_len=0)
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "preset": a.preset, "tag": a.tag, "rows": []}
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 32000, (s.batch, s.prompt_len), generator=g).cuda()
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    for i in range(a.rows):
        state = gpu_state()
        model = quantize(build_model(s), a.preset, inplace=True, progress=False)
        kwargs = {"use_cache": False, **last_logits_only(model)}
        with torch.no_grad():
            eager = times_ms(lambda: model(**inputs, **kwargs), a.reps)
            graphed = GraphedForward(model, **inputs, **kwargs)
            graph = times_ms(lambda: graphed(**inputs), a.reps)
            # Last, and only once a process: after a profiler session every launch pays CUPTI's callbacks
            # (eager rows measured after it were far slower: docs/history.md)
            gpu = kernel_ms(lambda: model(**inputs, **kwargs)) if i == a.rows - 1 else None
        row = {"row": i, "gpu_before": state, "eager_ms": summary(eager), "eager_kernel_ms": gpu,
               "graph_ms": summary(graph), "picks": picks()}
        res["rows"].append(row)
        (out / f"stability_{a.tag}.json").write_text(json.dumps(res, indent=2))
        print(f"{a.tag} row {i}: eager {_span(row['eager_ms'])}, kernels {_ms(gpu)}, "
              f"graph {_span(row['graph_ms'])}; before: {state}", flush=True)
        model = graphed = None  # free this row's model before the next is built
        torch.cuda.empty_cache()
    summarize(out)


def _ms(t: float | None) -> str:
    return "-" if t is None else f"{t:.2f} ms"


def _span(t: dict) -> str:
    return f"{t['median']:.2f} ms ({t['min']:.2f}-{t['max']:.2f})"


def summarize(out: Path) -> None:
    """stability.md from every stability_*.json in out: one line per row, the spread of the graph rows'
    medians, and the kernel keys whose pick differs between processes."""
    runs = [json.loads(f.read_text()) for f in sorted(out.glob("stability_*.json"))]
    rows = [(r["tag"], row) for r in runs for row in r["rows"]]
    graph = [row["graph_ms"]["median"] for _, row in rows]
    keys = sorted({k for _, row in rows for k in row["picks"]})
    differ = [k for k in keys if len({r["rows"][0]["picks"].get(k) for r in runs}) > 1]
    lines = [f"device: {runs[0]['device']}, torch {runs[0]['torch']}, triton {runs[0]['triton']}; "
             f"random Llama-7B, {runs[0]['preset']}, prefill 8 x 512, fresh model per row", "",
             "| process | row | GPU before (SM clock, memory clock, power, temperature) | eager ms (min-max) | "
             "kernel ms | graph ms (min-max) |", "|---|---|---|---|---|---|"]
    lines += [f"| {tag} | {row['row']} | {row['gpu_before']} | {_span(row['eager_ms'])} | "
              f"{_ms(row['eager_kernel_ms'])} | {_span(row['graph_ms'])} |" for tag, row in rows]
    lines += ["", f"Graph rows: {min(graph):.2f}-{max(graph):.2f} ms over {len(graph)} rows in {len(runs)} processes "
              f"({max(graph) / min(graph) - 1:.1%} apart). Autotuner picks that differ between processes: "
              f"{len(differ)} of {len(keys)} keys."]
    lines += [f"- {k}: " + "; ".join(f"{r['tag']}: {r['rows'][0]['picks'].get(k)}" for r in runs) for k in differ]
    (out / "stability.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
