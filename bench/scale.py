"""Quantizing a model larger than the GPU and the host: a randomly initialised Llama (7B or 70B shape, or any
number of its blocks) saved as fp16 safetensors shards, quantized by the CLI one block at a time. Per row:
minutes, peak GPU memory, peak host RSS (the process's, over its libraries'), beside the shards' size, and the
quantized model's logits on a short prompt against quantizing the same FP model in memory (when it fits).

    # on one GPU: Llama-7B shape, w4/8-a8+gptq and with LKD
    python bench/scale.py --shape llama-7b --work /tmp/scale --text .data/valid.txt --out bench/results/scale_7b
    # the first 4 blocks of a Llama-70B shape, timed per block (extrapolate to 80)
    python bench/scale.py --shape llama-70b --layers 4 --work /tmp/scale --text .data/valid.txt \
        --out bench/results/scale_70b --no-compare
    # several GPUs (torchrun, NCCL): the same rows with 1 and 2 processes
    python bench/scale.py --shape llama-7b --nproc 1,2 ...

Random weights measure time and memory, not accuracy. The tokenizer comes from stories260K (ids < 512 fit every
shape's vocabulary). Writes OUT.json after every row and OUT.md at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

SHAPES = {
    "llama-7b": dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                     vocab_size=32000, num_hidden_layers=32),
    "llama-70b": dict(hidden_size=8192, intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8,
                      vocab_size=32000, num_hidden_layers=80),
    "tiny": dict(hidden_size=128, intermediate_size=352, num_attention_heads=4, num_key_value_heads=4,
                 vocab_size=1024, num_hidden_layers=4),
}
ROWS = {"rtn": ["--preset", "w4/8-a8"], "gptq": ["--preset", "w4/8-a8+gptq"],
        "gptq+lkd": ["--preset", "w4/8-a8+gptq", "--lkd"]}

MAKE = """
import json, sys, torch
from transformers import LlamaConfig, LlamaForCausalLM
cfg = LlamaConfig(**json.loads(sys.argv[2]), max_position_embeddings=4096, tie_word_embeddings=False)
with torch.device("meta"):
    m = LlamaForCausalLM(cfg)
dev = "cuda" if torch.cuda.is_available() and sys.argv[3] == "gpu" else "cpu"  # a GPU draws 7B numbers in seconds
m = m.to(torch.float16).to_empty(device=dev)
g = torch.Generator(dev).manual_seed(0)
for p in m.parameters():  # tensor by tensor keeps the float32 draw small
    p.data.copy_(torch.randn(p.shape, generator=g, device=dev) * 0.02 if p.dim() > 1 else torch.ones(p.shape))
