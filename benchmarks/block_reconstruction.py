"""Block-local reconstruction after the prune (a lever of the quality issue, development probe).

The default prune repairs each block in closed form: a least-squares refit of down_proj (and o_proj where
heads go) on the kept inputs. This probe measures what a few gradient steps on *all* of a pruned block's
weights add, block by block, front to back, with the calibration tokens the prune used: each block is
trained so that its output on the pruned model's stream matches the dense model's output of that block on
the dense stream (the refit-to-dense target of `two_stream.py`, here by Adam instead of least squares), or with
`--target local` the dense block's output on the pruned stream (what this block's own cut lost, nothing more).
The first `--held-out` calibration samples are not trained on; the block's relative output error on them,
before and after, is recorded per block, and a block whose held-out error grows keeps its old weights.

    python benchmarks/block_reconstruction.py out/smollm2-135m-20pct --lr 1e-3 --epochs 1 \\
        --out benchmarks/results/block_reconstruction_smollm2_20.json

The pruned model is one llm-bip saved (its record names the dense model and the calibration); perplexity
before and after on WikiText-2 @2048 (40 windows), WikiText-2 @128 and the Lee corpus @128 (150 windows).
The training and the error are the tool's own (`llm_bip.reconstruction`); `--target local` is what `llm-bip
prune --reconstruct` does inside the prune (there one calibration batch of the prune's --batch-size a step).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from llm_bip import api
from llm_bip.activations import capture_block_inputs, run_block
from llm_bip.reconstruction import Reconstruction, relative_error, train_block

ROOT = Path(__file__).resolve().parents[1]
WIKITEXT = str(ROOT.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw")
MEASURES = ((WIKITEXT, (2048, 128)), ("lee", (128,)))  # 40 windows at 2048, 150 at 128


def evaluate(loaded) -> dict[str, float]:
    results = {}
    for source, seq_lens in MEASURES:  # one tokenization per text
        r = api.evaluate(loaded, [source], list(seq_lens), max_windows=lambda n: 40 if n == 2048 else 150,
                         dtype="float32", progress=False)
        results.update({k: round(v["perplexity"], 3) for k, v in r.items()})
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pruned", help="a model llm-bip pruned and saved")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--epochs", type=float, default=1.0, help="passes over the training batches, per block")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--held-out", type=int, default=16, help="calibration samples measured on, not trained on")
    parser.add_argument("--target", choices=("dense-stream", "local"), default="dense-stream",
                        help="what a block's output is trained towards: the dense block's output on the dense "
                             "stream (it may also undo the error of the blocks before it), or the dense block's "
                             "output on the pruned stream (only what this block's cut lost)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.manual_seed(0)

    record = json.loads((Path(args.pruned) / "pruning_record.json").read_text())
    dense = api.load(record["model"], weights_dtype="float32")
    pruned = api.load(args.pruned, weights_dtype="float32")
    cal = record["calibration"]
    samples, _ = api.calibrate(dense, cal["source"], cal["num_samples"], cal["seq_len"], cal["seed"])
    result = {"pruned": args.pruned, "model": record["model"], "removed_fraction": record["removed_fraction"],
              "calibration": cal, "target": args.target, "lr": args.lr, "epochs": args.epochs, "batch_size": args.batch_size,
              "held_out_samples": args.held_out, "before": evaluate(pruned)}
    print("before", result["before"], flush=True)

    adapter = dense.adapter
    # The dense stream is only needed as the dense-stream target; the local target runs the dense block on the
    # pruned stream instead.
    x_dense = (capture_block_inputs(dense.model, adapter, samples, args.batch_size)
               if args.target == "dense-stream" else None)
    x_pruned = capture_block_inputs(pruned.model, pruned.adapter, samples, args.batch_size)
    batches = len(x_pruned.hidden)
    held = list(range(args.held_out // args.batch_size))
    train = list(range(len(held), batches))
    blocks, start = [], time.perf_counter()
    for layer, (dense_block, block) in enumerate(zip(adapter.blocks(dense.model), pruned.adapter.blocks(pruned.model),
                                                     strict=True)):
        if x_dense is not None:
            x_dense = run_block(dense_block, x_dense, layer=layer)  # the dense stream, one block on
        y_dense = (x_dense if x_dense is not None else run_block(dense_block, x_pruned, layer=layer)).hidden
        kwargs = x_pruned.kwargs_for(layer)
        before = relative_error(block, x_pruned.hidden, y_dense, kwargs, held)
        saved = {k: v.clone() for k, v in block.state_dict().items()}
        train_block(block, x_pruned.hidden, y_dense, kwargs, train, Reconstruction(args.lr, args.epochs), seed=layer)
        after = relative_error(block, x_pruned.hidden, y_dense, kwargs, held)
        kept = after < before
        if not kept:
            block.load_state_dict(saved)
        blocks.append({"block": layer, "held_out_error_before": round(before, 5), "held_out_error_after": round(after, 5),
                       "trained_weights_kept": kept})
        print(blocks[-1], f"{time.perf_counter() - start:.0f} s", flush=True)
        x_pruned = run_block(block, x_pruned, layer=layer)
    result["reconstruction_seconds"] = round(time.perf_counter() - start, 1)
    result["blocks"] = blocks
    result["after"] = evaluate(pruned)
    print("after", result["after"], flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
