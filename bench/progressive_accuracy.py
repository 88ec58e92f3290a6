"""What progressive INT4 scales cost in accuracy: each INT4 preset against the same preset with "+int8scale"
(integer group scales times a float row scale, zeroquant.core.quant.progressive_scale_zero, so that a W4A8 GEMM
can run its K loop as plain INT8 work), on a real model and real text; --gptq adds both with GPTQ rounding, --lkd
both distilled (layer-by-layer, from RTN).

    python bench/progressive_accuracy.py $(make -s smol-path) --text ../shared/assets/wikitext-2/test.txt \\
        --max-tokens 16384 --seq-len 512 --out bench/results/progressive_smollm2
    python bench/progressive_accuracy.py <all-MiniLM-L6-v2 dir> --text ../shared/assets/wikitext-2/test.txt \\
        --out bench/results/progressive_minilm
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

import zeroquant as zq
from zeroquant.tools.commands import _calib_data, _calib_texts
from zeroquant.tools.evaluate import EvalSettings, evaluate_model, format_table, read_text


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("--text", required=True)
    p.add_argument("--presets", default="w4/8-a8,w4a8,w4a16", help="INT4 presets")
    p.add_argument("--gptq", metavar="CALIB", help="also GPTQ-rounded rows, calibrated on this text")
    p.add_argument("--calib-samples", type=int, default=128)
    p.add_argument("--lkd", metavar="DATA", help="also LKD rows (from RTN), distilled on this text")
    p.add_argument("--lkd-samples", type=int, default=16)
    p.add_argument("--lkd-seq-len", type=int, default=512)
    p.add_argument("--lkd-steps", type=int, default=50)
    p.add_argument("--max-tokens", type=int, default=None)
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--max-sentences", type=int, default=2000)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    torch.manual_seed(0)
    fp, tok = zq.load_fp_model(args.model, "cpu")
    text = read_text(args.text)
    settings = EvalSettings(max_sentences=args.max_sentences, max_tokens=args.max_tokens, seq_len=args.seq_len,
                            progress=False)
    calib = None
    if args.gptq:
        calib = _calib_data(args.gptq, _calib_texts(args.gptq, args.calib_samples), args.calib_samples, fp, tok)
    lkd_data = lkd = None
    if args.lkd:
        lkd_data = zq.lkd_batches(args.lkd, fp, tok, args.lkd_samples, args.lkd_seq_len, seed=0)
        lkd = zq.LKDConfig(steps=args.lkd_steps)
    ref = evaluate_model(fp, tok, text, settings)
    rows = [{"scheme": "fp32", **ref}]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for preset in args.presets.split(","):
        for rounding in [""] + (["+gptq"] if calib is not None else []) + (["lkd"] if lkd else []):
            for scales in ("", "+int8scale"):
                name = preset + scales + ("+gptq" if rounding == "+gptq" else "")
                if rounding == "lkd":
                    q = zq.quantize(fp, name, calib_data=lkd_data, lkd=lkd, progress=False)
                    name += " + LKD"
                else:
                    q = zq.quantize(fp, name, calib_data=calib if rounding else None, progress=False)
                rows.append({"scheme": name, **evaluate_model(q, tok, text, settings, reference=ref)})
                print(format_table(rows[-1:]), flush=True)
                clean = [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]
                out.with_suffix(".json").write_text(json.dumps(
                    {"model": Path(args.model).name, "text": args.text, "settings": vars(args), "rows": clean},
                    indent=2))
    table = format_table(clean)
    command = "python bench/progressive_accuracy.py " + " ".join(sys.argv[1:])
    out.with_suffix(".md").write_text(f"{Path(args.model).name}, CPU, torch {torch.__version__}\n\n`{command}`\n\n"
                                      f"{table}\n")
    print(table)


if __name__ == "__main__":
    main()
