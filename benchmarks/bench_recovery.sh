#!/usr/bin/env bash
# LoRA recovery on SmolLM2-135M pruned by 50% with the default llm-bip recipe: a short CPU run
# (LoRA on Wikipedia text from gensim), WikiText-2 test perplexity at length 128 before and after.
#   bash benchmarks/bench_recovery.sh            (results in benchmarks/results/recovery.json)
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${WORK:-$(mktemp -d)}
STEPS=${STEPS:-40}
WIKITEXT=../shared/data/wikitext-2-raw/wiki.test.raw
.venv/bin/llm-bip prune --ratio 0.5 --output "$WORK/s50" --eval none --quiet
.venv/bin/python -c "from llm_bip.data import load_text; open('$WORK/wiki.txt', 'w').write(load_text('wikipedia'))"
.venv/bin/llm-bip recover --model "$WORK/s50" --data "$WORK/wiki.txt" --output "$WORK/s50-lora" \
  --max-steps "$STEPS" --batch-size 8 --micro-batch-size 4 --cutoff-len 256 --val-set-size 64 \
  --warmup-steps 5 --lr 2e-4 --eval "$WIKITEXT" --eval-seq-len 128 --eval-max-windows 100 \
  --report benchmarks/results/recovery.json --quiet
