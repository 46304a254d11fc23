"""`llm-bip compare` on the command line."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from llm_bip.compare.recipes import _OVERRIDES, DEFAULT_METHODS, RECIPES, CompareConfig
from llm_bip.compare.run import check_runnable, compare
from llm_bip.config import RATIO_OF
from llm_bip.devices import DEVICE_CHOICES
from llm_bip.dtypes import COMPUTE_DTYPE_HELP, COMPUTE_DTYPES, WEIGHTS_DTYPE_HELP
from llm_bip.errors import LlmBipError
from llm_bip.plan import GQA_MODES


def add_arguments(p: argparse.ArgumentParser) -> None:
    from llm_bip.data import DEFAULT_CALIBRATION, DEFAULT_NUM_SAMPLES, DEFAULT_SEQ_LEN
    from llm_bip.loading import DEFAULT_MODEL, WEIGHTS_DTYPES

    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS),
                   help=f"recipes: {', '.join(RECIPES)}; overrides as name:key=value,key=value "
                        f"(keys: {', '.join(_OVERRIDES)})")
    p.add_argument("--ratios", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.5],
                   help="fractions of parameters to remove, each in [0, 1)")
    p.add_argument("--ratio-of", default="non-embedding", choices=RATIO_OF)
    p.add_argument("--gqa-mode", default="kv-groups", choices=GQA_MODES)
    p.add_argument("--model", default=DEFAULT_MODEL, help="hub id, model directory or .gguf file")
    p.add_argument("--dtype", default="auto", choices=COMPUTE_DTYPES, help=COMPUTE_DTYPE_HELP)
    p.add_argument("--weights-dtype", default="auto", choices=list(WEIGHTS_DTYPES), help=WEIGHTS_DTYPE_HELP)
    p.add_argument("--device", default="cpu", help=f"{DEVICE_CHOICES} (default cpu)")
    g = p.add_argument_group("calibration")
    g.add_argument("--calibration", default=DEFAULT_CALIBRATION)
    g.add_argument("--num-samples", type=int, default=DEFAULT_NUM_SAMPLES)
    g.add_argument("--seq-len", type=int, default=DEFAULT_SEQ_LEN)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--batch-size", type=int, default=8, help="also the batch of Taylor's gradient pass")
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval", nargs="+", default=["auto"],
                   help="evaluation texts: wikitext2 | ptb | c4 | lee | a text file; auto = wikitext2, or lee offline")
    g.add_argument("--eval-seq-len", type=int, nargs="+", default=[128, 2048])
    g.add_argument("--eval-max-windows", type=int, help="at most this many windows per text and length")
    g.add_argument("--eval-max-tokens", type=int,
                   help="token budget per text and length (windows = tokens // length), e.g. 40960")
    g.add_argument("--eval-batch-size", type=int, default=4)
    p.add_argument("--output", required=True, help="directory for the table and plots")
    p.add_argument("--overwrite", action="store_true", help="write into an output directory that has results")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def add_compare_parser(subparsers) -> argparse.ArgumentParser:
    """Register `llm-bip compare` on the main CLI's subparsers."""
    p = subparsers.add_parser("compare", help="several methods over several ratios: table, CSV, JSON and plots",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=cmd_compare)
    return p


def cmd_compare(args) -> None:
    from llm_bip import api
    from llm_bip.data import check_text_source, load_text, resolve_eval_sources, tokenize
    from llm_bip.outputs import check_output_dir

    config = CompareConfig(
        methods=tuple(args.methods), ratios=tuple(args.ratios), eval_seq_lens=tuple(args.eval_seq_len),
        eval_max_windows=args.eval_max_windows, eval_max_tokens=args.eval_max_tokens, eval_batch_size=args.eval_batch_size, ratio_of=args.ratio_of,
        gqa_mode=args.gqa_mode, batch_size=args.batch_size, dtype=args.dtype, seed=args.seed,
    )
    config.recipes()  # bad methods and ratios fail before the model loads
    check_text_source(args.calibration)
    out = check_output_dir(args.output, args.overwrite, (args.model, args.calibration, *args.eval))
    sources = resolve_eval_sources(args.eval)
    progress = not args.quiet
    lm = api.load(args.model, args.weights_dtype, args.device)
    check_runnable(lm, config.recipes(), config, (args.num_samples, args.seq_len))  # before calibration and scoring
    samples, info = api.calibrate(lm, args.calibration, args.num_samples, args.seq_len, args.seed)
    eval_ids = {api.short_name(s): tokenize(lm.tokenizer, load_text(s, split="test")) for s in sources}
    result = compare(lm, samples, config, eval_ids, out, info, progress)
    print(Path(result.files["markdown"]).read_text())
    print("wrote " + ", ".join(result.files.values()))


def main_compare(argv: list[str] | None = None) -> int:
    """`llm-bip compare` on its own (the same as the subcommand), for tests and scripts."""
    parser = argparse.ArgumentParser(prog="llm-bip compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        cmd_compare(args)
    except LlmBipError as exc:
        print(f"llm-bip: error: {exc}", file=sys.stderr)
        return 2
    return 0
