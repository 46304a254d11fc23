"""Invariants of scoring, allocation and cutting on tiny random models of every family."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import FAMILIES, tiny_model, tiny_samples
from llm_bip.activations import capture_block_inputs
from llm_bip.allocation import AllocationConfig, allocate
from llm_bip.params import block_costs, count_parameters
from llm_bip.pipeline import PruneConfig, plan, prune, score
from llm_bip.scoring import make_scorer
from llm_bip.stats import StatsRequest, collect_block_stats
from llm_bip.surgery import apply_plan, mask_plan


def logits(lm, ids):
    with torch.no_grad():
        return lm.model(ids).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_ratio_zero_leaves_logits_identical(family):
    lm = tiny_model(family)
    ids = tiny_samples()
    before = logits(lm, ids)
    for compensation in ("none", "bias", "refit"):
        for mode in ("parallel", "sequential"):
            pruned = copy.deepcopy(lm)
            prune(pruned, PruneConfig(ratio=0.0, compensation=compensation, calibration_mode=mode), ids, progress=False)
            assert torch.equal(logits(pruned, ids), before), (compensation, mode)


def _sliding_qwen2():
    from transformers import Qwen2Config

    from conftest import TINY_CONFIGS, tiny_from_config

    torch.manual_seed(0)
    config = Qwen2Config(**{**TINY_CONFIGS["qwen2"]().to_dict(), "use_sliding_window": True, "sliding_window": 4,
                            "max_window_layers": 1, "layer_types": None})
    return tiny_from_config(config, "tiny-qwen2-sliding")


@pytest.mark.parametrize("family", ["gemma2", "gemma3_text", "qwen2-sliding"])
def test_the_block_loop_gives_each_block_its_own_mask_and_rotary_embeddings(family):
    """Sliding-window layers (window 4 < 12 tokens) mixed with full attention, and Gemma 3's rotary base
    per layer type: the loop's activations after the last block, sequential with nothing cut, are the
    model's own; block 0's mask and rotary embeddings for every block would not be."""
    from llm_bip.activations import run_block
    from llm_bip.block_loop import Selection
    from llm_bip.compensation import RefitCompensation
    from llm_bip.pipeline import walk, widths_of

    lm = _sliding_qwen2() if family == "qwen2-sliding" else tiny_model(family)
    assert len(set(lm.model.config.layer_types)) == 2
    ids = tiny_samples()
    with torch.no_grad():
        expected = lm.model(ids, output_hidden_states=True).hidden_states[-1]  # after the final norm
    norm = lm.adapter.final_norm(lm.model)
    selection = Selection(widths=widths_of(lm), scorer=make_scorer("llm-bip"), sequential=True)
    result = walk(lm, ids, 3, selection, RefitCompensation(), progress=False)
    with torch.no_grad():
        assert torch.equal(norm(torch.cat(result.inputs.hidden)), expected)
        wrong = capture_block_inputs(lm.model, lm.adapter, ids, batch_size=3)
        assert wrong.layer_kwargs is not None
        wrong.layer_kwargs = None  # what the loop did before: block 0's arguments for every block
        for layer, block in enumerate(lm.adapter.blocks(lm.model)):
            wrong = run_block(block, wrong, layer=layer)
        assert not torch.allclose(norm(torch.cat(wrong.hidden)), expected, atol=1e-3)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("gqa_mode", ["kv-groups", "query-heads"])
@pytest.mark.parametrize("allocation", ["uniform", "block-adaptive", "global-adaptive"])
def test_cut_equals_masked_dense(family, gqa_mode, allocation):
    lm = tiny_model(family)
    ids = tiny_samples()
    table = score(lm, make_scorer("llm-bip"), ids, progress=False)
    config = PruneConfig(ratio=0.35, allocation=allocation, gqa_mode=gqa_mode, compensation="none", head_ratio=None)
    pl = plan(table, config, lm.adapter.embedding_parameters(lm.model))
    masked = mask_plan(copy.deepcopy(lm.model), lm.adapter, pl)
    cut = copy.deepcopy(lm)
    apply_plan(cut.model, cut.adapter, pl)
    with torch.no_grad():
        expected = masked(ids).logits
    assert torch.allclose(logits(cut, ids), expected, atol=1e-5, rtol=1e-4)
    assert count_parameters(cut.model, cut.adapter)["total"] < count_parameters(lm.model, lm.adapter)["total"]


@pytest.mark.parametrize("allocation", ["block-adaptive", "global-adaptive"])
@pytest.mark.parametrize("ratio", [0.1, 0.3, 0.55])
def test_adaptive_target_met_to_one_channel(allocation, ratio):
    lm = tiny_model("llama")
    ids = tiny_samples()
    result = prune(lm, PruneConfig(ratio=ratio, allocation=allocation, compensation="none"), ids, progress=False)
    channel = 3 * lm.model.config.hidden_size
    assert abs(result.report["removed"] - result.report["target_removed"]) <= channel / 2
    before, after = result.report["parameters_before"], count_parameters(lm.model, lm.adapter)
    assert before["total"] - after["total"] == result.report["removed"]


@pytest.mark.parametrize("ratio_of", ["non-embedding", "total"])
def test_uniform_target_within_one_channel_per_block(ratio_of):
    lm = tiny_model("llama")
    ids = tiny_samples()
    result = prune(lm, PruneConfig(ratio=0.3, ratio_of=ratio_of, compensation="none"), ids, progress=False)
    channel = 3 * lm.model.config.hidden_size
    blocks = lm.model.config.num_hidden_layers
    assert abs(result.report["removed"] - result.report["target_removed"]) <= blocks * channel / 2
    widths = {len(b.keep_channels) for b in result.plan.blocks}
    assert len(widths) == 1  # uniform: the same width everywhere


def test_round_to_multiple():
    lm = tiny_model("llama")
    costs = [block_costs(lm.adapter, b) for b in lm.adapter.blocks(lm.model)]
    widths = allocate(costs, 20_000, AllocationConfig(strategy="uniform", round_to=8))
    assert all(w.channels % 8 == 0 for w in widths)


def test_layer_range_keeps_other_blocks_dense():
    lm = tiny_model("llama")
    result = prune(lm, PruneConfig(ratio=0.2, prunable_layers=(1, 2), compensation="none"), tiny_samples(), progress=False)
    assert len(result.plan.blocks[0].keep_channels) == 96 and len(result.plan.blocks[0].keep_heads) == 6
    assert len(result.plan.blocks[1].keep_channels) < 96


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_ffn_score_equals_block_output_change_of_removing_the_channel(family):
    """The FFN score is exact: ||W_down[:,k]||·||a_k|| equals the measured block-output change."""
    lm = tiny_model(family)
    ids = tiny_samples(n=2, length=10)
    block = lm.adapter.blocks(lm.model)[1]
    parts = lm.adapter.parts(block)
    inputs = capture_block_inputs(lm.model, lm.adapter, ids, batch_size=2)
    stats, out = collect_block_stats(lm.adapter.blocks(lm.model)[0], lm.adapter.parts(lm.adapter.blocks(lm.model)[0]),
                                     inputs, StatsRequest(), 0)
    stats, dense = collect_block_stats(block, parts, out, StatsRequest(residual_sample=64), 1)
    from llm_bip.scoring.base import BlockGeometry

    geometry = BlockGeometry(1, lm.adapter.head_dim, lm.adapter.widths(block))
    scores = make_scorer("llm-bip", lipschitz="none").score_block(parts, stats, geometry)
    for k in (0, 5, 17):
        column = parts.down_proj.weight[:, k].clone()
        with torch.no_grad():
            parts.down_proj.weight[:, k] = 0
            from llm_bip.activations import run_block

            removed = run_block(block, out)
            parts.down_proj.weight[:, k] = column
        change = torch.sqrt(sum(((a - b) ** 2).sum() for a, b in zip(dense.hidden, removed.hidden, strict=True)))
        assert torch.isclose(scores.channels[k], change, rtol=1e-3), (k, scores.channels[k], change)


def test_exact_head_reference_matches_measured_removal_and_bounds():
    """The 'exact' L variant measures the true block-output change of removing a head; the (1+L)
    bound with L=0 underestimates it no more than the FFN branch adds, and (1 + L_jvp) is a
    reasonable upper estimate on average."""
    lm = tiny_model("llama")
    ids = tiny_samples(n=2, length=10)
    blocks = lm.adapter.blocks(lm.model)
    inputs = capture_block_inputs(lm.model, lm.adapter, ids, batch_size=2)
    block, parts = blocks[0], lm.adapter.parts(blocks[0])
    stats, dense = collect_block_stats(block, parts, inputs, StatsRequest(residual_sample=1000), 0)
    assert stats.residual_sample.shape[0] == stats.tokens  # the whole (tiny) data set is the sample
    from llm_bip.activations import run_block
    from llm_bip.scoring.base import BlockGeometry

    geometry = BlockGeometry(0, lm.adapter.head_dim, lm.adapter.widths(block))
    exact = make_scorer("llm-bip", lipschitz="exact").score_block(parts, stats, geometry)
    for h in (0, 3):
        cols = slice(h * geometry.head_dim, (h + 1) * geometry.head_dim)
        saved = parts.o_proj.weight[:, cols].clone()
        with torch.no_grad():
            parts.o_proj.weight[:, cols] = 0
            removed = run_block(block, inputs)
            parts.o_proj.weight[:, cols] = saved
        change = torch.sqrt(sum(((a - b) ** 2).sum() for a, b in zip(dense.hidden, removed.hidden, strict=True)))
        assert torch.isclose(exact.heads[h], change, rtol=1e-3)


@pytest.mark.parametrize("family", ["gemma2", "gemma3_text"])
def test_scores_through_the_norms_after_the_sub_layers(family):
    """Gemma normalises o_proj's and down_proj's outputs before the residual add. A channel's score is its
    block-output change to first order through that norm (within 10% on the tiny model), the 'exact' head
    reference is the measured change, and (1 + L_jvp) bounds it from above."""
    from llm_bip.activations import run_block
    from llm_bip.pipeline import geometry

    lm = tiny_model(family)
    inputs = capture_block_inputs(lm.model, lm.adapter, tiny_samples(n=2, length=12), batch_size=2)
    block, layer = lm.adapter.blocks(lm.model)[1], 1
    parts = lm.adapter.parts(block)
    assert parts.post_attention_norm is block.pre_feedforward_layernorm  # N2 is the norm in front of the FFN
    _, inputs = collect_block_stats(lm.adapter.blocks(lm.model)[0], lm.adapter.parts(lm.adapter.blocks(lm.model)[0]),
                                    inputs, StatsRequest(), 0)
    stats, dense = collect_block_stats(block, parts, inputs, StatsRequest(residual_sample=1000), layer)
    assert stats.ffn_gain_sq != 1.0 and stats.attn_gain_sq != 1.0

    def change(linear, cols) -> torch.Tensor:
        saved = linear.weight[:, cols].clone()
        with torch.no_grad():
            linear.weight[:, cols] = 0
            removed = run_block(block, inputs, layer=layer)
            linear.weight[:, cols] = saved
        return torch.sqrt(sum(((a - b) ** 2).sum() for a, b in zip(dense.hidden, removed.hidden, strict=True)))

    g = geometry(lm, layer)
    scores = {v: make_scorer("llm-bip", lipschitz=v).score_block(parts, stats, g) for v in ("none", "exact", "jvp")}
    for k in (0, 5, 17, 60):
        assert torch.isclose(scores["none"].channels[k], change(parts.down_proj, k), rtol=0.1)
    for h in (0, 3):
        true = change(parts.o_proj, slice(h * g.head_dim, (h + 1) * g.head_dim))
        assert torch.isclose(scores["exact"].heads[h], true, rtol=1e-3)
        assert scores["jvp"].heads[h] > true


def test_scores_are_deterministic():
    lm = tiny_model("qwen2")
    ids = tiny_samples()
    a = score(lm, make_scorer("llm-bip"), ids, progress=False)
    b = score(lm, make_scorer("llm-bip"), ids, progress=False)
    for x, y in zip(a.scores, b.scores, strict=True):
        assert torch.equal(x.heads, y.heads) and torch.equal(x.channels, y.channels)


def test_score_tables_keep_the_lipschitz_factor_that_protects_heads():
    # A scoring pass keeps every head, yet its table is what the adaptive allocators weigh heads against
    # channels by: every block's head scores carry (1 + L) (once they had L = 0 wherever no head was cut).
    lm = tiny_model("llama")
    table = score(lm, make_scorer("llm-bip"), tiny_samples(), progress=False)
    assert all(s.lipschitz > 0 for s in table.scores)
    plain = score(lm, make_scorer("llm-bip", lipschitz="none"), tiny_samples(), progress=False)
    for with_l, without in zip(table.scores, plain.scores, strict=True):
        assert torch.allclose(with_l.heads, without.heads * (1 + with_l.lipschitz), rtol=1e-4)
        assert torch.allclose(with_l.channels, without.channels, rtol=1e-5)


def test_scores_replan_without_the_model(tmp_path):
    lm = tiny_model("llama")
    table = score(lm, make_scorer("llm-bip"), tiny_samples(), progress=False)
    table.save(tmp_path / "s.safetensors")
    from llm_bip.score_table import ScoreTable

    loaded = ScoreTable.load(tmp_path / "s.safetensors")
    emb = lm.adapter.embedding_parameters(lm.model)
    for ratio in (0.1, 0.5):
        a = plan(table, PruneConfig(ratio=ratio, allocation="block-adaptive"), emb)
        b = plan(loaded, PruneConfig(ratio=ratio, allocation="block-adaptive"), emb)
        assert a.to_json() == b.to_json()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["llm-bip", "flap", "wanda-sp"])
def test_group_diagonal_gram_gives_the_scores_of_the_full_gram(family, method):
    """Scoring computes only the KV-group diagonal blocks of o_proj's input Gram; every score must
    equal the one from the full matrix."""
    from llm_bip.pipeline import geometry

    lm = tiny_model(family)
    ids = tiny_samples()
    scorer = make_scorer(method, **({"lipschitz": "none"} if method == "llm-bip" else {}))
    table = score(lm, scorer, ids, batch_size=3, progress=False)
    inputs = capture_block_inputs(lm.model, lm.adapter, ids, batch_size=3)
    for layer, block in enumerate(lm.adapter.blocks(lm.model)):
        g = geometry(lm, layer)
        part, _ = collect_block_stats(block, lm.adapter.parts(block), inputs, scorer.stats_request(), layer,
                                      g.group_width)
        full, inputs = collect_block_stats(block, lm.adapter.parts(block), inputs, scorer.stats_request(), layer)
        assert full.attn_gram_block == 0 and part.attn_gram_block == g.group_width
        blocks = full.attn_gram.reshape(g.num_kv_heads, g.group_width, g.num_kv_heads, g.group_width)
        for kv in range(g.num_kv_heads):
            assert torch.allclose(part.attn_gram.reshape_as(blocks)[kv, :, kv], blocks[kv, :, kv], atol=1e-5)
        expected = scorer.score_block(lm.adapter.parts(block), full, g)
        for kind in ("heads", "groups", "channels"):
            assert torch.allclose(getattr(table.scores[layer], kind), getattr(expected, kind), rtol=1e-4, atol=1e-6)


def test_refit_of_o_proj_refuses_a_partial_gram():
    from llm_bip.compensation import RefitCompensation
    from llm_bip.pipeline import geometry
    from llm_bip.plan import BlockPlan

    lm = tiny_model("llama")
    inputs = capture_block_inputs(lm.model, lm.adapter, tiny_samples(), batch_size=3)
    block = lm.adapter.blocks(lm.model)[0]
    g = geometry(lm, 0)
    request = StatsRequest(ffn_gram=True)
    stats, _ = collect_block_stats(block, lm.adapter.parts(block), inputs, request, 0, g.group_width)
    plan_ = BlockPlan(layer=0, keep_heads=list(range(g.group_size, g.num_heads)), keep_kv_heads=list(range(1, g.num_kv_heads)),
                      keep_channels=list(range(g.channels)))
    with pytest.raises(AssertionError, match="full Gram"):
        RefitCompensation(1.0, 0.01).compensate(lm.adapter, block, plan_, stats, inputs)


def test_text_files_follow_the_wikitext_protocol(tmp_path):
    """Non-empty lines kept as they are (WikiText's leading spaces included), joined by a blank line."""
    from llm_bip.data import load_text

    (tmp_path / "wiki.raw").write_text(" \n = Title = \n \n The first line . \n\n Second @-@ line \n")
    assert load_text(tmp_path / "wiki.raw") == " = Title = \n\n The first line . \n\n Second @-@ line "


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_centered_ffn_score_equals_the_change_after_bias_compensation(family):
    """With `centered`, a channel's score is the block-output change of removing it and adding its
    mean contribution back as a bias (what bias compensation then does)."""
    from llm_bip.activations import run_block
    from llm_bip.pipeline import geometry

    lm = tiny_model(family)
    inputs = capture_block_inputs(lm.model, lm.adapter, tiny_samples(n=2, length=10), batch_size=2)
    block = lm.adapter.blocks(lm.model)[0]
    parts = lm.adapter.parts(block)
    stats, dense = collect_block_stats(block, parts, inputs, StatsRequest(), 0)
    scores = make_scorer("llm-bip", lipschitz="none", centered=True).score_block(parts, stats, geometry(lm, 0))
    for k in (0, 7):
        column = parts.down_proj.weight[:, k].clone()
        with torch.no_grad():
            parts.down_proj.weight[:, k] = 0
            removed = run_block(block, inputs)
            parts.down_proj.weight[:, k] = column
        shift = column * stats.ffn_mean[k]  # the bias that compensation adds for this channel
        change = torch.sqrt(sum(((a - b - shift) ** 2).sum() for a, b in zip(dense.hidden, removed.hidden, strict=True)))
        assert torch.isclose(scores.channels[k], change, rtol=1e-3), (k, scores.channels[k], change)


def test_gram_of_bf16_activations_is_float32_exact_and_leaves_the_matmul_precision_as_it_was():
    from llm_bip.stats import _accumulate_gram

    x = torch.randn(512, 96, generator=torch.Generator().manual_seed(0)) * 30
    x[:, 3] *= 1e3  # a massive-activation channel, as Qwen's
    x = x.bfloat16().float()  # activations computed in bf16
    reference = x.double().T @ x.double()
    before = torch.get_float32_matmul_precision()
    total = _accumulate_gram(None, x[:256], 0, bf16_exact=True)
    total = _accumulate_gram(total, x[256:], 0, bf16_exact=True)
    assert torch.get_float32_matmul_precision() == before
    assert total.dtype == torch.float32
    scale = reference.diagonal().sqrt()
    scale = scale[:, None] * scale[None, :]  # each entry's own scale, |G_ij| <= sqrt(G_ii G_jj)

    def error_of(gram: torch.Tensor) -> float:
        """Largest error of a Gram (or its leading square block) against each entry's own scale: an entry near
        zero carries the rounding of its large addends (relative to the entry, 2-3e-5 on a CPU without AMX
        even for plain float32 bmm)."""
        n = gram.shape[0]
        return ((gram.double() - reference[:n, :n]).abs() / scale[:n, :n]).max()

    error = error_of(total)
    float32 = error_of(x.T @ x)
    rounded = error_of(x.bfloat16().T @ x.bfloat16())  # the Qwen defect
    assert error < 10 * float32 < rounded / 100  # float32 sums: no product or partial sum rounded to bf16
    blocks = _accumulate_gram(None, x, 32, bf16_exact=True)
    assert error_of(blocks[:32, :32]) < 10 * float32  # judged as the whole Gram is
    assert (blocks[:32, 32:] == 0).all()


def test_all_finite_sees_any_nan_or_inf():
    from llm_bip.activations import all_finite

    x = torch.randn(4, 8, 16).bfloat16()
    assert all_finite(x)
    for bad in (float("nan"), float("inf"), float("-inf")):
        y = x.clone()
        y[2, 5, 7] = bad
        assert not all_finite(y)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("autocast", [False, True])
def test_ffn_sublayer_from_the_kept_residuals_equals_the_block(family, autocast):
    """The block's output rebuilt from the FFN residual inputs a statistics pass keeps (the sequential loop's
    shortcut where the attention is unchanged) is the block's own output, bit for bit, also under bf16
    autocast."""
    from llm_bip.activations import run_block, run_ffn_sublayer

    lm = tiny_model(family)
    ids = tiny_samples()
    inputs = capture_block_inputs(lm.model, lm.adapter, ids, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        for layer, block in enumerate(lm.adapter.blocks(lm.model)):
            stats, _ = collect_block_stats(block, lm.adapter.parts(block), inputs, StatsRequest(ffn_inputs=True), layer,
                                           keep_outputs=False)
            assert len(stats.ffn_inputs) == len(inputs.hidden)
            rebuilt = run_ffn_sublayer(lm.adapter, block, stats.ffn_inputs, inputs, layer)
            inputs = run_block(block, inputs, layer=layer)
            assert all(torch.equal(a, b) for a, b in zip(rebuilt.hidden, inputs.hidden, strict=True)), layer
            assert stats.ffn_inputs == [None] * len(inputs.hidden)  # each dropped once used


@pytest.mark.parametrize("family, heads, options", [
    *((family, heads, {}) for family in ("llama", "gemma2", "phi3") for heads in (0.0, 0.5)),
    *(("qwen2", 0.0, options) for options in ({"refit_target": "dense"}, {"compensation": "bias"},
                                              {"selection": "refit-aware"}, {"compensation": "none"})),
])
def test_sequential_prune_is_the_same_with_and_without_the_ffn_shortcut(family, heads, options, monkeypatch):
    """The shortcut is taken exactly where no head goes, and changes nothing, whatever repairs the block: the
    pruned model is the one the whole-block pass gives."""
    import llm_bip.block_loop as block_loop

    lm = tiny_model(family)
    ids = tiny_samples()
    calls = []
    real = block_loop.run_ffn_sublayer
    monkeypatch.setattr(block_loop, "run_ffn_sublayer", lambda *a, **k: calls.append(1) or real(*a, **k))
    config = PruneConfig(ratio=0.3, head_ratio=heads, **options)
    shortcut = copy.deepcopy(lm)
    blocks = prune(shortcut, config, ids, progress=False).plan.blocks
    all_heads = lm.model.config.num_attention_heads
    expected = sum(b.widths.num_heads == all_heads for b in blocks)
    assert len(calls) == expected and (expected == len(blocks) if heads == 0 else expected < len(blocks))
    monkeypatch.setattr(block_loop, "_attention_state", lambda *_: None)  # never equal: the whole block runs
    whole = copy.deepcopy(lm)
    prune(whole, config, ids, progress=False)
    assert len(calls) == expected
    assert torch.equal(logits(shortcut, ids), logits(whole, ids))


def test_a_compensation_that_writes_into_the_attention_turns_the_shortcut_off(monkeypatch):
    """Even with every head kept, a block whose attention weights changed after its statistics pass is run
    whole again (the kept residuals would be stale)."""
    import llm_bip.block_loop as block_loop
    from llm_bip.compensation import RefitCompensation

    lm = tiny_model("llama")
    ids = tiny_samples()
    calls = []
    monkeypatch.setattr(block_loop, "run_ffn_sublayer", lambda *a, **k: calls.append(1))
    original = RefitCompensation.compensate

    def compensate(self, adapter, block, plan, stats, inputs):
        adapter.parts(block).o_proj.weight.mul_(0.5)
        return original(self, adapter, block, plan, stats, inputs)

    monkeypatch.setattr(RefitCompensation, "compensate", compensate)
    prune(lm, PruneConfig(ratio=0.3), ids, progress=False)
    assert calls == []

