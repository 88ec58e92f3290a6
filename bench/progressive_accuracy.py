"""What two-level INT4 scales cost in accuracy: every INT4 linear re-quantized with progressive group scales
(zeroquant.core.quant.progressive_scale_zero: a float row scale times an integer group scale, so a W4A8 GEMM
can run its K loop as plain INT8 work) against today's float group scales, both round-to-nearest, same group
size, on a real model and real text. The progressive rows hold the same integers a kernel would read.

    python bench/progressive_accuracy.py $(make -s smol-path) --text ../shared/assets/wikitext-2/test.txt \\
        --max-tokens 16384 --seq-len 512 --out bench/results/progressive_smollm2
    python bench/progressive_accuracy.py <all-MiniLM-L6-v2 dir> --text ../shared/assets/wikitext-2/test.txt \\
        --out bench/results/progressive_minilm
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import zeroquant as zq
from zeroquant.core import quant as Q
from zeroquant.models.adapters import linear_weight
from zeroquant.tools.evaluate import EvalSettings, evaluate_model, format_table, read_text


def progressive(model: torch.nn.Module, fp: torch.nn.Module) -> int:
    """Re-quantize every INT4 linear of `model` from its FP weight in `fp` with progressive scales; returns
    how many it changed."""
    n = 0
    for name, ql in zq.quantized_modules(model).items():
        if ql.wq.bits != 4:
            continue
        w = linear_weight(fp.get_submodule(name)).detach()
        scale, zero, _, _ = Q.progressive_scale_zero(w, ql.group_size)
        ql.set_weight(w.to(ql.w_scale.device), scale, zero)
        n += 1
    return n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("--text", required=True)
    p.add_argument("--presets", default="w4/8-a8,w4a8,w4a16", help="INT4 presets (their scales kept in float32)")
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
    ref = evaluate_model(fp, tok, text, settings)
    rows = [{"scheme": "fp32", **ref}]
    for preset in args.presets.split(","):
        for kind in ("float group scales", "progressive"):
            q = zq.quantize(fp, f"{preset}+fp32scale", progress=False)
            changed = progressive(q, fp) if kind == "progressive" else 0
            row = {"scheme": f"{preset} {kind}", **evaluate_model(q, tok, text, settings, reference=ref)}
            row["int4_linears_requantized"] = changed
            rows.append(row)
            print(format_table(rows[-1:]), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    clean = [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]
    out.with_suffix(".json").write_text(json.dumps({"model": Path(args.model).name, "text": args.text,
                                                    "settings": vars(args), "rows": clean}, indent=2))
    table = format_table(clean)
    out.with_suffix(".md").write_text(f"{Path(args.model).name}, RTN, CPU, torch {torch.__version__}\n\n{table}\n")
    print(table)


if __name__ == "__main__":
    main()
