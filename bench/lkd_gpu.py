"""Wall time and peak GPU memory of LKD: the real MiniLM (when --minilm is given) and GPT-2-medium/large
shaped models with random weights. The model stays on the CPU; LKD moves one block at a time.

    python bench/lkd_gpu.py [--minilm DIR] [--steps 50] [--seqs 64] [--seq-len 256]
"""

import argparse
import json
import os
import time
from pathlib import Path

import torch
import transformers as T

import zeroquant as zq

SHAPES = {
    "gpt2-medium": dict(n_embd=1024, n_layer=24, n_head=16),
    "gpt2-large": dict(n_embd=1280, n_layer=36, n_head=20),
}


def run(name, model, ids, steps, preset):
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    q = zq.quantize(model, preset, calib_data=ids, calib_batch_size=8,
                    lkd=zq.LKDConfig(steps=steps, device="cuda"), progress=False)
    torch.cuda.synchronize()
    wall = time.perf_counter() - t
    blocks = len(q.zeroquant_lkd)
    row = {"model": name, "preset": preset, "blocks": blocks, "steps_per_block": steps,
           "sequences": ids.shape[0], "seq_len": ids.shape[1], "wall_s": wall,
           "s_per_block": wall / blocks, "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20,
           "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
           "mse_recovered_mean": sum(r["recovered"] for r in q.zeroquant_lkd) / blocks}
    print(row)
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--minilm", default=None)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--seqs", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--preset", default="w4/8-a8")
    args = ap.parse_args()
    torch.manual_seed(0)
    rows = []
    if args.minilm:
        m = T.AutoModel.from_pretrained(args.minilm).float().eval()
        ids = torch.randint(1000, m.config.vocab_size, (args.seqs, 128))
        rows.append(run("all-MiniLM-L6-v2 (fp32)", m, ids, args.steps, args.preset))
    for name, shape in SHAPES.items():
        m = T.GPT2LMHeadModel(T.GPT2Config(vocab_size=50257, n_positions=1024, **shape)).half().eval()
        ids = torch.randint(0, 50257, (args.seqs, args.seq_len))
        rows.append(run(f"{name} (random, fp16)", m, ids, args.steps, args.preset))
        del m
    dev = torch.cuda.get_device_name()
    out = Path(os.environ.get("OUT", "bench/results"))
    out.mkdir(parents=True, exist_ok=True)
    lines = ["| model | params (M) | blocks | steps/block | data | wall s | s/block | peak GPU MiB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['params_m']:.0f} | {r['blocks']} | {r['steps_per_block']} | "
                     f"{r['sequences']}x{r['seq_len']} | {r['wall_s']:.1f} | {r['s_per_block']:.2f} | "
                     f"{r['peak_gpu_mib']:.0f} |")
    table = "\n".join(lines)
    (out / "lkd_gpu.json").write_text(json.dumps({"device": dev, "rows": rows}, indent=2))
    (out / "lkd_gpu.md").write_text(f"device: {dev}\n\n{table}\n")
    print(f"device: {dev}\n{table}")


if __name__ == "__main__":
    main()
