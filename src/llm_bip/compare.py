"""`llm-bip compare`: methods × ratios on one model and one calibration set, in one table and a few plots.

A method is a recipe: a scorer, an allocator, a compensation and a calibration mode. Scores are computed
once per scorer (a `ScoreTable`) and re-planned for every ratio on a fresh copy of the dense model;
recipes that share a scorer (llm-bip, llm-bip+bias) share its table. Sequential recipes (Wanda-sp, as
its source prunes a layer before computing the next one's inputs) cannot reuse scores: they score
while they prune, once per ratio.

    llm-bip compare --methods llm-bip flap wanda-sp taylor magnitude random --ratios 0.1 0.2 0.3 0.5 \\
        --eval wikitext2 --eval-seq-len 128 2048 --output compare/

A method may carry overrides: `llm-bip:allocation=global-adaptive,compensation=refit`.

Cost: scoring wall time, and peak resident memory above what the process held just before scoring
(the loaded model, its calibration samples and the dense copy). Peak RSS is measured in-process: freed
heap is handed back to the OS (malloc_trim), the kernel's high-water mark is reset through
/proc/self/clear_refs and read back as VmHWM afterwards; where that is not possible a 5 ms sampling
thread reads VmRSS instead. Each result says which.
"""

from __future__ import annotations

import argparse
import copy
import csv
import ctypes
import json
import logging
import math
import re
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from llm_bip.allocation import ALLOCATIONS, AllocationConfig, allocate
from llm_bip.compensation import add_output_bias, bias_shift
from llm_bip.errors import LlmBipError
from llm_bip.evaluation.perplexity import DTYPES, compute_context, perplexity, window_batch_size
from llm_bip.loading import LoadedModel
from llm_bip.params import block_costs, count_parameters
from llm_bip.pipeline import COMPENSATIONS, RATIO_OF, PruneConfig, prune, score, target_parameters
from llm_bip.plan import GQA_MODES, select
from llm_bip.score_table import ScoreTable
from llm_bip.scoring import SCORERS
from llm_bip.scoring.taylor import check_gradient_memory
from llm_bip.surgery import cut_block

log = logging.getLogger(__name__)

# LLM-Pruner keeps the first 4 and last 2 of LLaMA-7B's 32 layers dense; the same fractions of any depth.
LLM_PRUNER_DENSE_EDGES = (4 / 32, 2 / 32)


@dataclass(frozen=True)
class Recipe:
    """A method as the comparison runs it. `allocation` is an allocator of `allocation.ALLOCATIONS`
    or "flap" (FLAP's own, in scoring/flap.py); `dense_edges` keeps fractions of the first and last
    layers dense, as LLM-Pruner's layer range does."""

    name: str
    method: str
    allocation: str = "uniform"
    compensation: str = "none"
    calibration_mode: str = "parallel"
    dense_edges: tuple[float, float] | None = None
    # The baselines' sources prune heads and channels by the same fraction (None); llm-bip's default
    # takes FFN channels first (0.0), as its measured default.
    head_ratio: float | None = None
    overrides: tuple[tuple[str, object], ...] = ()

    def config(self, ratio: float, num_layers: int, ratio_of: str, gqa_mode: str, seed: int) -> PruneConfig:
        layers = None
        if self.dense_edges is not None:
            start = round(self.dense_edges[0] * num_layers)
            layers = tuple(range(start, num_layers - round(self.dense_edges[1] * num_layers)))
        base = PruneConfig(
            method=self.method, ratio=ratio, ratio_of=ratio_of, gqa_mode=gqa_mode, prunable_layers=layers,
            # An allocator the registry does not know yet (flap) is applied here, not by the pipeline.
            allocation=self.allocation if self.allocation in ALLOCATIONS else "uniform",
            compensation=self.compensation, calibration_mode=self.calibration_mode, seed=seed,
            head_ratio=self.head_ratio,
        )
        return replace(base, **dict(self.overrides))

    @property
    def own_allocator(self) -> bool:
        return self.allocation not in ALLOCATIONS

    @property
    def sequential(self) -> bool:
        return dict(self.overrides).get("calibration_mode", self.calibration_mode) == "sequential"


