"""How much the whole model suffers when one block loses FFN channels, measured end to end.

LLM-BIP's scores say which channels of a block matter least to that block's output; they do not say
how much each block may lose. Measured on SmolLM2 (docs/results.md §11), the same cut raises the model's
loss 5-9 times more in the first two and the last block than in the middle ones, and no block-local
quantity shows it (a block's output change after the refit grows steadily with depth). So each block is
measured as a user would see it: on a few calibration samples, the block's lowest-scoring `fraction` of
channels is cut (its down_proj columns zeroed, put back after), the rest of the model runs, and the mean
KL divergence of the next-token distribution from the dense model's is the block's sensitivity. One block
at a time is cut, on the dense model's activations, so the cost is about L/2 block passes per block over
the subset; the allocation (allocation.py, "sensitivity") then spreads the channels to remove by it.

With heads measured too (`--head-ratio auto`), each block has a second trial: one head unit (the KV group,
or the query head of every KV group, that the prune itself would take first) is cut by zeroing its o_proj
columns. The two KL values give the exchange rate between a head and a channel in that block, measured end
to end instead of assumed (block-local head scores under-rate heads, docs/results.md §3).
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from llm_bip.activations import BlockInputs, full_precision, run_block
from llm_bip.allocation import Curvature
from llm_bip.compensation import RefitCompensation
from llm_bip.config import FITTED_EXPONENT_WITH_REFIT
from llm_bip.errors import LlmBipError
from llm_bip.evaluation.perplexity import output_logits
from llm_bip.loading import LoadedModel
from llm_bip.plan import BlockPlan, select
from llm_bip.scoring import make_scorer
from llm_bip.stats import BlockStats, collect_block_stats
from llm_bip.surgery import head_columns
from llm_bip.widths import BlockWidths

SENSITIVITY_NEEDS_MEMORY = ("sensitivity allocation runs the rest of the model once per block, which streaming from "
                            "disk cannot afford: use --allocation uniform with --streaming")
# Fitted per-block exponents are held within these: below 1.5 the allocation turns all-or-nothing (the cap decides,
# docs/results.md §11), above 3 a pair of trials is more likely noise than a block whose cost grows that fast.
FITTED_EXPONENTS = (1.5, 3.0)
KL_STRIDE = 4  # every 4th position's next-token distribution is compared: the LM head costs a vocabulary per position


@dataclass
class Sensitivity:
    """Per block (None where not measured): mean KL(dense || block cut) over the compared positions."""

    kl: list[float | None]
    fraction: float  # of each measured block's channels cut in its trial
    channels_cut: list[int | None]  # channels each block's trial cut (the fraction, rounded)
    samples: int
    positions: int  # next-token distributions compared per trial
    seconds: float
    head_kl: list[float | None] | None = None  # with one head unit cut instead; None: heads not measured
    refit_samples: int = 0  # calibration samples the channel trials' down_proj refit was fit on (0: no refit)
    refit_kept: list[str | None] | None = None  # per block, what the trial's compensation did (refit or plain cut)
    # A second, smaller trial per block (`exponent="fit"`): its KL and the channels it cut; None: not measured.
    low_kl: list[float | None] | None = None
    low_channels_cut: list[int | None] | None = None

    def exponents(self) -> list[float | None]:
        """Each measured block's power a from its two trials, KL = c x^a through both, within FITTED_EXPONENTS
        (a trial pair that the draw of the samples inverts, or that grows faster than cubically, is held at the
        bound; where both trials cut the same channels, as in a very narrow block, the default 2)."""
        if self.low_kl is None or self.low_channels_cut is None:
            raise LlmBipError("fitting each block's exponent needs a second trial per block (exponent 'fit')")
        low, high = FITTED_EXPONENTS
        fitted: list[float | None] = []
        for k, c, k_low, c_low in zip(self.kl, self.channels_cut, self.low_kl, self.low_channels_cut, strict=True):
            if k is None or k_low is None or c is None or c_low is None or c <= c_low:
                fitted.append(None if k is None else 2.0)
            elif k <= 0 or k_low <= 0:
                fitted.append(high if k_low <= 0 < k else low)
            else:
                fitted.append(min(high, max(low, math.log(k / k_low) / math.log(c / c_low))))
        return fitted

    def curvature(self, exponent: float | str = 2.0) -> Curvature:
        """The allocator's cost model: a block's KL taken as a power of what it loses, KL · (x / trial)^exponent
        (one head unit is its trial); exponent "fit": each block's own, from its two trials."""
        powers = self.exponents() if exponent == "fit" else [exponent] * len(self.kl)
        return Curvature(
            channels=[None if k is None else k / c**a for k, c, a in zip(self.kl, self.channels_cut, powers,
                                                                          strict=True)],
            heads=self.head_kl, exponent=powers if exponent == "fit" else exponent)

    def to_json(self) -> dict:
        cut = ("down_proj columns zeroed, the kept ones refit on other calibration samples" if self.refit_samples
               else "down_proj columns zeroed")
        record = {"criterion": "mean KL divergence of the next-token distribution from the dense model's, with only "
                               f"this block's lowest-scoring channels cut ({cut})",
                  "kl": self.kl, "trial_fraction": self.fraction, "trial_channels": self.channels_cut,
                  "samples": self.samples, "positions": self.positions, "seconds": round(self.seconds, 2)}
        if self.refit_samples:
            record["refit_samples"] = self.refit_samples
            record["refit"] = self.refit_kept
        if self.low_kl is not None:
            record["low_trial_kl"] = self.low_kl
            record["low_trial_channels"] = self.low_channels_cut
            record["fitted_exponents"] = [None if a is None else round(a, 4) for a in self.exponents()]
            record["exponent_criterion"] = ("each block's KL taken as c x^a through its two trials (the same lowest-"
                                            f"scoring channels, the smaller cut a subset), a held within "
                                            f"{list(FITTED_EXPONENTS)}")
        if self.head_kl is not None:
            record["head_kl"] = self.head_kl
            record["head_criterion"] = ("the same KL with only this block's first head unit to go cut (o_proj "
                                        "columns zeroed), instead of channels")
        return record


