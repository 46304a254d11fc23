"""The baseline scorers (FLAP, Wanda-sp, LLM-Pruner's Taylor): shapes, determinism, values worked out by
hand on a toy block, FLAP's allocation, and a full prune with each on every family."""

from __future__ import annotations

import copy
import math
import statistics

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from conftest import FAMILIES, tiny_model, tiny_samples
from llm_bip.adapters import adapter_for
from llm_bip.adapters.base import weight_rows
from llm_bip.allocation import AllocationConfig, allocate
from llm_bip.errors import LlmBipError
from llm_bip.params import count_parameters
from llm_bip.pipeline import PruneConfig, geometry, prune, score
from llm_bip.scoring import make_scorer
from llm_bip.scoring.base import BlockGeometry
from llm_bip.scoring.flap import FlapScorer
from llm_bip.scoring.taylor import TaylorScorer, check_gradient_memory
from llm_bip.scoring.wanda_sp import WandaSpScorer
from llm_bip.stats import BlockStats
from llm_bip.widths import BlockWidths

BASELINES = ["flap", "wanda-sp", "taylor", "taylor-vector"]


pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------ shapes, determinism


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", BASELINES)
def test_scores_have_block_shapes_and_repeat_exactly(family, method):
    lm = tiny_model(family)
    ids = tiny_samples()
    first = score(lm, make_scorer(method), ids, batch_size=4, progress=False)
    second = score(lm, make_scorer(method), ids, batch_size=4, progress=False)
    for layer, (a, b) in enumerate(zip(first.scores, second.scores, strict=True)):
        g = geometry(lm, layer)
        assert a.heads.shape == (g.num_heads,) and a.groups.shape == (g.num_kv_heads,)
        assert a.channels.shape == (g.channels,)
        for name in ("heads", "groups", "channels"):
            assert torch.isfinite(getattr(a, name)).all()
            assert torch.equal(getattr(a, name), getattr(b, name)), (layer, name)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", BASELINES)
@pytest.mark.parametrize("gqa_mode", ["kv-groups", "query-heads"])
def test_prune_runs_with_each_baseline(family, method, gqa_mode):
    lm = tiny_model(family)
    ids = tiny_samples()
    before = count_parameters(lm.model, lm.adapter)["total"]
    mode = "sequential" if method == "wanda-sp" else "parallel"
    result = prune(lm, PruneConfig(method=method, ratio=0.3, gqa_mode=gqa_mode, calibration_mode=mode,
                                   compensation="bias"), ids, batch_size=4, progress=False)
    assert count_parameters(lm.model, lm.adapter)["total"] < before
    assert result.report["method"] == method
    with torch.no_grad():
        assert torch.isfinite(lm.model(ids).logits).all()


# ------------------------------------------------------------------------------- values by hand


def toy_block():
    """One block: hidden 4, two query heads of size 2 sharing one KV head, three FFN channels."""
    config = LlamaConfig(hidden_size=4, intermediate_size=3, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=2, vocab_size=16)
    model = AutoModelForCausalLM.from_config(config)
    adapter = adapter_for(model)
    parts = adapter.parts(adapter.blocks(model)[0])
    with torch.no_grad():
        parts.o_proj.weight.copy_(torch.tensor([[1., 0, 0, 0], [0, -2, 0, 0], [0, 0, 1, 1], [1, 0, 0, 0]]))
        parts.down_proj.weight.copy_(torch.tensor([[1., 0, 0], [0, 1, 0], [0, 0, -3], [1, 0, 0]]))
    # Two tokens. o_proj inputs: sum [2, 0, 0, 0], sum of squares (Gram diagonal) [4, 1, 9, 0];
    # down_proj inputs: sum [0, 2, 0], sum of squares [1, 4, 0].
    gram = torch.diag(torch.tensor([4., 1, 9, 0]))
    gram[0, 1] = gram[1, 0] = 0.5  # off-diagonal terms must not matter to either score
    stats = BlockStats(tokens=2, attn_sum=torch.tensor([2., 0, 0, 0]), attn_gram=gram,
                       ffn_sum=torch.tensor([0., 2, 0]), ffn_sq=torch.tensor([1., 4, 0]), output_sq=4.0)
    return parts, stats, BlockGeometry(layer=0, head_dim=2, widths=BlockWidths(2, 1, 3))


