"""What LKD costs at Llama-7B's shape: seconds and peak GPU memory per block at the default data (128 x 2048
tokens, 200 steps a block), on the first few blocks of a randomly initialised Llama-7B-shaped model (fp16,
kept on the host: the block runner moves one block at a time), extrapolated to all 32 blocks.

    python bench/lkd_gpu.py [--blocks 4] [--presets w4/8-a8,w4/8-a8+gptq] [--out bench/results/lkd_llama7b]

Random weights measure time and memory, not accuracy. Writes OUT.json after every row and OUT.md at the end.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import transformers as T

import zeroquant as zq

LLAMA_7B = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                vocab_size=32000, max_position_embeddings=4096, num_hidden_layers=32)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--blocks", type=int, default=4, help="blocks built and timed (of the real 32)")
    p.add_argument("--presets", default="w4/8-a8,w4/8-a8+gptq")
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--out", default="bench/results/lkd_llama7b")
    args = p.parse_args()
    torch.manual_seed(0)
    cfg = T.LlamaConfig(**{**LLAMA_7B, "num_hidden_layers": args.blocks})
    model = T.LlamaForCausalLM(cfg).half().eval()
    ids = torch.randint(0, cfg.vocab_size, (args.samples, args.seq_len), generator=torch.Generator().manual_seed(0))
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "shape": LLAMA_7B,
            "blocks_timed": args.blocks, "data": f"{args.samples} x {args.seq_len} random tokens",
            "lkd": vars(zq.LKDConfig(steps=args.steps))}
    rows = []
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for preset in args.presets.split(","):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        q = zq.quantize(model, preset, calib_data=ids, lkd=zq.LKDConfig(steps=args.steps), progress=False)
        torch.cuda.synchronize()
        wall = time.perf_counter() - t
        blocks = q.zeroquant.lkd
        per_block = sum(r["seconds"] for r in blocks) / len(blocks)
        rows.append({"preset": preset, "wall_s": wall, "s_per_block": per_block,
                     "blocks": [{k: r.get(k) for k in ("block", "seconds", "peak_gib", "best_step")} for r in blocks],
                     "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
                     "extrapolated_32_min": (wall + (32 - args.blocks) * per_block) / 60})
        print(json.dumps(rows[-1]), flush=True)
        out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
        del q
    lines = [f"{meta['device']}, torch {meta['torch']}; Llama-7B shape (random fp16 weights), first {args.blocks} of "
             f"32 blocks; LKD data {meta['data']}, {args.steps} steps a block (defaults)", "",
             "| preset + LKD | wall s (blocks timed) | s / block | peak GPU GiB | 32 blocks, min (extrapolated) |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['preset']} | {r['wall_s']:.1f} | {r['s_per_block']:.1f} | {r['peak_gib']:.1f} | "
                     f"{r['extrapolated_32_min']:.1f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