head = cfg.hidden_size // cfg.num_attention_heads
m.model.rotary_emb.inv_freq = 1.0 / (10000 ** (torch.arange(0, head, 2).float() / head))
m.save_pretrained(sys.argv[1], max_shard_size="2GB")
"""

RUN = """
import json, os, resource, sys, time
import torch
from transformers import LlamaForCausalLM  # noqa: F401 - the baseline holds the libraries
import zeroquant.api  # noqa: F401
from zeroquant.tools.cli import main
base, t = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.perf_counter()
rc = main(sys.argv[1:])
out = {"rc": rc, "seconds": time.perf_counter() - t, "base_rss_kib": base,
       "peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}
if torch.cuda.is_available():
    out["peak_gpu_bytes"] = torch.cuda.max_memory_allocated()
with open(os.environ["SCALE_RESULT"] + "." + os.environ.get("RANK", "0"), "w") as f:
    json.dump(out, f)
"""


def make_model(shape: dict, path: Path, tokenizer_from: Path, on_gpu: bool) -> int:
    if not (path / "model.safetensors.index.json").exists() and not (path / "model.safetensors").exists():
        path.mkdir(parents=True, exist_ok=True)
        where = "gpu" if on_gpu else "cpu"
        subprocess.run([sys.executable, "-c", MAKE, str(path), json.dumps(shape), where], check=True)
        for f in tokenizer_from.glob("tokenizer*"):
            shutil.copy(f, path)
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def quantize(src: Path, out: Path, row: list[str], text: str, nproc: int, extra: list[str]) -> dict:
    args = ["quantize", str(src), *row, "-o", str(out), "--overwrite", *extra]
    args += ["--lkd-data", text] if "--lkd" in row else ["--calib", text] if "+gptq" in row[1] else []
    cmd = [sys.executable, "-c", RUN, *args]
    if nproc > 1:
        script = out.parent / "run_cli.py"
        script.write_text(RUN)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
               str(script), *args]
    t = time.perf_counter()
    result = out.parent / f"result-{out.name}"
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "SCALE_RESULT": str(result)})
    results = [json.loads(Path(f"{result}.{r}").read_text()) for r in range(nproc) if Path(f"{result}.{r}").exists()]
    if done.returncode or len(results) < nproc:
        error = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": error, "minutes": (time.perf_counter() - t) / 60}
    r = results[0]
    return {"minutes": (time.perf_counter() - t) / 60, "quantize_minutes": r["seconds"] / 60,
            "peak_gpu_gib": max(x.get("peak_gpu_bytes", 0) for x in results) / 2**30,
            "rss_growth_gib": max(x["peak_rss_kib"] - x["base_rss_kib"] for x in results) / 2**20}


def compare(src: Path, out: Path, row: list[str], text: str, device: str, extra: list[str]) -> dict | None:
    """The checkpoint the CLI wrote against quantizing the whole FP model in memory with the same data and settings
    (GPTQ rows only: the in-memory LKD would double the run), the latter saved and loaded back the same way so
    that both run the same kernels: integer tensors that differ, and the largest |logit difference|."""
    import torch

    import zeroquant as zq
    from zeroquant.tools.cli import build_parser
    from zeroquant.tools.commands import _calib_data, _calib_texts

    if "--lkd" in row:
        return None
    n = build_parser().parse_args(["quantize", str(src), "-o", "x", *row, *extra]).calib_samples
    fp, tok = zq.load_fp_model(src, device)
    calib = _calib_data(text, _calib_texts(text, n), n, fp, tok)
    mem = out.with_name(out.name + "-in-memory")
    zq.save_quantized(zq.quantize(fp, row[1], calib_data=calib, tokenizer=tok, progress=False, inplace=True), mem)
    del fp
    want, got = zq.load_quantized(mem, device=device), zq.load_quantized(out, device=device)
    a, b = want.state_dict(), got.state_dict()
    ints = [k for k in a if not a[k].is_floating_point()]
    ids = tok("Once upon a time there was a little girl", return_tensors="pt").input_ids.to(device)
    with torch.no_grad():
        diff = (want(ids).logits.float() - got(ids).logits.float()).abs().max().item()
    shutil.rmtree(mem, ignore_errors=True)
    return {"max_logit_diff_vs_in_memory": diff, "integer_tensors": len(ints),
            "integer_tensors_differing": sum(not torch.equal(a[k], b[k]) for k in ints)}


def markdown(meta: dict, rows: list[dict]) -> str:
    size, blocks = meta["fp16_shards_gib"], meta["config"]["num_hidden_layers"]
    depth = SHAPES.get(meta["shape"], {}).get("num_hidden_layers", blocks)
    part = blocks < depth  # the first blocks of a deeper shape: extrapolate the time to its whole depth
    lines = [f"{meta['shape']} ({blocks} blocks), fp16 shards {size:.1f} GiB, {meta['device']}, torch {meta['torch']}",
             "", "| row | processes | minutes | min / block | peak GPU GiB (of shards) | "
             "host RSS growth GiB (of shards) | "
             + (f"{depth} blocks, min (extrapolated) |" if part else
                "integer tensors differing from in-memory | max logit diff vs in-memory |"),
             "|---|---|---|---|---|---|" + ("---|" if part else "---|---|")]
    share = lambda gib: f"{gib:.2f} ({gib / size:.0%})"  # noqa: E731
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['row']} | {r['processes']} | {r['error']} | | | | | |")
            continue
        diff = r.get("max_logit_diff_vs_in_memory")
        ints = f"{r['integer_tensors_differing']} of {r['integer_tensors']}" if "integer_tensors" in r else ""
        tail = (f"{r['minutes'] - r['quantize_minutes'] + r['minutes_per_block'] * depth:.1f} |" if part else
                f"{ints} | {'' if diff is None else f'{diff:.2e}'} |")
        lines.append(f"| {r['row']} | {r['processes']} | {r['minutes']:.2f} | {r['minutes_per_block']:.3f} | "
                     f"{share(r['peak_gpu_gib'])} | {share(r['rss_growth_gib'])} | {tail}")
    return "\n".join(lines) + "\n"


def merge(parts: list[str], out: Path) -> None:
    """One table from the rows of runs split over several calls (each --rows a part), the first run's meta."""
    runs = [json.loads(Path(f).read_text()) for f in parts]
    meta, rows = runs[0]["meta"], [r for run in runs for r in run["rows"]]
    if any(run["meta"]["config"] != meta["config"] or run["meta"]["device"] != meta["device"] for run in runs):
        raise SystemExit("--merge takes runs of one shape on one device")
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    out.with_suffix(".md").write_text(markdown(meta, rows))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=list(SHAPES), default="llama-7b")
    p.add_argument("--layers", type=int, help="blocks to build (default: the shape's own)")
    p.add_argument("--work", help="where the FP shards and the checkpoints go")
    p.add_argument("--text", help="calibration / LKD text (wikitext-2 valid.txt)")
    p.add_argument("--rows", default="gptq,gptq+lkd")
    p.add_argument("--nproc", default="1", help="comma-separated process counts (torchrun above 1)")
    p.add_argument("--extra", default="", help="more CLI options, space-separated (e.g. --calib-samples 32)")
    p.add_argument("--lkd-steps", type=int, help="LKD rows only: steps a block (memory does not depend on it; "
                   "time per block grows about linearly with it)")
    p.add_argument("--no-compare", action="store_true", help="skip the in-memory logits check (needs the FP model)")
    p.add_argument("--stories", default="../shared/assets/stories260K", help="a directory with a tokenizer")
    p.add_argument("--merge", nargs="+", metavar="JSON", help="only write OUT from these runs' rows (split calls)")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    if args.merge:
        return merge(args.merge, Path(args.out))
    if not args.work or not args.text:
        p.error("--work and --text are required (except with --merge)")
    import torch

    shape = {**SHAPES[args.shape], **({"num_hidden_layers": args.layers} if args.layers else {})}
    work = Path(args.work)
    src = work / f"{args.shape}-{shape['num_hidden_layers']}"
    size = make_model(shape, src, Path(args.stories), torch.cuda.is_available())
    device = "cuda" if torch.cuda.is_available() else "cpu"
    meta = {"shape": args.shape, "config": shape, "fp16_shards_gib": size / 2**30, "text": args.text,
            "extra": args.extra, "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
            "torch": torch.__version__}
    rows, out = [], Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for name in args.rows.split(","):
        for n in map(int, args.nproc.split(",")):
            q = work / f"q-{name}-{n}"
            steps = ["--lkd-steps", str(args.lkd_steps)] if args.lkd_steps and "lkd" in name else []
            extra = args.extra.split() + steps
            r = {"row": name, "processes": n, "options": " ".join(ROWS[name] + extra),
                 **quantize(src, q, ROWS[name], args.text, n, extra)}
            if "error" not in r:
                r["minutes_per_block"] = r["quantize_minutes"] / shape["num_hidden_layers"]
            rows.append(r)
            print(json.dumps(r), flush=True)
            out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
            if "error" not in r and not args.no_compare and n == 1:  # after the row is on disk: it may be cut
                r.update(compare(src, q, ROWS[name], args.text, device, extra) or {})
                print(json.dumps(r), flush=True)
                out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    text = markdown(meta, rows)
    out.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