def _log_probs(loaded: LoadedModel, hidden: list[torch.Tensor]) -> list[torch.Tensor]:
    norm = loaded.adapter.final_norm(loaded.model)
    return [F.log_softmax(output_logits(loaded.model, norm(h[:, ::KL_STRIDE])), dim=-1) for h in hidden]


def _kl(dense: list[torch.Tensor], cut: list[torch.Tensor]) -> float:
    total = count = 0.0
    with full_precision():
        for p, q in zip(dense, cut, strict=True):
            total += float(F.kl_div(q, p, log_target=True, reduction="sum"))
            count += p.shape[0] * p.shape[1]
    return total / count


def _run(blocks, inputs: BlockInputs, layers: list[int]) -> BlockInputs:
    for i in layers:
        inputs = run_block(blocks[i], inputs, layer=i)
    return inputs


@torch.no_grad()
def measure_blocks(loaded: LoadedModel, samples: torch.Tensor, fraction: float, measured: list[int],
                   skipped: list[int] = (), num_samples: int = 8, batch_size: int = 8,
                   progress: bool = True, head_trials: dict[int, BlockWidths] | None = None,
                   gqa_mode: str = "kv-groups", refit: RefitCompensation | None = None,
                   refit_samples: int = 0, low_fraction: float | None = None) -> Sensitivity:
    """The sensitivity of each block in `measured` to losing `fraction` of its channels, on the first
    `num_samples` calibration samples (blocks in `skipped`, removed whole by the plan, do not run). With
    `head_trials` (block -> its widths with one head unit fewer), each of those blocks is also measured with
    the heads the prune would take first at those widths (in `gqa_mode`) cut instead. With `low_fraction`, each
    measured block also has a second, smaller channel trial (the lowest-scoring `low_fraction`), from which
    `Sensitivity.exponents` fits how fast its cost grows."""
    from llm_bip.pipeline import catch_inputs, geometry

    if loaded.streamed:
        raise LlmBipError(SENSITIVITY_NEEDS_MEMORY)
    if not 0 < fraction < 1:
        raise ValueError(f"trial fraction {fraction} outside (0, 1)")
    if low_fraction is not None and not 0 < low_fraction < fraction:
        raise ValueError(f"second trial fraction {low_fraction} outside (0, {fraction})")
    if low_fraction is not None and refit is not None:
        raise LlmBipError(FITTED_EXPONENT_WITH_REFIT)
    started = time.perf_counter()
    model, adapter = loaded.model, loaded.adapter
    blocks = adapter.blocks(model)
    order = [i for i in range(len(blocks)) if i not in set(skipped)]
    subset = samples[:num_samples]
    inputs = catch_inputs(loaded, subset, batch_size)
    fit_inputs = None
    if refit is not None and refit_samples:
        fit_subset = samples[num_samples : num_samples + refit_samples]
        if len(fit_subset) < refit_samples:
            raise LlmBipError(f"the trials' refit needs {refit_samples} calibration samples besides the "
                              f"{num_samples} measured ones, and there are {len(samples)}: give --num-samples "
                              f"{num_samples + refit_samples} or more, or fewer --sensitivity-refit-samples")
        fit_inputs = catch_inputs(loaded, fit_subset, batch_size)
    refit_kept: list[str | None] | None = [None] * len(blocks) if fit_inputs is not None else None
    dense = _log_probs(loaded, _run(blocks, inputs, order).hidden)
    kl: list[float | None] = [None] * len(blocks)
    cut: list[int | None] = [None] * len(blocks)
    head_trials = head_trials or {}
    head_kl: list[float | None] | None = [None] * len(blocks) if head_trials else None
    low_kl: list[float | None] | None = [None] * len(blocks) if low_fraction is not None else None
    low_cut: list[int | None] | None = [None] * len(blocks) if low_fraction is not None else None
    todo = set(measured)
    # The scores the prune itself ranks by (the Lipschitz factor is one number per block: it orders nothing
    # within a block).
    scorer = make_scorer("llm-bip", lipschitz="none")
    for position, i in enumerate(tqdm(order, desc="block sensitivity", disable=not progress)):
        if i in todo or i in head_trials:
            parts, shape = adapter.parts(blocks[i]), geometry(loaded, i)
            stats, after = collect_block_stats(blocks[i], parts, inputs, scorer.stats_request(), i, shape.group_width)
            scores = scorer.score_block(parts, stats, shape)
            del stats
            rest = order[position:]
            if i in todo:
                cut[i] = max(1, round(fraction * parts.down_proj.weight.shape[1]))
                removed = torch.argsort(scores.channels)[: cut[i]]
                if low_fraction is not None:
                    low_cut[i] = max(1, round(low_fraction * parts.down_proj.weight.shape[1]))
                    low_kl[i] = _trial(loaded, blocks, inputs, rest, parts.down_proj, removed[: low_cut[i]], dense)
                if fit_inputs is None:
                    kl[i] = _trial(loaded, blocks, inputs, rest, parts.down_proj, removed, dense)
                else:
                    kept = sorted(set(range(parts.down_proj.in_features)) - set(removed.tolist()))
                    plan = dataclasses.replace(BlockPlan.keep_all(i, shape.widths), keep_channels=kept)
                    request = refit.stats_request(shape, plan.widths, fit_inputs.num_tokens)
                    fit_stats, fit_inputs = collect_block_stats(blocks[i], parts, fit_inputs, request, i,
                                                                shape.group_width)
                    kl[i], refit_kept[i] = _refit_trial(loaded, blocks, inputs, rest, plan, removed, fit_stats,
                                                        refit, dense)
            if i in head_trials:
                kept = set(select(scores.heads, scores.groups, scores.channels, head_trials[i], gqa_mode,
                                  i).keep_heads)
                gone = [h for h in range(shape.num_heads) if h not in kept]
                head_kl[i] = _trial(loaded, blocks, inputs, rest, parts.o_proj, head_columns(gone, shape.head_dim),
                                    dense)
        else:
            after = run_block(blocks[i], inputs, layer=i)
        if fit_inputs is not None and i not in todo:
            fit_inputs = run_block(blocks[i], fit_inputs, layer=i)
        inputs = after
    return Sensitivity(kl, fraction, cut, subset.shape[0], sum(p.shape[0] * p.shape[1] for p in dense),
                       time.perf_counter() - started, head_kl, refit_samples if refit_kept is not None else 0,
                       refit_kept, low_kl, low_cut)