def _default_recipe(name: str, **changes) -> Recipe:
    d = PruneConfig()
    recipe = Recipe(name, d.method, d.allocation, d.compensation, d.calibration_mode, head_ratio=d.head_ratio)
    return replace(recipe, **changes)


RECIPES: dict[str, Recipe] = {
    "llm-bip": _default_recipe("llm-bip"),  # whatever PruneConfig's defaults are
    "llm-bip+bias": _default_recipe("llm-bip+bias", compensation="bias"),
    "llm-bip-nocomp": _default_recipe("llm-bip-nocomp", compensation="none"),
    "flap": Recipe("flap", "flap", allocation="flap", compensation="bias"),
    "wanda-sp": Recipe("wanda-sp", "wanda-sp", calibration_mode="sequential"),
    "taylor": Recipe("taylor", "taylor", dense_edges=LLM_PRUNER_DENSE_EDGES),
    "taylor-vector": Recipe("taylor-vector", "taylor-vector", dense_edges=LLM_PRUNER_DENSE_EDGES),
    "magnitude": Recipe("magnitude", "magnitude"),
    "random": Recipe("random", "random"),
}
DEFAULT_METHODS = ("llm-bip", "flap", "wanda-sp", "taylor", "magnitude", "random")

# Overrides a method spec may carry, and how to read their values.
_OVERRIDES = {
    "allocation": str, "compensation": str, "calibration-mode": str, "lipschitz": str, "gqa-mode": str,
    "head-ratio": float, "round-to": int, "max-block-ratio": float, "layers": str,
}


def parse_method(spec: str) -> Recipe:
    """'name' or 'name:key=value,key=value' → a recipe; fails with the known names and keys."""
    name, _, rest = spec.partition(":")
    if name not in RECIPES:
        raise LlmBipError(f"unknown method '{name}': choose from {', '.join(RECIPES)}")
    recipe = replace(RECIPES[name], name=spec)
    overrides: dict[str, object] = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq or key not in _OVERRIDES:
            raise LlmBipError(f"method '{spec}': '{item}' is not key=value with a key of {', '.join(_OVERRIDES)}")
        try:
            parsed = _OVERRIDES[key](value)
        except ValueError:
            raise LlmBipError(f"method '{spec}': {key} needs a {_OVERRIDES[key].__name__}, not '{value}'") from None
        if key == "allocation":
            recipe = replace(recipe, allocation=parsed)
            if parsed not in ALLOCATIONS and parsed != "flap":
                raise LlmBipError(f"method '{spec}': unknown allocation '{parsed}': use one of "
                                  f"{', '.join((*ALLOCATIONS, 'flap'))}")
        elif key == "layers":
            recipe = replace(recipe, dense_edges=None)
            overrides["prunable_layers"] = _layers(parsed, spec)
        else:
            overrides[key.replace("-", "_")] = parsed
    return replace(recipe, overrides=tuple(overrides.items()))


def _layers(text: str, spec: str) -> tuple[int, ...]:
    try:
        start, _, end = text.partition("-")
        return tuple(range(int(start), int(end))) if end else (int(start),)
    except ValueError:
        raise LlmBipError(f"method '{spec}': layers '{text}' is not a range like 4-28 (end exclusive)") from None