def test_wanda_sp_by_hand():
    parts, stats, geo = toy_block()
    s = WandaSpScorer().score_block(parts, stats, geo)
    # sum_i |W_ij| = [2, 2, 1, 1] times ||x_j|| = [2, 1, 3, 0] → columns [4, 2, 3, 0]
    assert s.heads.tolist() == [6.0, 3.0]
    assert s.groups.tolist() == [9.0]
    # down: sum_i |W_ik| = [2, 1, 3] times ||a_k|| = [1, 2, 0]
    assert s.channels.tolist() == [2.0, 2.0, 0.0]


def test_flap_by_hand():
    parts, stats, geo = toy_block()
    # var = E[x^2] - E[x]^2 = [2 - 1, 0.5, 4.5, 0]; sum_i W_ij^2 = [2, 4, 1, 1]; WIFV = [2, 2, 4.5, 0], squared.
    attn = [4.0, 4.0, 20.25, 0.0]
    mean, sd = statistics.fmean(attn), statistics.stdev(attn)
    z = [(a - mean) / sd for a in attn]
    s = FlapScorer().score_block(parts, stats, geo)
    assert s.heads.tolist() == pytest.approx([(z[0] + z[1]) / 2, (z[2] + z[3]) / 2], abs=1e-6)
    assert s.groups.tolist() == pytest.approx([0.0], abs=1e-6)  # the mean of a whole standardised layer
    # FFN: var = [0.5, 2 - 1, 0]; sum_i W_ik^2 = [2, 1, 9]; WIFV = [1, 1, 0], standardised
    sd = math.sqrt(1 / 3)
    assert s.channels.tolist() == pytest.approx([1 / 3 / sd, 1 / 3 / sd, -2 / 3 / sd], abs=1e-6)
    raw = FlapScorer(standardize=False).score_block(parts, stats, geo)
    assert raw.heads.tolist() == pytest.approx([8.0, 20.25])
    assert raw.channels.tolist() == pytest.approx([1.0, 1.0, 0.0])


def test_taylor_groups_by_hand():
    """A head = its q rows + o columns; a KV group = its heads + its k and v rows; a channel = gate row
    + up row + down column (accumulators as the gradient pass leaves them)."""
    parts, stats, geo = toy_block()
    scorer = TaylorScorer()
    scorer._acc = [{
        "q": torch.tensor([1., 2, 3, 4]), "o": torch.tensor([10., 20, 30, 40]),
        "k": torch.tensor([100., 200]), "v": torch.tensor([1000., 2000]),
        "gate": torch.tensor([1., 2, 3]), "up": torch.tensor([10., 20, 30]), "down": torch.tensor([100., 200, 300]),
    }]
    s = scorer.score_block(parts, stats, geo)
    assert s.heads.tolist() == [33.0, 77.0]
    assert s.groups.tolist() == [33.0 + 77.0 + 300.0 + 3000.0]
    assert s.channels.tolist() == [111.0, 222.0, 333.0]


def reference_taylor(lm, ids, variant):
    """LLM-Pruner's definition on full gradients of one batch (the memory-hungry way)."""
    model = copy.deepcopy(lm.model)
    model.zero_grad()
    model(input_ids=ids, labels=ids).loss.backward()
    out = []
    for block in lm.adapter.blocks(model):
        p = lm.adapter.parts(block)
        acc = {}
        for name, axis in (("q", 1), ("k", 1), ("v", 1), ("o", 0), ("gate", 1), ("up", 1), ("down", 0)):
            w, rows = weight_rows(getattr(p, f"{name}_proj"))  # Phi-3: rows of the fused qkv / gate_up weight
            s = (w.detach() * w.grad)[rows]
            acc[name] = s.abs().sum(axis) if variant == "element1" else s.sum(axis).abs()
        out.append(acc)
    return out


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "phi3"])
@pytest.mark.parametrize("variant", ["element1", "vector"])
def test_taylor_matches_full_gradient_reference(family, variant):
    lm = tiny_model(family)
    ids = tiny_samples()
    scorer = TaylorScorer(variant)
    scorer.prepare(lm, ids, batch_size=len(ids))  # one batch: LLM-Pruner's protocol
    expected = reference_taylor(lm, ids, variant)
    for got, want in zip(scorer._acc, expected, strict=True):
        for name in want:
            assert torch.allclose(got[name], want[name], rtol=1e-4, atol=1e-7), name