def _trial(loaded, blocks, inputs: BlockInputs, layers: list[int], projection, columns: torch.Tensor,
           dense: list[torch.Tensor]) -> float:
    """KL from the dense model with `columns` of `projection`'s input cut (zeroed, then put back)."""
    weight = projection.weight
    columns = columns.to(weight.device)
    saved = weight[:, columns].clone()
    weight[:, columns] = 0
    try:
        return _kl(dense, _log_probs(loaded, _run(blocks, inputs, layers).hidden))
    finally:
        weight[:, columns] = saved


def _refit_trial(loaded, blocks, inputs: BlockInputs, layers: list[int], plan: BlockPlan, removed: torch.Tensor,
                 fit_stats: BlockStats, refit: RefitCompensation, dense: list[torch.Tensor]) -> tuple[float, str]:
    """KL from the dense model with `plan`'s block cut as the prune cuts it: the kept columns of down_proj
    refit on `fit_stats` (with the prune's guards), the `removed` ones zeroed; the weights and bias are put
    back after."""
    adapter = loaded.adapter
    block = blocks[plan.layer]
    down = adapter.parts(block).down_proj
    saved_weight = down.weight.detach().clone()
    saved_bias = None if down.bias is None else down.bias.detach().clone()
    try:
        done = refit.compensate(adapter, block, plan, fit_stats, None).get("down_proj", "")
        down.weight[:, removed.to(down.weight.device)] = 0
        return _kl(dense, _log_probs(loaded, _run(blocks, inputs, layers).hidden)), done
    finally:
        down.weight.copy_(saved_weight)
        if saved_bias is None:
            down.bias = None
        else:
            down.bias.copy_(saved_bias)