@dataclass(frozen=True)
class CompareConfig:
    methods: tuple[str, ...] = DEFAULT_METHODS
    ratios: tuple[float, ...] = (0.1, 0.2, 0.3, 0.5)
    eval_seq_lens: tuple[int, ...] = (128, 2048)
    eval_max_windows: int | None = None
    eval_max_tokens: int | None = None  # the same token budget at every length: windows = tokens // seq_len

    eval_batch_size: int = 4
    ratio_of: str = "non-embedding"
    gqa_mode: str = "kv-groups"
    batch_size: int = 8
    dtype: str = "bfloat16"
    seed: int = 0

    def windows(self, seq_len: int) -> int | None:
        limits = [n for n in (self.eval_max_windows, self.eval_max_tokens and self.eval_max_tokens // seq_len) if n]
        return min(limits) if limits else None

    def recipes(self) -> list[Recipe]:
        """Every method parsed and every ratio checked: bad input fails here, before any long work."""
        if not self.methods:
            raise LlmBipError(f"no methods given: choose from {', '.join(RECIPES)}")
        recipes = [parse_method(m) for m in self.methods]
        if len({r.name for r in recipes}) != len(recipes):
            raise LlmBipError("a method is listed twice")
        if not self.ratios:
            raise LlmBipError("no ratios given")
        for ratio in self.ratios:
            if not (isinstance(ratio, int | float) and 0 <= ratio < 1):
                raise LlmBipError(f"ratio {ratio} is outside [0, 1): give fractions of parameters to remove, e.g. 0.2")
        if self.ratio_of not in RATIO_OF:
            raise LlmBipError(f"unknown ratio-of '{self.ratio_of}': use one of {', '.join(RATIO_OF)}")
        if self.gqa_mode not in GQA_MODES:
            raise LlmBipError(f"unknown GQA mode '{self.gqa_mode}': use one of {', '.join(GQA_MODES)}")
        if self.dtype not in DTYPES:
            raise LlmBipError(f"unknown dtype '{self.dtype}': use one of {', '.join(DTYPES)}")
        if not self.eval_seq_lens or any(n < 2 for n in self.eval_seq_lens):
            raise LlmBipError("evaluation sequence lengths must be at least 2 tokens")
        for recipe in recipes:
            config = recipe.config(self.ratios[0], 1, self.ratio_of, self.gqa_mode, self.seed)
            if recipe.method not in SCORERS:
                raise LlmBipError(f"method '{recipe.name}' needs scorer '{recipe.method}', which is not registered")
            if config.compensation not in COMPENSATIONS:
                raise LlmBipError(f"method '{recipe.name}': unknown compensation '{config.compensation}'")
            if recipe.own_allocator and (config.compensation == "refit" or recipe.sequential):
                raise LlmBipError(f"method '{recipe.name}': the {recipe.allocation} allocator runs with parallel "
                                  "calibration and none/bias compensation only")
            if not recipe.own_allocator:
                replace(config, prunable_layers=None).validate()
        return recipes


@dataclass
class CompareResult:
    rows: list[dict]
    costs: list[dict]
    dense: dict
    files: dict[str, str] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------- memory


class PeakMemory:
    """Peak resident memory of this process inside a `with` block, above what it held on entry."""

    def __init__(self) -> None:
        self.start = self.peak = 0
        self.how = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakMemory:
        # No gc.collect(): a model copy dies by reference count (it holds no cycles), and a full collection
        # costs a quarter second per call once transformers is imported.
        _malloc_trim()  # freed heap stays resident otherwise, and would hide new allocations
        self.start = _status_kib("VmRSS") * 1024
        if _reset_high_water_mark():
            self.how = "VmHWM after reset via /proc/self/clear_refs"
        else:
            self.how = "VmRSS sampled every 5 ms"
            self.peak = self.start
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _status_kib("VmRSS") * 1024)

    def __exit__(self, *exc) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
        else:
            self.peak = _status_kib("VmHWM") * 1024

    @property
    def added(self) -> int:
        return max(0, self.peak - self.start)


def _status_kib(field_name: str) -> int:
    try:
        with open("/proc/self/status") as handle:
            match = re.search(rf"^{field_name}:\s+(\d+)", handle.read(), re.MULTILINE)
        return int(match.group(1)) if match else 0
    except OSError:
        return 0


def _reset_high_water_mark() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return _status_kib("VmHWM") > 0
    except OSError:
        return False


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


# ------------------------------------------------------------------------------------------- runs


def _fresh(loaded: LoadedModel) -> LoadedModel:
    return LoadedModel(copy.deepcopy(loaded.model), loaded.tokenizer, loaded.adapter, loaded.source)


def check_runnable(loaded: LoadedModel, recipes: list[Recipe], config: CompareConfig, samples_shape) -> None:
    """Every (method, ratio) can be planned on this model, and gradient methods fit in memory."""
    head_dim = loaded.adapter.head_dim(loaded.model)
    blocks = loaded.adapter.blocks(loaded.model)
    costs = [block_costs(loaded.adapter, b, head_dim) for b in blocks]
    counts = count_parameters(loaded.model, loaded.adapter)
    for recipe in recipes:
        if recipe.method.startswith("taylor"):
            check_gradient_memory(loaded, min(config.batch_size, samples_shape[0]), samples_shape[1])
        for ratio in config.ratios:
            c = recipe.config(ratio, len(blocks), config.ratio_of, config.gqa_mode, config.seed)
            if c.prunable_layers is not None and any(not 0 <= i < len(blocks) for i in c.prunable_layers):
                raise LlmBipError(f"method '{recipe.name}': layers {c.prunable_layers} do not exist in this "
                                  f"{len(blocks)}-layer model")
            alloc = AllocationConfig(strategy="uniform", gqa_mode=c.gqa_mode, prunable_layers=c.prunable_layers)
            try:
                allocate(costs, target_parameters(counts, c), alloc)  # the same bound every allocator has
            except LlmBipError as exc:
                raise LlmBipError(f"method '{recipe.name}' at ratio {ratio}: {exc}") from None


def _scorer_key(config: PruneConfig) -> tuple:
    scorer = config.scorer()
    return scorer.name, json.dumps(scorer.options(), sort_keys=True)


def _cut_with_own_allocator(lm: LoadedModel, table: ScoreTable, config: PruneConfig, allocation: str) -> None:
    """Plan with an allocator the pipeline does not know yet (FLAP's), then compensate and cut, as the
    pipeline does in parallel mode."""
    from llm_bip.scoring.flap import flap_allocate

    if allocation != "flap":
        raise LlmBipError(f"unknown allocation '{allocation}'")
    adapter, model = lm.adapter, lm.model
    target = target_parameters(count_parameters(model, adapter), config)
    widths = flap_allocate(table.costs, target, config.allocation_config(), table.scores)
    head_dim = adapter.head_dim(model)
    for layer, (block, s, w) in enumerate(zip(adapter.blocks(model), table.scores, widths, strict=True)):
        bp = select(s.heads, s.groups, s.channels, w, config.gqa_mode, layer)
        if config.compensation == "bias":
            parts = adapter.parts(block)
            cols = torch.tensor([h * head_dim + d for h in bp.keep_heads for d in range(head_dim)], dtype=torch.long)
            if len(cols) < parts.o_proj.in_features:
                add_output_bias(adapter, parts.o_proj, bias_shift(parts.o_proj.weight, s.attn_mean, cols))
            if len(bp.keep_channels) < parts.down_proj.in_features:
                keep = torch.tensor(bp.keep_channels, dtype=torch.long)
                add_output_bias(adapter, parts.down_proj, bias_shift(parts.down_proj.weight, s.ffn_mean, keep))
        cut_block(adapter, block, bp, head_dim)


def _evaluate(lm: LoadedModel, eval_ids: dict[str, torch.Tensor], config: CompareConfig, progress: bool) -> dict:
    out = {}
    for source, ids in eval_ids.items():
        for seq_len in config.eval_seq_lens:
            bs = window_batch_size(config.eval_batch_size, seq_len)
            r = perplexity(lm.model, lm.tokenizer, source, seq_len, config.windows(seq_len), bs, config.dtype,
                           progress, ids=ids)
            out[f"{source}@{seq_len}"] = r["perplexity"]
    return out


def compare(
    loaded: LoadedModel, samples: torch.Tensor, config: CompareConfig, eval_ids: dict[str, torch.Tensor],
    out_dir: str | Path, calibration: dict | None = None, progress: bool = True,
) -> CompareResult:
    """Run every method at every ratio on copies of `loaded` (left dense), evaluate, write the outputs.

    `eval_ids`: evaluation texts, already tokenized, by name ("wikitext2", "wiki.test", ...).
    """
    recipes = config.recipes()
    check_runnable(loaded, recipes, config, tuple(samples.shape))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    num_layers = len(loaded.adapter.blocks(loaded.model))
    before = count_parameters(loaded.model, loaded.adapter)

    dense_ppl = _evaluate(loaded, eval_ids, config, progress)
    rows: list[dict] = []
    costs: list[dict] = []
    tables: dict[tuple, tuple[ScoreTable, dict]] = {}
    bar = tqdm(total=len(recipes) * len(config.ratios), desc="compare", unit="run", disable=not progress)
    for recipe in recipes:
        cost = {"method": recipe.name, "score_seconds": 0.0, "peak_memory_mib": 0.0, "peak_rss_mib": 0.0,
                "scored": "once, re-planned per ratio", "memory_measure": ""}
        table = None
        if not recipe.sequential:
            key = _scorer_key(recipe.config(0.0, num_layers, config.ratio_of, config.gqa_mode, config.seed))
            if key not in tables:
                scorer = recipe.config(0.0, num_layers, config.ratio_of, config.gqa_mode, config.seed).scorer()
                with PeakMemory() as mem, compute_context(loaded.model, config.dtype):
                    start = time.perf_counter()
                    t = score(loaded, scorer, samples, config.batch_size, calibration, progress)
                    seconds = time.perf_counter() - start
                tables[key] = (t, {"score_seconds": seconds, "peak_memory_mib": mem.added / 2**20,
                                   "peak_rss_mib": mem.peak / 2**20, "memory_measure": mem.how, "owner": recipe.name})
            table, measured = tables[key]
            cost.update({k: v for k, v in measured.items() if k != "owner"})
            if measured["owner"] != recipe.name:
                cost["scored"] = f"shares the scores of {measured['owner']}"
        else:
            cost["scored"] = "while pruning, once per ratio (sequential): mean over ratios"
        seq_seconds, seq_peak, seq_rss = [], 0.0, 0.0
        for ratio in config.ratios:
            prune_config = recipe.config(ratio, num_layers, config.ratio_of, config.gqa_mode, config.seed)
            bar.set_postfix_str(f"{recipe.name} @ {ratio:g}")
            row = {"method": recipe.name, "ratio": ratio, "error": ""}
            lm = _fresh(loaded)
            try:
                with PeakMemory() as mem, compute_context(lm.model, config.dtype):
                    start = time.perf_counter()
                    if recipe.own_allocator:
                        _cut_with_own_allocator(lm, table, prune_config, recipe.allocation)
                    else:
                        prune(lm, prune_config, samples, config.batch_size, calibration, table, progress)
                    row["prune_seconds"] = time.perf_counter() - start
                if recipe.sequential:
                    seq_seconds.append(row["prune_seconds"])
                    seq_peak, seq_rss = max(seq_peak, mem.added / 2**20), max(seq_rss, mem.peak / 2**20)
                    cost["memory_measure"] = mem.how
                after = count_parameters(lm.model, lm.adapter)
                row.update(_sizes(before, after))
                row["perplexity"] = _evaluate(lm, eval_ids, config, progress)
            except LlmBipError as exc:  # one infeasible run should not lose the others
                row.update({"error": str(exc), "perplexity": {}, "prune_seconds": math.nan})
                log.warning("%s at ratio %g failed: %s", recipe.name, ratio, exc)
            rows.append(row)
            del lm  # frees the copy at once (reference count): one copy alive at a time
            bar.update(1)
        if recipe.sequential and seq_seconds:
            cost.update({"score_seconds": sum(seq_seconds) / len(seq_seconds), "peak_memory_mib": seq_peak,
                         "peak_rss_mib": seq_rss})
        costs.append(cost)
    bar.close()

    dense = {"method": "dense", "ratio": 0.0, "perplexity": dense_ppl, **_sizes(before, before)}
    result = CompareResult(rows=rows, costs=costs, dense=dense)
    result.files = write_outputs(result, out, config, {"model": loaded.source, "calibration": calibration or {}})
    return result


def _sizes(before: dict, after: dict) -> dict:
    removed = before["total"] - after["total"]
    return {
        "parameters": after["total"], "non_embedding_parameters": after["non_embedding"],
        "removed_non_embedding": removed / before["non_embedding"], "removed_total": removed / before["total"],
    }


# ---------------------------------------------------------------------------------------- outputs


def _fmt(x, digits: int = 2) -> str:
    if isinstance(x, float):
        return "–" if math.isnan(x) else f"{x:,.{digits}f}"
    return str(x)


def write_outputs(result: CompareResult, out: Path, config: CompareConfig, header: dict) -> dict[str, str]:
    """compare.json, compare.csv, compare.md, one perplexity plot per (text, length) and a cost plot."""
    from llm_bip.plots import cost_plot, perplexity_plot, safe_name

    keys = list(result.dense["perplexity"])
    all_rows = [result.dense, *result.rows]
    files: dict[str, str] = {}

    data = {**header, "config": asdict(config), "dense": result.dense, "rows": result.rows, "costs": result.costs}
    (out / "compare.json").write_text(json.dumps(data, indent=1, default=str))
    files["json"] = str(out / "compare.json")

    columns = ["method", "ratio", "removed_non_embedding", "removed_total", "parameters", *[f"ppl {k}" for k in keys],
               "prune_seconds", "error"]
    with open(out / "compare.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for r in all_rows:
            writer.writerow([r["method"], r["ratio"], r.get("removed_non_embedding", ""), r.get("removed_total", ""),
                             r.get("parameters", ""), *[r["perplexity"].get(k, "") for k in keys],
                             r.get("prune_seconds", ""), r.get("error", "")])
    files["csv"] = str(out / "compare.csv")

    lines = [
        f"# Comparison on {header['model']}", "",
        f"Calibration: {json.dumps(header['calibration'])}. Ratio = fraction of {config.ratio_of} parameters; "
        f"perplexity in {config.dtype}, windows per length: "
        f"{', '.join(f'{n}: {config.windows(n) or chr(0x2014)}' for n in config.eval_seq_lens)}.", "",
        "| method | ratio | removed (non-emb.) | removed (total) | parameters | "
        + " | ".join(f"ppl {k}" for k in keys) + " | prune s |",
        "|---|---|---|---|---|" + "---|" * len(keys) + "---|",
    ]
    for r in all_rows:
        ppl = [_fmt(r["perplexity"].get(k, math.nan)) for k in keys]
        removed = [f"{r[k]:.1%}" if k in r else "–" for k in ("removed_non_embedding", "removed_total")]
        note = f" ({r['error']})" if r.get("error") else ""
        lines.append(f"| {r['method']}{note} | {r['ratio']:g} | {removed[0]} | {removed[1]} | "
                     f"{r.get('parameters', 0):,} | " + " | ".join(ppl) + f" | {_fmt(r.get('prune_seconds', math.nan))} |")
    lines += ["", "## Cost of each method", "",
              "| method | scoring s | peak memory above loaded model (MiB) | peak RSS (MiB) | scored | measured by |",
              "|---|---|---|---|---|---|"]
    for c in result.costs:
        lines.append(f"| {c['method']} | {_fmt(c['score_seconds'])} | {_fmt(c['peak_memory_mib'], 0)} | "
                     f"{_fmt(c['peak_rss_mib'], 0)} | {c['scored']} | {c['memory_measure']} |")
    (out / "compare.md").write_text("\n".join(lines) + "\n")
    files["markdown"] = str(out / "compare.md")

    for key in keys:
        path = out / f"ppl_{safe_name(key)}.png"
        perplexity_plot(result.rows, key, result.dense["perplexity"].get(key), path, f"{header['model']}: {key}")
        files[f"plot {key}"] = str(path)
    files["plot cost"] = str(cost_plot(result.costs, out / "cost.png"))
    return files


# -------------------------------------------------------------------------------------------- CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    from llm_bip.data import DEFAULT_CALIBRATION
    from llm_bip.loading import DEFAULT_MODEL

    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS),
                   help=f"recipes: {', '.join(RECIPES)}; overrides as name:key=value,key=value "
                        f"(keys: {', '.join(_OVERRIDES)})")
    p.add_argument("--ratios", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.5],
                   help="fractions of parameters to remove, each in [0, 1)")
    p.add_argument("--ratio-of", default="non-embedding", choices=RATIO_OF)
    p.add_argument("--gqa-mode", default="kv-groups", choices=GQA_MODES)
    p.add_argument("--model", default=DEFAULT_MODEL, help="hub id, model directory or .gguf file")
    p.add_argument("--dtype", default="bfloat16", choices=list(DTYPES), help="compute dtype (weights stay float32)")
    g = p.add_argument_group("calibration")
    g.add_argument("--calibration", default=DEFAULT_CALIBRATION)
    g.add_argument("--num-samples", type=int, default=64)
    g.add_argument("--seq-len", type=int, default=256)
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


