"""Speed-up over FP16 torch.compile as the tokens per forward grow: decode steps at batch M (M <= 64) and prompt
forwards of M tokens (M >= 256: batch 1 up to 2,048 tokens, then batches of 2,048-token prompts), every row
compiled (zeroquant.tools.runtime, the same loop for FP16 and each preset), one process, random weights.

    python bench/m_sweep.py --config llama-7b --out bench/results/m_sweep
    # a quick look, or a sweep split over several calls (points are merged by --resume)
    python bench/m_sweep.py --config llama-7b --layers 8 --presets w8a8 --m 1,4096 --out /tmp/m --resume

Writes OUT.json after every point; OUT.md (tokens/s and the ratio to FP16 per M) and OUT.png (the curve, when
matplotlib is installed: `pip install .[bench]`) at the end; `--replot` rewrites them from OUT.json. Decode points
also record the time to the first token of their batch's 128-token prompt, and every point its wall time.
`--ttft` lengths add the time to the first token of one prompt of that length (GreedyDecoder's compiled and
graphed prompt, KV cache written), a table of its own.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from zeroquant.tools import benchmark

MS = [1, 16, 64, 256, 1024, 4096, 8192]
PRESETS = ["w8a8", "w8a8-g128", "w4a16", "w4/8-a8", "w4/8-a8+int8scale"]


def point(m: int) -> tuple[int, int, int]:
    """(batch, prompt length, new tokens) for M tokens per forward: decode at batch M up to 64, else prompts."""
    if m <= 64:
        return m, 128, 32
    length = min(m, 2048)
    return max(1, m // length), length, 0


def compiled_row(model, base: benchmark.BenchSettings, batch: int, length: int, new: int) -> tuple:
    """(benchmark.Row of the compiled loop, wall seconds with compiling included: what a sweep's device time
    goes to). Every row compiles afresh, so no recompile limit is reached across rows."""
    torch._dynamo.reset()
    t = time.perf_counter()
    row = benchmark.measure(model, replace(base, batch=batch, prompt_len=length, gen_len=new), "compile")
    return row, time.perf_counter() - t


def measure_point(model, base: benchmark.BenchSettings, m: int) -> dict:
    batch, length, new = point(m)
    row, wall = compiled_row(model, base, batch, length, new)
    tok_s = row.decode_tok_s if new else batch * length / (row.prefill_ms / 1e3)
    return {"m": m, "batch": batch, "prompt_len": length, "decode": bool(new), "tok_s": tok_s,
            "ttft_ms" if new else "forward_ms": row.prefill_ms, "peak_gib": row.peak_gib, "wall_s": wall}


def measure_ttft(model, base: benchmark.BenchSettings, length: int) -> dict:
    """Time to the first token of one prompt of `length` tokens."""
    row, wall = compiled_row(model, base, 1, length, 1)
    return {"kind": "ttft", "m": length, "ttft_ms": row.prefill_ms, "peak_gib": row.peak_gib, "wall_s": wall}


def sweep_points(points: list[dict]) -> list[dict]:
    """The tokens-per-forward points, without the time-to-first-token ones."""
    return [p for p in points if p.get("kind") != "ttft"]


def ttft_table(points: list[dict], presets: list[str]) -> str:
    by = {(p["preset"], p["m"]): p for p in points if p.get("kind") == "ttft"}
    lengths = sorted({m for _, m in by})
    if not lengths:
        return ""
    lines = ["| prompt (batch 1) | FP compile ms | " + " | ".join(f"{p} ms (x FP)" for p in presets) + " |",
             "|---|---|" + "---|" * len(presets)]
    for n in lengths:
        fp = by.get(("fp16", n))
        if fp is None:
            continue
        cells = [f"{by[(p, n)]['ttft_ms']:.2f} ({fp['ttft_ms'] / by[(p, n)]['ttft_ms']:.2f}x)" if (p, n) in by
                 else "-" for p in presets]
        lines.append(f"| {n} | {fp['ttft_ms']:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def table(points: list[dict], presets: list[str], ms: list[int]) -> str:
    by = {(p["preset"], p["m"]): p for p in sweep_points(points)}
    lines = ["| M (tokens per forward) | what | FP compile tok/s | " + " | ".join(f"{p} x FP" for p in presets)
             + " |", "|---|---|---|" + "---|" * len(presets)]
    for m in ms:
        fp = by.get(("fp16", m))
        if fp is None:
            continue
        what = f"decode b{fp['batch']}" if fp["decode"] else f"prompt {fp['batch']} x {fp['prompt_len']}"
        cells = [f"{by[(p, m)]['tok_s'] / fp['tok_s']:.2f}" if (p, m) in by else "-" for p in presets]
        lines.append(f"| {m} | {what} | {fp['tok_s']:,.0f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(points: list[dict], presets: list[str], path: Path, title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    points = sweep_points(points)
    fp = {p["m"]: p["tok_s"] for p in points if p["preset"] == "fp16"}
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for preset in presets:
        xs = sorted(p["m"] for p in points if p["preset"] == preset and p["m"] in fp)
        ys = [next(p["tok_s"] for p in points if p["preset"] == preset and p["m"] == m) / fp[m] for m in xs]
        ax.plot(xs, ys, marker="o", label=preset)
    ax.axhline(1.0, color="grey", lw=1, ls="--", label="FP16 compile")
    ax.set(xscale="log", xlabel="tokens per forward (M)", ylabel="speed-up over FP16 torch.compile", title=title)
    ax.set_xticks(sorted(fp), [str(m) for m in sorted(fp)])
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="llama-7b", choices=list(benchmark.RANDOM_CONFIGS))
    p.add_argument("--layers", type=int, help="fewer blocks (quick looks; the reported curve uses the full depth)")
    p.add_argument("--presets", default=",".join(PRESETS))
    p.add_argument("--m", default=",".join(map(str, MS)), help="tokens per forward, comma-separated")
    p.add_argument("--ttft", default="128,2048", help="prompt lengths for the time-to-first-token table ('' for none)")
    p.add_argument("--no-fp", action="store_true", help="skip the FP16 rows (already in OUT.json, with --resume)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--resume", action="store_true", help="keep OUT.json's points and add these")
    p.add_argument("--replot", action="store_true", help="only rewrite OUT.md and OUT.png from OUT.json")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    out = Path(args.out)
    if args.replot:
        old = json.loads(out.with_suffix(".json").read_text())
        return report(old["points"], [], old["meta"], out)
    from zeroquant.api import quantize

    out.parent.mkdir(parents=True, exist_ok=True)
    presets, ms = args.presets.split(","), [int(m) for m in args.m.split(",") if m]
    ttfts = [int(n) for n in args.ttft.split(",") if n]
    base = benchmark.BenchSettings(config=args.config, layers=args.layers, reps=args.reps, device=args.device,
                                   presets=presets)
    old = json.loads(out.with_suffix(".json").read_text()) if args.resume and out.with_suffix(".json").exists() else {}
    points = old.get("points", [])
    meta = {"config": args.config, "layers": args.layers, "device": benchmark.device_name(base),
            "torch": torch.__version__, "reps": args.reps,
            "command": " ".join(["python bench/m_sweep.py", *sys.argv[1:]])}
    for preset in ([] if args.no_fp else ["fp16"]) + presets:
        model = benchmark.build_model(base)
        if preset != "fp16":
            model = quantize(model, preset, inplace=True, progress=False)
        for kind, m in [("sweep", m) for m in ms] + [("ttft", n) for n in ttfts]:
            measured = measure_point(model, base, m) if kind == "sweep" else measure_ttft(model, base, m)
            r = {"preset": preset, **measured}
            points = [q for q in points if (q["preset"], q["m"], q.get("kind", "sweep")) != (preset, m, kind)] + [r]
            print(json.dumps(r), flush=True)
            out.with_suffix(".json").write_text(json.dumps({"meta": meta, "points": points}, indent=2))
        del model
        benchmark._free()
    report(points, presets, meta, out)


def report(points: list[dict], presets: list[str], meta: dict, out: Path) -> None:
    """OUT.md (the table) and OUT.png (the curve) from every point measured so far."""
    every_m = sorted({q["m"] for q in sweep_points(points)})
    every_preset = list(dict.fromkeys(x for x in PRESETS + presets if any(q["preset"] == x for q in points)))
    depth = f", {meta['layers']} blocks" if meta["layers"] else ""
    title = f"{meta['config']}{depth}, {meta['device']}"
    text = f"{title}, torch {meta['torch']}, every row compiled, median of {meta.get('reps', '?')}\n\n"
    text += f"```\n{meta['command']}\n```\n\n" if meta.get("command") else ""
    text += table(points, every_preset, every_m) + "\n"
    ttft = ttft_table(points, every_preset)
    text += f"\nTime to the first token, compiled and graphed prompt:\n\n{ttft}\n" if ttft else ""
    out.with_suffix(".md").write_text(text)
    plotted = plot(points, every_preset, out.with_suffix(".png"), title)
    print(text + ("" if plotted else "(no plot: matplotlib is not installed; pip install .[bench])"))


if __name__ == "__main__":
    main()
