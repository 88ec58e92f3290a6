#!/usr/bin/env bash
# The end-to-end runs behind bench/results/e2e_*.{json,md} (README "End to end"). Usage:
#   bench/e2e.sh NAME [extra zeroquant-bench args]
#   NAME: llama7b-b1 | llama7b-b16 | llama7b-prefill | bert-large   (HF-eager baselines, graph loop)
#         compile-b1 | compile-b16 | compile-prefill | compile-bert  (FP16 compile and torchao baselines)
# Writes to $OUT when set (the device tool), else bench/results. The compile-* runs need torchao importable.
set -euo pipefail
name=$1; shift
out=${OUT:-bench/results}
mkdir -p "$out"
case "$name" in
  llama7b-b1) args="--config llama-7b --batch 1 --prompt-len 128 --gen-len 64 --compile" ;;
  llama7b-b16) args="--config llama-7b --batch 16 --prompt-len 128 --gen-len 64 --no-save" ;;
  llama7b-prefill) args="--config llama-7b --batch 8 --prompt-len 512 --gen-len 0 --no-graph --no-save --reps 5
                         --preset w8a8,w8a8-g128,w4/8-a8,w4a16" ;;
  bert-large) args="--config bert-large --batch 32 --prompt-len 128 --compile --no-save --reps 10
                    --preset w8a8,w8a8-g128,w4/8-a8" ;;
  compile-b1) args="--config llama-7b --batch 1 --prompt-len 128 --gen-len 64 --no-eager --no-graph --compile
                    --no-save --preset w4a16,w8a8,w4/8-a8 --peer torchao-int4wo" ;;
  compile-b16) args="--config llama-7b --batch 16 --prompt-len 128 --gen-len 64 --no-eager --no-graph --compile
                     --no-save --preset w8a8,w4a16,w4/8-a8 --peer torchao-int4wo" ;;
  compile-prefill) args="--config llama-7b --batch 8 --prompt-len 512 --gen-len 0 --no-eager --compile --no-save
                         --reps 5 --preset w8a8 --peer torchao-int8dq --fp-compile-mode max-autotune-no-cudagraphs" ;;
  compile-bert) args="--config bert-large --batch 32 --prompt-len 128 --no-eager --compile --no-save --reps 10
                      --preset w8a8 --fp-compile-mode max-autotune-no-cudagraphs" ;;
  *) echo "unknown run $name" >&2; exit 2 ;;
esac
# shellcheck disable=SC2086
python -m zeroquant.cli bench --random-weights $args "$@" --json "$out/e2e_$name.json" --md "$out/e2e_$name.md"