def test_taylor_vector_is_exact_over_batches():
    """Batches weighted by their token share give the full-data gradient: the vector variant (linear in
    it) does not depend on the batch size."""
    lm = tiny_model("llama")
    ids = tiny_samples()
    whole, split = TaylorScorer("vector"), TaylorScorer("vector")
    whole.prepare(lm, ids, batch_size=len(ids))
    split.prepare(lm, ids, batch_size=2)
    for a, b in zip(whole._acc, split._acc, strict=True):
        for name in a:
            assert torch.allclose(a[name], b[name], rtol=1e-4, atol=1e-7)


def test_taylor_leaves_no_gradients_and_restores_flags():
    lm = tiny_model("mistral")
    flags = {n: p.requires_grad for n, p in lm.model.named_parameters()}
    live = []

    def count_live(_p):
        live.append(sum(q.grad is not None for q in lm.model.parameters()))

    # A second post-accumulate hook on every weight sees at most the weight being folded carrying a grad.
    handles = [p.register_post_accumulate_grad_hook(count_live) for n, p in lm.model.named_parameters()
               if n.endswith("proj.weight")]
    TaylorScorer().prepare(lm, tiny_samples(), batch_size=3)
    for h in handles:
        h.remove()
    assert live and max(live) <= 1
    assert all(p.grad is None for p in lm.model.parameters())
    assert {n: p.requires_grad for n, p in lm.model.named_parameters()} == flags


def test_taylor_without_gradient_pass_says_why():
    lm = tiny_model("llama")
    with pytest.raises(LlmBipError, match="one gradient pass.*calibration-mode parallel"):
        prune(lm, PruneConfig(method="taylor", ratio=0.2, calibration_mode="sequential"), tiny_samples(),
              progress=False)


def test_taylor_memory_check(monkeypatch):
    lm = tiny_model("llama")
    assert check_gradient_memory(lm, 4, 16) > 0
    monkeypatch.setattr("llm_bip.scoring.taylor.available_memory_bytes", lambda: 1000)
    with pytest.raises(LlmBipError, match="lower --batch-size"):
        check_gradient_memory(lm, 4, 16)


def test_unknown_options_fail():
    with pytest.raises(LlmBipError):
        TaylorScorer("element2")
    with pytest.raises(LlmBipError):
        FlapScorer(metric="nope")


# --------------------------------------------------------------------------------- FLAP allocation


@pytest.mark.parametrize("gqa_mode", ["kv-groups", "query-heads"])
@pytest.mark.parametrize("ratio", [0.1, 0.3, 0.6])
def test_flap_allocation_hits_target_and_keeps_one_of_each(gqa_mode, ratio):
    lm = tiny_model("llama")
    table = score(lm, FlapScorer(), tiny_samples(), progress=False)
    target = round(ratio * sum(c.prunable for c in table.costs))
    widths = allocate(table.costs, target, AllocationConfig(strategy="flap", gqa_mode=gqa_mode), table.scores)
    removed = sum(c.prunable - (c.total(w) - c.fixed)
                  for c, w in zip(table.costs, widths, strict=True))
    assert 0 <= target - removed < table.costs[0].channel
    for w in widths:
        assert w.num_heads >= 1 and w.num_kv_heads >= 1 and w.channels >= 1
        assert w.num_heads % w.num_kv_heads == 0


def test_flap_allocation_follows_scores_across_layers():
    """One threshold over all layers: the layer whose channels score lowest gives up channels first."""
    lm = tiny_model("llama")
    table = score(lm, FlapScorer(), tiny_samples(), progress=False)
    for layer, s in enumerate(table.scores):
        s.channels = torch.full_like(s.channels, -5.0 if layer == 1 else 5.0)
        s.groups = torch.full_like(s.groups, 10.0)
    c = table.costs[1]
    widths = allocate(table.costs, 10 * c.channel, AllocationConfig(strategy="flap"), table.scores)
    assert [w.channels for w in widths] == [table.costs[0].widths.channels, c.widths.channels - 10,
                                            table.costs[2].widths.channels]
    with pytest.raises(LlmBipError, match="prunable layers"):
        allocate(table.costs, 10 * c.channel, AllocationConfig(strategy="flap", prunable_layers=()), table.scores)
    only = allocate(table.costs, 10 * c.channel, AllocationConfig(strategy="flap", prunable_layers=(0,)), table.scores)
    assert [w.channels for w in only][1:] == [c.widths.channels, table.costs[2].widths.channels]
