"""Sensitivity allocation: each block measured end to end with a trial cut, channels spread by it."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import FAMILIES, tiny_model, tiny_samples
from llm_bip import api
from llm_bip.allocation import AllocationConfig, Curvature, allocate
from llm_bip.config import PruneConfig
from llm_bip.errors import LlmBipError
from llm_bip.params import BlockCosts
from llm_bip.pipeline import plan as plan_from_scores
from llm_bip.pipeline import score
from llm_bip.plan import select
from llm_bip.saving import read_record
from llm_bip.scoring import make_scorer
from llm_bip.sensitivity import measure_blocks
from llm_bip.widths import BlockWidths
from test_depth import _cli, write_cli_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _costs(n: int = 4, channels: int = 100) -> list[BlockCosts]:
    return [BlockCosts(head=10, kv=5, channel=3, widths=BlockWidths(4, 2, channels), fixed=7) for _ in range(n)]


def test_channels_go_in_inverse_proportion_to_the_sensitivity_and_hit_the_target():
    costs = _costs()
    target = 3 * 120  # 120 channels in all
    widths = allocate(costs, target, AllocationConfig(strategy="sensitivity", head_ratio=0.0), None,
                      Curvature([4.0, 1.0, 1.0, 2.0]))
    removed = [100 - w.channels for w in widths]
    assert sum(removed) == 120
    # r_i ∝ 1 / KL_i: 1/4 : 1 : 1 : 1/2 of 120 = 10.9, 43.6, 43.6, 21.8
    assert removed == pytest.approx([10.9, 43.6, 43.6, 21.8], abs=1)
    assert all(w.num_heads == 4 for w in widths)  # heads as uniform with head-ratio 0: none go


def test_a_lower_exponent_spares_the_sensitive_blocks_more():
    # KL_i = c_i x^1.5: the optimum removes r_i ∝ (1 / c_i)^(1 / 0.5) = 1/16 : 1 : 1 : 1/4 of 120 channels
    widths = allocate(_costs(), 3 * 120, AllocationConfig(strategy="sensitivity", head_ratio=0.0), None,
                      Curvature([4.0, 1.0, 1.0, 2.0], exponent=1.5))
    removed = [100 - w.channels for w in widths]
    assert sum(removed) == 120 and removed == pytest.approx([3.2, 51.9, 51.9, 13.0], abs=1)
    with pytest.raises(LlmBipError, match="sensitivity exponent 1.0 is outside"):
        PruneConfig(allocation="sensitivity", sensitivity_exponent=1.0).validate()


def test_each_block_its_own_exponent():
    # Block 0 at a = 3, the others at 2, all with the same KL at a 10-channel trial (c_i 10^a_i = 1): past the
    # trial block 0's cost grows faster, so the optimum a_i c_i r_i^(a_i - 1) = λ p_i takes less from it.
    costs = _costs()
    curvature = Curvature([1 / 10**3, 1 / 10**2, 1 / 10**2, 1 / 10**2], exponent=[3.0, 2.0, 2.0, 2.0])
    widths = allocate(costs, 3 * 120, AllocationConfig(strategy="sensitivity", head_ratio=0.0), None, curvature)
    removed = [100 - w.channels for w in widths]
    assert sum(removed) == 120
    # with μ = λ p: r_0 = (μ / 0.003)^(1/2), r_j = μ / 0.02, r_0 + 3 r_j = 120: r_0 = 15.3, r_j = 34.9
    assert removed == pytest.approx([15.3, 34.9, 34.9, 34.9], abs=1)
    even = allocate(costs, 3 * 120, AllocationConfig(strategy="sensitivity", head_ratio=0.0), None,
                    Curvature([1 / 10**2] * 4, exponent=[2.0] * 4))
    assert [100 - w.channels for w in even] == [30] * 4  # one exponent in a list: the same as a number


def test_two_trials_fit_each_blocks_exponent():
    from llm_bip.sensitivity import FITTED_EXPONENTS, Sensitivity

    # KL through (5, k_low) and (10, k): a = log2(k / k_low); inverted or flat pairs held at the lower bound
    found = Sensitivity(kl=[0.8, 0.4, 0.1, 0.3, None], fraction=0.2, channels_cut=[10, 10, 10, 10, None], samples=4,
                        positions=8, seconds=0.0, low_kl=[0.2, 0.2, 0.2, 0.001, None],
                        low_channels_cut=[5, 5, 5, 5, None])
    exponents = found.exponents()
    assert exponents[0] == pytest.approx(2.0) and exponents[4] is None
    assert exponents[1] == FITTED_EXPONENTS[0] and exponents[2] == FITTED_EXPONENTS[0]  # a = 1 and a < 0: held
    assert exponents[3] == FITTED_EXPONENTS[1]  # a = log2(300): held at the upper bound
    curvature = found.curvature("fit")
    assert curvature.exponent == exponents and curvature.channels[0] == pytest.approx(0.8 / 10**2)
    record = found.to_json()
    assert record["fitted_exponents"][0] == 2.0 and record["low_trial_channels"][0] == 5
    with pytest.raises(LlmBipError, match="needs a second trial"):
        Sensitivity([0.1], 0.2, [10], 4, 8, 0.0).curvature("fit")


def test_a_block_is_capped_and_the_others_take_the_rest():
    costs = _costs()
    widths = allocate(costs, 3 * 200, AllocationConfig(strategy="sensitivity", head_ratio=0.0, sensitivity_cap=0.6),
                      None, Curvature([1.0, 1.0, 1.0, 1e-9]))
    removed = [100 - w.channels for w in widths]
    assert removed[3] == 60 and sum(removed) == 200
    # beyond the cap everywhere, every block may still lose the uniform plan's share: the result is uniform
    beyond = allocate(costs, 3 * 260, AllocationConfig(strategy="sensitivity", head_ratio=0.0, sensitivity_cap=0.6),
                      None, Curvature([1.0, 2.0, 3.0, 1e-9]))
    assert [w.channels for w in beyond] == [35] * 4
    with pytest.raises(LlmBipError, match="no measured sensitivity for layers \\[1\\]"):
        allocate(costs, 30, AllocationConfig(strategy="sensitivity"), None, Curvature([1.0, None, 1.0, 1.0]))


def test_auto_heads_go_where_they_cost_less_than_the_channels_they_spare():
    costs = _costs()  # a head unit (kv-groups: 2 heads + 1 KV head) is 25 parameters, a channel 3
    config = AllocationConfig(strategy="sensitivity", head_ratio="auto")
    # channel curvature 1e-4 per channel²: 60 channels per block cost 0.36 each; a head unit in block 2
    # costs 0.01, elsewhere 10
    curvature = Curvature([1e-4] * 4, heads=[10.0, 10.0, 0.01, 10.0])
    widths = allocate(costs, 3 * 240, config, None, curvature)
    assert [w.num_heads for w in widths] == [4, 4, 2, 4] and [w.num_kv_heads for w in widths] == [2, 2, 1, 2]
    removed = 3 * sum(100 - w.channels for w in widths) + 25
    assert abs(removed - 3 * 240) < 3  # the head unit spares 8 channels: the target is still met
    # every head dear: the channels alone, as without auto
    dear = allocate(costs, 3 * 240, config, None, Curvature([1e-4] * 4, heads=[10.0] * 4))
    assert [w.num_heads for w in dear] == [4] * 4 and [w.channels for w in dear] == [40] * 4
    # one unit must stay in every block, whatever it costs
    free = allocate(costs, 3 * 240, config, None, Curvature([1e-4] * 4, heads=[0.0] * 4))
    assert all(w.num_kv_heads == 1 for w in free)
    with pytest.raises(LlmBipError, match="needs each block's measured head sensitivity"):
        allocate(costs, 3 * 240, config, None, Curvature([1e-4] * 4))
    with pytest.raises(LlmBipError, match="it needs --allocation sensitivity"):
        allocate(costs, 3 * 240, AllocationConfig(strategy="uniform", head_ratio="auto"))


def _kl_every_4th(dense_logits: torch.Tensor, cut_logits: torch.Tensor) -> float:
    p = torch.log_softmax(dense_logits[:, ::4].float(), -1)
    q = torch.log_softmax(cut_logits[:, ::4].float(), -1)
    return float((p.exp() * (p - q)).sum() / (p.shape[0] * p.shape[1]))


@pytest.mark.parametrize("gqa_mode", ["kv-groups", "query-heads"])
def test_a_head_trial_measures_what_losing_the_prunes_first_heads_costs_the_whole_model(gqa_mode):
    lm = tiny_model("qwen2")  # 4 query heads in 2 KV groups, q/k/v biases
    before = copy.deepcopy(lm.model.state_dict())
    samples = tiny_samples(8, 16)[:4]
    trial = BlockWidths(2, 1, 48) if gqa_mode == "kv-groups" else BlockWidths(2, 2, 48)
    result = measure_blocks(lm, samples, 0.4, measured=[0, 1], num_samples=4, progress=False,
                            head_trials={1: trial}, gqa_mode=gqa_mode)
    assert result.head_kl[0] is None and result.head_kl[1] > 0 and result.kl[0] > 0
    assert result.to_json()["head_kl"] == result.head_kl
    assert all(torch.equal(before[k], v) for k, v in lm.model.state_dict().items())
    # The same heads cut by hand in the whole model (the lowest LLM-BIP scores on these samples, as the
    # prune would choose them at those widths) cost the same KL.
    s = score(lm, make_scorer("llm-bip", lipschitz="none"), samples, 8, progress=False).scores[1]
    kept = select(s.heads, s.groups, s.channels, trial, gqa_mode, 1).keep_heads
    gone = [h for h in range(4) if h not in kept]
    assert len(gone) == 2 and (gone[0] // 2 != gone[1] // 2) == (gqa_mode == "query-heads")
    o_proj, head_dim = lm.adapter.parts(lm.adapter.blocks(lm.model)[1]).o_proj, lm.adapter.head_dim
    with torch.no_grad():
        dense = lm.model(samples).logits
        for h in gone:
            o_proj.weight[:, h * head_dim:(h + 1) * head_dim] = 0
        cut = lm.model(samples).logits
    assert result.head_kl[1] == pytest.approx(_kl_every_4th(dense, cut), rel=1e-3)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_a_refit_trial_measures_the_cut_as_the_prune_makes_it(family):
    """With a refit, a channel trial costs what the same channels cost the whole model once down_proj's kept
    columns are refit by the prune's own compensation on the fit samples (the dense model's inputs to it)."""
    from llm_bip.compensation import RefitCompensation
    from llm_bip.plan import BlockPlan
    from llm_bip.stats import BlockStats

    lm = tiny_model(family)
    with torch.no_grad():
        for block in lm.adapter.blocks(lm.model):
            parts = lm.adapter.parts(block)
            parts.down_proj.weight.mul_(20)  # FFNs that matter: the tiny models' own move the logits by noise
            # Channel j + half a weaker twin of channel j (the same activation, a third of its output), as real
            # FFNs have channels the others can rebuild: the trial cuts the twins, and the refit rebuilds them
            half = parts.down_proj.in_features // 2
            for linear in (parts.gate_proj, parts.up_proj):
                linear.weight[half:] = linear.weight[:half]
            parts.down_proj.weight[:, half:] = parts.down_proj.weight[:, :half] / 3
    before = copy.deepcopy(lm.model.state_dict())
    samples = tiny_samples(24, 16)
    measured, fit = samples[:4], samples[4:24]  # 320 tokens fit ~60 inputs
    refit = PruneConfig().compensator(lm.adapter)
    result = measure_blocks(lm, samples, 0.4, measured=[0, 1], num_samples=4, progress=False, refit=refit,
                            refit_samples=20)
    plain = measure_blocks(lm, samples, 0.4, measured=[0, 1], num_samples=4, progress=False)
    assert all(torch.equal(before[k], v) for k, v in lm.model.state_dict().items())
    assert result.refit_kept == [("refit (no intercept)" if family == "qwen2" else "refit")] * 2 + [None] * (lm.adapter.num_blocks - 2)
    assert result.to_json()["refit_samples"] == 20 and plain.to_json().get("refit_samples") is None
    block = lm.adapter.blocks(lm.model)[1]
    down = lm.adapter.parts(block).down_proj
    captured = []
    handle = down.register_forward_pre_hook(lambda _m, args: captured.append(args[0].reshape(-1, down.in_features).double()))
    with torch.no_grad():
        lm.model(fit)
    handle.remove()
    x = torch.cat(captured)
    stats = BlockStats(tokens=len(x), attn_sum=torch.zeros(down.out_features), ffn_sum=x.sum(0).float(), ffn_gram=(x.T @ x).float())
    channels = score(lm, make_scorer("llm-bip", lipschitz="none"), measured, 8, progress=False).scores[1].channels
    removed = torch.argsort(channels)[: result.channels_cut[1]]
    keep = sorted(set(range(down.in_features)) - set(removed.tolist()))
    with torch.no_grad():
        dense = lm.model(measured).logits
        widths = lm.adapter.widths(block)
        everything = BlockPlan(1, list(range(widths.num_heads)), list(range(widths.num_kv_heads)), keep)
        RefitCompensation(intercept=refit.intercept).compensate(lm.adapter, block, everything, stats, None)
        down.weight[:, removed] = 0
        cut = lm.model(measured).logits
    # (the refit rebuilds nearly all of the cut, so what is left is mostly float32 noise, under a hundredth of the plain cut)
    assert result.kl[1] == pytest.approx(_kl_every_4th(dense, cut), rel=2e-2, abs=plain.kl[1] * 1e-2)
    assert result.kl[1] < plain.kl[1] / 10  # the refit moved the cut twins' work onto the kept ones


def test_measuring_restores_every_weight_and_skips_removed_blocks():
    lm = tiny_model("llama")
    before = copy.deepcopy(lm.model.state_dict())
    samples = tiny_samples(8, 16)
    blocks = lm.adapter.blocks(lm.model)
    skipped_forward = blocks[1].forward
    blocks[1].forward = lambda *a, **k: (_ for _ in ()).throw(AssertionError("a skipped block ran"))
    try:
        result = measure_blocks(lm, samples, 0.3, measured=[0, 2], skipped=[1], num_samples=4, progress=False)
    finally:
        blocks[1].forward = skipped_forward
    assert result.kl[1] is None and result.kl[0] > 0 and result.kl[2] > 0
    assert result.samples == 4 and result.fraction == 0.3
    after = lm.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_measures_finite_sensitivities_and_keeps_its_weights(family):
    lm = tiny_model(family)
    before = copy.deepcopy(lm.model.state_dict())
    blocks = list(range(lm.adapter.num_blocks))
    result = measure_blocks(lm, tiny_samples(8, 16), 0.4, measured=blocks, num_samples=3, progress=False)
    assert all(k is not None and 0 < k < float("inf") for k in result.kl)
    assert result.positions == 3 * 4  # every 4th of 16 positions
    assert all(torch.equal(before[k], v) for k, v in lm.model.state_dict().items())


def test_a_second_smaller_trial_cuts_the_lowest_scoring_part_of_the_first():
    lm = tiny_model("llama")
    samples = tiny_samples(8, 16)
    one = measure_blocks(lm, samples, 0.5, measured=[0, 1], num_samples=4, progress=False)
    two = measure_blocks(lm, samples, 0.5, measured=[0, 1], num_samples=4, progress=False, low_fraction=0.25)
    assert two.kl == one.kl and one.low_kl is None  # the first trial is the same with or without the second
    width = lm.adapter.parts(lm.adapter.blocks(lm.model)[0]).down_proj.in_features
    assert two.channels_cut[:2] == [width // 2] * 2 and two.low_channels_cut[:2] == [width // 4] * 2
    assert all(0 < low < k for low, k in zip(two.low_kl[:2], two.kl[:2], strict=True))
    assert two.kl[2] is None and two.low_kl[2] is None  # block 2 not measured
    with pytest.raises(ValueError, match="second trial fraction 0.5"):
        measure_blocks(lm, samples, 0.5, measured=[0], num_samples=4, progress=False, low_fraction=0.5)


def test_prune_with_fitted_exponents_records_them():
    lm = tiny_model("llama")
    samples = tiny_samples(8, 16)
    config = PruneConfig(ratio=0.3, allocation="sensitivity", sensitivity_samples=4, sensitivity_exponent="fit")
    result = api.prune(lm, config, samples, progress=False)
    record = result.report["sensitivity"]
    assert len(record["fitted_exponents"]) == len(record["kl"]) and all(1.5 <= a <= 3 for a in
                                                                          record["fitted_exponents"])
    assert record["low_trial_channels"] == [round(c / 2) for c in record["trial_channels"]]
    assert result.report["config"]["sensitivity_exponent"] == "fit"
    with pytest.raises(LlmBipError, match="cannot also refit"):
        PruneConfig(allocation="sensitivity", sensitivity_exponent="fit", sensitivity_refit_samples=4).validate()
    with pytest.raises(LlmBipError, match="or 'fit'"):
        PruneConfig(allocation="sensitivity", sensitivity_exponent="fitted").validate()


def test_a_block_whose_ffn_adds_nothing_measures_zero():
    lm = tiny_model("qwen2")
    down = lm.adapter.parts(lm.adapter.blocks(lm.model)[0]).down_proj
    with torch.no_grad():
        down.weight.zero_()
        down.bias = None
    result = measure_blocks(lm, tiny_samples(8, 16), 0.5, measured=[0, 1], num_samples=4, progress=False)
    assert result.kl[0] == 0.0 and result.kl[1] > 0


def test_prune_spreads_channels_by_the_measured_sensitivity_and_records_it():
    lm = tiny_model("llama")
    samples = tiny_samples(8, 16)
    uniform = api.prune(copy.deepcopy(lm), PruneConfig(ratio=0.3), samples, progress=False)
    result = api.prune(lm, PruneConfig(ratio=0.3, allocation="sensitivity", sensitivity_samples=4), samples,
                       progress=False)
    record = result.report["sensitivity"]
    kl = record["kl"]
    assert record["samples"] == 4 and all(k > 0 for k in kl) and "sensitivity" in result.report["timings_seconds"]
    kept = [len(b["keep_channels"]) for b in result.report["plan"]]
    # the most sensitive block keeps the most channels, the least sensitive the fewest
    assert kept.index(max(kept)) == kl.index(max(kl)) and kept.index(min(kept)) == kl.index(min(kl))
    # the same parameters go as with the uniform plan (within a channel per block)
    channel = 3 * 48
    assert abs(result.report["parameters_after"]["total"] - uniform.report["parameters_after"]["total"]) <= 3 * channel
    assert result.report["config"]["allocation"] == "sensitivity"


def test_auto_heads_in_a_prune_go_where_the_heads_measure_free():
    lm = tiny_model("llama")
    samples = tiny_samples(8, 16)
    o_proj = lm.adapter.parts(lm.adapter.blocks(lm.model)[0]).o_proj
    with torch.no_grad():
        o_proj.weight.zero_()  # block 0's attention adds nothing: its heads cost nothing to lose
    config = PruneConfig(ratio=0.3, allocation="sensitivity", head_ratio="auto", sensitivity_samples=4)
    result = api.prune(lm, config, samples, progress=False)
    record = result.report["sensitivity"]
    assert record["head_kl"][0] == 0.0 and all(k > 0 for k in record["head_kl"][1:])
    plan = result.report["plan"]
    assert len(plan[0]["keep_kv_heads"]) == 1 and all(len(b["keep_kv_heads"]) == 2 for b in plan[1:])
    uniform = api.prune(tiny_model("llama"), PruneConfig(ratio=0.3), samples, progress=False)
    assert abs(result.report["parameters_after"]["total"] - uniform.report["parameters_after"]["total"]) <= 3 * 3 * 48
    assert result.report["config"]["head_ratio"] == "auto"


def test_sensitivity_allocation_refuses_what_it_cannot_do():
    lm = tiny_model("llama")
    samples = tiny_samples(8, 16)
    config = PruneConfig(ratio=0.3, allocation="sensitivity", calibration_mode="parallel")
    table = score(lm, make_scorer("llm-bip"), samples, 8, progress=False)
    with pytest.raises(LlmBipError, match="a plan from saved scores cannot"):
        plan_from_scores(table, config, lm.adapter.embedding_parameters(lm.model))
    with pytest.raises(LlmBipError, match="sensitivity samples 0"):
        PruneConfig(allocation="sensitivity", sensitivity_samples=0).validate()
    with pytest.raises(LlmBipError, match="sensitivity cap 1.0 is outside"):
        PruneConfig(allocation="sensitivity", sensitivity_cap=1.0).validate()
    with pytest.raises(LlmBipError, match="head-ratio auto takes heads by their measured end-to-end cost"):
        PruneConfig(head_ratio="auto").validate()
    with pytest.raises(LlmBipError, match="sensitivity refit samples cannot apply"):
        PruneConfig(allocation="sensitivity", sensitivity_refit_samples=4, compensation="bias").validate()
    with pytest.raises(LlmBipError, match="give --num-samples 12 or more"):
        api.prune(lm, PruneConfig(ratio=0.3, allocation="sensitivity", sensitivity_samples=4,
                                  sensitivity_refit_samples=8), samples, progress=False)


@pytest.fixture(scope="module")
def cli_model(tmp_path_factory):
    return write_cli_model(tmp_path_factory.mktemp("sensitivity-cli"), layers=3)


def test_cli_prunes_by_sensitivity_and_refuses_it_with_streaming(cli_model, tmp_path, capsys):
    out = tmp_path / "out"
    assert _cli(cli_model, "prune", "--output", str(out), "--ratio", "0.3", "--allocation", "sensitivity",
                "--sensitivity-samples", "2", "--head-ratio", "auto") == 0
    record = read_record(out)
    assert record["sensitivity"]["samples"] == 2 and record["config"]["sensitivity_samples"] == 2
    assert len(record["sensitivity"]["head_kl"]) == 3 and record["config"]["head_ratio"] == "auto"
    fitted = tmp_path / "fitted"
    assert _cli(cli_model, "prune", "--output", str(fitted), "--ratio", "0.3", "--allocation", "sensitivity",
                "--sensitivity-samples", "2", "--sensitivity-exponent", "fit") == 0
    assert read_record(fitted)["config"]["sensitivity_exponent"] == "fit"
    assert len(read_record(fitted)["sensitivity"]["fitted_exponents"]) == 3
    for flags, message in ((["--allocation", "sensitivity", "--sensitivity-exponent", "fitted"],
                            "neither a number nor 'fit'"),
                           (["--allocation", "sensitivity", "--streaming"], "use --allocation uniform with --streaming"),
                           (["--sensitivity-samples", "2"], "--sensitivity-samples cannot apply"),
                           (["--sensitivity-cap", "0.5"], "--sensitivity-cap cannot apply"),
                           (["--sensitivity-exponent", "1.5"], "--sensitivity-exponent cannot apply"),
                           (["--sensitivity-refit-samples", "2"], "--sensitivity-refit-samples cannot apply"),
                           (["--head-ratio", "auto"], "add --allocation sensitivity")):
        bad = tmp_path / "bad"
        assert _cli(cli_model, "prune", "--output", str(bad), "--ratio", "0.3", *flags) == 2
        assert message in capsys.readouterr().err
        assert not bad.exists()