def _resolve_eval(sources: list[str]) -> list[str]:
    from llm_bip.data import HUB_SOURCES, OFFLINE_SOURCES, resolve_eval_source

    resolved = []
    for source in sources:
        if source == "auto":
            source = resolve_eval_source(source)
        elif source not in HUB_SOURCES + OFFLINE_SOURCES and not Path(source).expanduser().is_file():
            raise LlmBipError(f"evaluation text '{source}' is neither a file nor one of "
                              f"{', '.join(HUB_SOURCES + OFFLINE_SOURCES)}")
        resolved.append(source)
    return resolved


def cmd_compare(args) -> None:
    from llm_bip import api
    from llm_bip.data import load_text, tokenize

    config = CompareConfig(
        methods=tuple(args.methods), ratios=tuple(args.ratios), eval_seq_lens=tuple(args.eval_seq_len),
        eval_max_windows=args.eval_max_windows, eval_max_tokens=args.eval_max_tokens, eval_batch_size=args.eval_batch_size, ratio_of=args.ratio_of,
        gqa_mode=args.gqa_mode, batch_size=args.batch_size, dtype=args.dtype, seed=args.seed,
    )
    config.recipes()  # bad methods and ratios fail before the model loads
    out = Path(args.output)
    if out.exists() and (out / "compare.json").exists() and not args.overwrite:
        raise LlmBipError(f"{out} already holds a comparison: pass --overwrite or another --output")
    sources = _resolve_eval(args.eval)
    progress = not args.quiet
    lm = api.load(args.model)
    check_runnable(lm, config.recipes(), config, (args.num_samples, args.seq_len))  # before calibration and scoring
    samples, info = api.calibrate(lm, args.calibration, args.num_samples, args.seq_len, args.seed)
    eval_ids = {api._short(s): tokenize(lm.tokenizer, load_text(s, split="test")) for s in sources}
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


if __name__ == "__main__":
    sys.exit(main_compare())
