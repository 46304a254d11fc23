"""Scores through a norm after the sub-layer (Gemma 2/3): how well llm-bip's channel and head scores
track the true block-output change of removing one FFN channel or one query head, against the plain
pre-norm scores ||W_down[:,k] a_k|| and ||W_o[:, cols(h)] o_h|| that ignore the norm (docs/method.md,
"Norms after the sub-layers").

Per block, on the dense model's activations: the true ||Δy|| of removing each of `--channels` random
channels (N_f(f) - N_f(f - W_k a_k), exact, f the down_proj output) and of each head (N_a(u) - N_a(u - W_h o_h),
the attention branch's change alone), the library's scores (lipschitz none), and the plain ones.

    python benchmarks/post_norm_scores.py --model gemma-3-270m-q4_k_m.gguf --out benchmarks/results/post_norm_scores.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from scipy.stats import spearmanr

from llm_bip import api
from llm_bip.activations import capture_block_inputs, run_block
from llm_bip.scoring import make_scorer
from llm_bip.scoring.base import BlockGeometry
from llm_bip.stats import StatsRequest, collect_block_stats


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--text", default="../shared/data/wikitext-2-raw/wiki.test.raw")
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--channels", type=int, default=256)
    parser.add_argument("--out", default="benchmarks/results/post_norm_scores.json")
    args = parser.parse_args()
    lm = api.load(args.model, weights_dtype="float32")
    samples, _ = api.calibrate(lm, args.text, args.samples, args.seq_len)
    scorer = make_scorer("llm-bip", lipschitz="none")
    generator = torch.Generator().manual_seed(0)
    rows = []
    with torch.no_grad():
        inputs = capture_block_inputs(lm.model, lm.adapter, samples, args.samples)
        for layer, block in enumerate(lm.adapter.blocks(lm.model)):
            parts = lm.adapter.parts(block)
            caught: dict[str, list] = {"o": [], "d": []}
            hooks = [parts.o_proj.register_forward_hook(lambda _m, a, out, c=caught: c["o"].append((a[0], out))),
                     parts.down_proj.register_forward_hook(lambda _m, a, out, c=caught: c["d"].append((a[0], out)))]
            run_block(block, inputs, layer=layer, keep_outputs=False)
            for hook in hooks:
                hook.remove()
            stats, outputs = collect_block_stats(block, parts, inputs, StatsRequest(), layer)
            scores = scorer.score_block(parts, stats, BlockGeometry(layer, lm.adapter.head_dim, lm.adapter.widths(block)))
            x, u = (torch.cat([t[i].reshape(-1, t[i].shape[-1]) for t in caught["o"]]).float() for i in (0, 1))
            a, f = (torch.cat([t[i].reshape(-1, t[i].shape[-1]) for t in caught["d"]]).float() for i in (0, 1))
            norm_f, norm_a = parts.ffn_output_norm, parts.attn_output_norm
            w_down, w_o = parts.down_proj.weight.float(), parts.o_proj.weight.float()
            picked = torch.randperm(w_down.shape[1], generator=generator)[: args.channels]
            base = norm_f(f)
            true_c = torch.stack([(base - norm_f(f - a[:, k : k + 1] * w_down[:, k])).norm() for k in picked])
            plain_c = w_down[:, picked].norm(dim=0) * a[:, picked].norm(dim=0)
            ours_c = scores.channels[picked]
            hd, added = lm.adapter.head_dim, norm_a(u)
            true_h, plain_h = [], []
            for h in range(x.shape[1] // hd):
                d = x[:, h * hd : (h + 1) * hd] @ w_o[:, h * hd : (h + 1) * hd].T
                true_h.append((added - norm_a(u - d)).norm())
                plain_h.append(d.norm())
            true_h, plain_h = torch.stack(true_h), torch.stack(plain_h)
            k = max(1, len(picked) // 5)
            weakest = set(true_c.argsort()[:k].tolist())

            def overlap(s: torch.Tensor, weakest=weakest, k=k) -> float:
                return len(set(s.argsort()[:k].tolist()) & weakest) / k

            rows.append({
                "layer": layer,
                "channel_spearman": {"llm-bip": spearmanr(ours_c, true_c)[0], "pre-norm": spearmanr(plain_c, true_c)[0]},
                "weakest_20pct_overlap": {"llm-bip": overlap(ours_c), "pre-norm": overlap(plain_c)},
                "channel_score_over_true_median": {"llm-bip": float((ours_c / true_c).median()),
                                                   "pre-norm": float((plain_c / true_c).median())},
                "head_score_over_true": {"llm-bip": (scores.heads / true_h).tolist(), "pre-norm": (plain_h / true_h).tolist()},
            })
            r = rows[-1]
            print(f"{layer:2d} spearman {r['channel_spearman']['llm-bip']:.3f} / {r['channel_spearman']['pre-norm']:.3f}  "
                  f"weakest-20% {r['weakest_20pct_overlap']['llm-bip']:.2f} / {r['weakest_20pct_overlap']['pre-norm']:.2f}  "
                  f"channel score/true {r['channel_score_over_true_median']['llm-bip']:.3f} / "
                  f"{r['channel_score_over_true_median']['pre-norm']:.3g}  head score/true "
                  f"{min(r['head_score_over_true']['llm-bip']):.2f}-{max(r['head_score_over_true']['llm-bip']):.2f} / "
                  f"{min(r['head_score_over_true']['pre-norm']):.3g}-{max(r['head_score_over_true']['pre-norm']):.3g}")
            inputs = outputs
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"model": args.model, "samples": args.samples, "seq_len": args.seq_len,
                                          "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
