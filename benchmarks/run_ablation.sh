#!/usr/bin/env bash
# The ablation of docs/results.md: every lever of the default on and off, on SmolLM2-135M, calibrated
# on Wikipedia text (gensim), WikiText-2 test perplexity at length 128 (first 100 windows).
# Runs are appended to the JSON as they finish; a rerun skips those already there.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/ablation.json}
COMMON=(--out "$OUT" --windows-128 100)
.venv/bin/python benchmarks/ablation.py "${COMMON[@]}" --ratios 0.2 0.5 --dense \
  --variant "default:" \
  --variant "parallel:calibration_mode=parallel" \
  --variant "bias-compensation:compensation=bias" \
  --variant "heads-same-fraction:head_ratio=None"
.venv/bin/python benchmarks/ablation.py "${COMMON[@]}" --ratios 0.2 \
  --variant "no-compensation:compensation=none" \
  --variant "refit-dense-target:refit_target=dense" \
  --variant "block-adaptive:allocation=block-adaptive" \
  --variant "block-adaptive-L-none:allocation=block-adaptive,lipschitz=none" \
  --variant "block-adaptive-L-exact:allocation=block-adaptive,lipschitz=exact" \
  --variant "global-adaptive:allocation=global-adaptive" \
  --variant "flap-allocation:allocation=flap"
