"""W8A8 variants against FP and torchao on one model and one text, each row with its minutes: w8a8 (ZeroQuant),
+ SmoothQuant smoothing, + LKD, + both, and torchao's int8 dynamic-activation x int8-weight on the same block
linears. Perplexity for causal LMs, mean cosine to the FP embeddings for encoders.

    # SmolLM2-135M, first 8,176 wikitext-2 test tokens in 512-token windows, CPU
    python bench/w8a8_table.py --model SMOL.gguf --text ../shared/assets/wikitext-2/test.txt \
        --calib ../shared/assets/wikitext-2/valid.txt --max-tokens 8176 --seq-len 512 \
        --out bench/results/w8a8_smollm2_cpu
    # all-MiniLM-L6-v2, 2,000 sentences
    python bench/w8a8_table.py --model MINILM_DIR --text ../shared/assets/wikitext-2/test.txt \
        --calib ../shared/assets/wikitext-2/valid.txt --out bench/results/w8a8_minilm

torchao rows need `pip install torchao` (they fail with that message in their row otherwise). OUT.json is written
after every row (--resume keeps an earlier run's rows), OUT.md at the end.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from pathlib import Path

import torch

import zeroquant as zq
from zeroquant.models.hf import is_causal_lm
from zeroquant.tools.evaluate import EvalSettings, evaluate_model, format_table, read_text
from zeroquant.tools.peers import torchao_quantize

ROWS = ["fp", "w8a8", "w8a8+smooth", "w8a8 lkd", "w8a8+smooth lkd", "torchao-int8dq"]
# torchao's INT8 paths are built for bfloat16: on an fp16 model its int8dq row gave NaN perplexity (H200), so on
# CUDA its rows run on a bfloat16 copy, against the FP model's own bfloat16 row
PEER_DTYPE = {"cuda": torch.bfloat16}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model directory or .gguf file")
    p.add_argument("--text", required=True, help="evaluation text file")
    p.add_argument("--calib", required=True, help="calibration / smoothing / LKD text (never the evaluation text)")
    p.add_argument("--seq-len", type=int, default=None, help="causal LM perplexity window")
    p.add_argument("--max-tokens", type=int, default=None, help="causal LM: cap on evaluated tokens")
    p.add_argument("--max-sentences", type=int, default=2000, help="encoder sentences")
    p.add_argument("--samples", type=int, default=128, help="calibration / LKD sequences (default 128)")
    p.add_argument("--data-len", type=int, default=128, help="their length in tokens (default 128)")
    p.add_argument("--lkd-steps", type=int, default=200)
    p.add_argument("--lkd-lr", type=float, default=None, help="LKDConfig.lr (default 1/steps)")
    p.add_argument("--rows", help=f"comma-separated rows to run (default: all of {', '.join(ROWS)})")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--resume", help="JSON of an earlier run: its rows are kept and not re-run")
    p.add_argument("--out", required=True, help="output prefix: OUT.json, OUT.md")
    args = p.parse_args()

    torch.manual_seed(0)
    model, tok = zq.load_fp_model(args.model, args.device)
    text = read_text(args.text)
    settings = EvalSettings(max_sentences=args.max_sentences, max_tokens=args.max_tokens, seq_len=args.seq_len,
                            progress=False)
    t0 = time.perf_counter()
    calib = zq.lkd_batches(args.calib, model, tok, args.samples, args.data_len)
    data_min = (time.perf_counter() - t0) / 60
    lkd = zq.LKDConfig(steps=args.lkd_steps, lr=args.lkd_lr)
    meta = {"model": str(args.model), "text": args.text, "calib": args.calib, "samples": args.samples,
            "data_len": args.data_len, "seq_len": args.seq_len, "max_tokens": args.max_tokens,
            "max_sentences": args.max_sentences, "lkd": vars(lkd), "device": args.device, "data_min": data_min,
            "device_name": (torch.cuda.get_device_name() if args.device.startswith("cuda")
                            else platform.processor() or platform.machine()),
            "torch": torch.__version__}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows: dict[str, dict] = {}
    if args.resume and Path(args.resume).exists():
        rows = {r["scheme"]: r for r in json.loads(Path(args.resume).read_text())["rows"]}
    wanted = args.rows.split(",") if args.rows else ROWS

    def save() -> None:
        kept = [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows.values()]
        out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": kept}, indent=2))

    ref = rows.get("fp")
    if ref is None or "_emb" not in ref and not is_causal_lm(model):  # encoders need the FP embeddings
        t0 = time.perf_counter()
        ref = {"scheme": "fp", **evaluate_model(model, tok, text, settings)}
        ref["eval_min"] = (time.perf_counter() - t0) / 60
        rows["fp"] = ref
        save()
    peer_dtype = PEER_DTYPE.get(torch.device(args.device).type)
    if peer_dtype is not None and any(n.startswith("torchao-") for n in wanted) and "fp-bf16" not in wanted:
        wanted = ["fp-bf16", *wanted]
    for name in wanted:
        if name in rows:
            continue
        t0 = time.perf_counter()
        row = {"scheme": name}
        try:
            if name == "fp-bf16":
                q = copy.deepcopy(model).to(torch.bfloat16)
            elif name.startswith("torchao-"):
                q = torchao_quantize(model, name, dtype=peer_dtype)
            else:
                preset, _, method = name.partition(" ")
                q = zq.quantize(model, preset, calib_data=calib, tokenizer=tok, lkd=lkd if method == "lkd" else None,
                                progress=False)
            t1 = time.perf_counter()
            row.update(evaluate_model(q, tok, text, settings, reference=ref))
            row.update(quant_min=(t1 - t0) / 60, eval_min=(time.perf_counter() - t1) / 60)
            if name.startswith("torchao-"):  # its weights are tensor subclasses whose storage is not counted here
                row.pop("weights_mb", None)
            if "ppl" in row:
                base = rows["fp-bf16"] if name.startswith("torchao-") and "fp-bf16" in rows else ref
                row["ppl_vs_fp"] = row["ppl"] / base["ppl"]
            del q
        except Exception as e:  # noqa: BLE001 - a failed row keeps its error; the others still run
            row["error"] = f"{type(e).__name__}: {e}".splitlines()[0]
        rows[name] = row
        print(json.dumps({k: v for k, v in row.items() if not k.startswith("_")}), flush=True)
        save()
    table = format_table(list(rows.values()))
    head = (f"{meta['model']} on {meta['text']} ({meta['device_name']}, torch {meta['torch']}); calibration, smoothing "
            f"and LKD data: {args.samples} x {args.data_len} tokens of {meta['calib']}; LKD {lkd.steps} steps/block")
    out.with_suffix(".md").write_text(head + "\n\n" + table + "\n")
    print(head + "\n\n" + table)


if __name__ == "__main__":
    main()
