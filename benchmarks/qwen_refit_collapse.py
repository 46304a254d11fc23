"""Why the default refit once destroyed Qwen2.5-Coder-0.5B (WikiText-2 ppl@128 83.8 -> 17,107,269 at 20%).

    python benchmarks/qwen_refit_collapse.py --gguf /tmp/llm-bip-bench/qwen-gguf/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf \\
        --out benchmarks/results/qwen_refit_collapse.json

Runs, each in a fresh process, the 20% default prune of Qwen2.5-Coder-0.5B (64 x 256 Wikipedia calibration
tokens, perplexity on 50 windows of 128 of WikiText-2):
- "before": the code before the fix (commit e65eb31, checked out into a git worktree): float32 weights,
  bf16 autocast around the whole prune;
- "before, float32 statistics": the same code with the statistics hooks and the refit's Gram products
  run with autocast off (everything else unchanged);
- "now": this checkout's default (bf16 weights, float32 statistics, guarded refit, no intercept where
  Qwen2's stock config has no bias). (No compensation, 110.2 in the issue, is the comparison's
  `llm-bip-nocomp` row.)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WIKITEXT = ROOT.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
BEFORE = "e65eb31"

CHILD = r'''
import json, sys, torch
variant, gguf, wikitext = sys.argv[1:4]
if variant.startswith("before, float32 statistics"):
    # The old hooks accumulated x^T x inside the bf16 autocast of the prune: run them without it.
    import llm_bip.stats as stats
    original = stats.collect_block_stats
    def collect(block, parts, inputs, request, layer=-1, group_width=0):
        hooks = [parts.o_proj, parts.down_proj]
        real_register = torch.nn.Module.register_forward_pre_hook
        def register(self, hook, **kw):
            if self in hooks:
                inner = hook
                def hook(m, args, inner=inner):
                    with torch.autocast("cpu", enabled=False):
                        return inner(m, args)
            return real_register(self, hook, **kw)
        torch.nn.Module.register_forward_pre_hook = register
        try:
            return original(block, parts, inputs, request, layer, group_width)
        finally:
            torch.nn.Module.register_forward_pre_hook = real_register
    stats.collect_block_stats = collect
    import llm_bip.pipeline as pipeline
    pipeline.collect_block_stats = collect  # (the refit itself solves in float64, which autocast leaves alone)
from llm_bip import api
from llm_bip.evaluation.perplexity import perplexity
if variant.startswith("now"):
    lm = api.load(gguf, weights_dtype="float32" if "float32 weights" in variant else "auto")
else:
    lm = api.load(gguf)
config = api.PruneConfig(ratio=0.2, compensation="none" if "no compensation" in variant else "refit")
samples, info = api.calibrate(lm, "wikipedia", 64, 256, 0)
result = api.prune(lm, config, samples, info, progress=False)
ppl = perplexity(lm.model, lm.tokenizer, wikitext, 128, 50, 16, "bfloat16", False)["perplexity"]
kept = result.report.get("compensation", {}).get("blocks") if isinstance(result.report.get("compensation"), dict) else None
print(json.dumps({"perplexity": ppl, "weights_dtype": str(next(lm.model.parameters()).dtype),
                  "compensation_per_block": kept}))
'''


def run(variant: str, gguf: Path, pythonpath: str | None) -> dict:
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    proc = subprocess.run([sys.executable, "-c", CHILD, variant, str(gguf), str(WIKITEXT)], capture_output=True, text=True,
                          env=env)
    if proc.returncode:
        return {"error": proc.stderr[-2000:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--worktree", default="/tmp/llm-bip-before-fix")
    args = parser.parse_args()
    worktree = Path(args.worktree)
    if not worktree.exists():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(worktree), BEFORE], check=True)
    old = str(worktree / "src")
    result = {"command": "python benchmarks/qwen_refit_collapse.py " + " ".join(sys.argv[1:]), "runs": {}}
    for variant, path in (("before", old), ("before, float32 statistics", old), ("now", None)):
        result["runs"][variant] = run(variant, Path(args.gguf), path)
        print(variant, {k: v for k, v in result["runs"][variant].items() if k != "compensation_per_block"}, flush=True)
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
