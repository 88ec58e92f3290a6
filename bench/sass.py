"""Which instructions did Triton emit? Walks a Triton cache and reports, per compiled GEMM variant, the
tensor-core instructions (HGMMA = wgmma, IMMA/HMMA = mma.sync), local-memory traffic (spills) and
registers, from the SASS (cuobjdump ships with Triton). Run after bench/kernel_table.py or any GEMM use:

    TRITON_CACHE_DIR=.triton-cache python bench/sass.py [--json FILE]
"""

import argparse
import collections
import json
import os
import re
import subprocess
from pathlib import Path

import triton


def tool(name: str) -> str:
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def inspect(cubin: Path) -> dict:
    sass = subprocess.run([tool("cuobjdump"), "-sass", str(cubin)], capture_output=True, text=True).stdout
    res = subprocess.run([tool("cuobjdump"), "-res-usage", str(cubin)], capture_output=True, text=True).stdout
    count = lambda op: len(re.findall(rf"\b{op}\b", sass))
    usage = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", res))
    meta = json.loads(cubin.with_suffix(".json").read_text()) if cubin.with_suffix(".json").exists() else {}
    return {"kernel": cubin.stem, "num_warps": meta.get("num_warps"), "num_stages": meta.get("num_stages"),
            "HGMMA": count("HGMMA"), "IMMA": count("IMMA"), "HMMA": count("HMMA"), "STL": count("STL"),
            "LDL": count("LDL"), **{k: int(v) for k, v in usage.items()}}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--json")
    args = p.parse_args()
    cache = Path(os.environ.get("TRITON_CACHE_DIR", Path.home() / ".triton" / "cache"))
    rows = [inspect(f) for f in sorted(cache.rglob("*.cubin")) if "kernel" in f.stem]
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    by = collections.defaultdict(list)
    for r in rows:
        by[r["kernel"]].append(r)
    print("| kernel | variants | with HGMMA (wgmma) | with IMMA/HMMA (mma.sync) | spilling (STL) | max REG |")
    print("|---|---|---|---|---|---|")
    for k, rs in sorted(by.items()):
        print(f"| {k} | {len(rs)} | {sum(r['HGMMA'] > 0 for r in rs)} | {sum(r['IMMA'] + r['HMMA'] > 0 for r in rs)} "
              f"| {sum(r['STL'] > 0 for r in rs)} | {max(r.get('REG', 0) for r in rs)} |")


if __name__ == "__main__":
    main()
