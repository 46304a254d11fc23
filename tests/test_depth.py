"""Whole-block removal (depth pruning): block scores, plans, cutting, saving, streaming and the CLI, on tiny
random models of every family."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from conftest import FAMILIES, TINY_CONFIGS, VOCAB, tiny_from_config, tiny_model, tiny_samples
from llm_bip import api
from llm_bip.cli import main
from llm_bip.config import PruneConfig
from llm_bip.errors import LlmBipError
from llm_bip.fingerprint import fingerprint_of
from llm_bip.loading import LoadedModel
from llm_bip.pipeline import plan, prune, score
from llm_bip.plan import BlockPlan, PruningPlan
from llm_bip.saving import save_pruned
from llm_bip.score_table import ScoreTable
from llm_bip.scoring import make_scorer
from llm_bip.surgery import mask_plan

pytestmark = pytest.mark.usefixtures("one_thread")
STOCK_TYPE = {"llama": "llama", "llama-mha": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3",
              "phi3": "phi3", "gemma2": "gemma2", "gemma3_text": "gemma3_text"}


def deep_config(family: str, layers: int = 4, **changes):
    """The family's tiny config with more blocks (per-layer lists rebuilt for the new depth)."""
    config = TINY_CONFIGS[family]()
    data = {**config.to_dict(), "num_hidden_layers": layers, **changes}
    data.pop("layer_types", None)
    return type(config).from_dict(data)


def tiny(family: str, layers: int = 4, seed: int = 0, **changes) -> LoadedModel:
    """As conftest.tiny_model, at another depth."""
    torch.manual_seed(seed)
    return tiny_from_config(deep_config(family, layers, **changes), f"tiny-{family}-{layers}")


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def skipping(model: nn.Module, layer: int):
    """The model run with block `layer` skipped: its output replaced by its input."""
    block = model.model.layers[layer]
    return block.register_forward_hook(lambda _m, args, kwargs, _out: args[0] if args else kwargs["hidden_states"],
                                       with_kwargs=True)


def removal_plan(lm: LoadedModel, removed: list[int]) -> PruningPlan:
    blocks = [BlockPlan.remove(i) if i in removed else BlockPlan.keep_all(i, lm.adapter.widths(b))
              for i, b in enumerate(lm.adapter.blocks(lm.model))]
    return PruningPlan(blocks=blocks, fingerprint=fingerprint_of(lm))


def make_identity(lm: LoadedModel, layer: int) -> None:
    parts = lm.adapter.parts(lm.adapter.blocks(lm.model)[layer])
    with torch.no_grad():
        for linear in (parts.o_proj, parts.down_proj):
            linear.weight.zero_()
            if linear.bias is not None:
                linear.bias.zero_()


# ------------------------------------------------------------------------------- (a) skip == remove


@pytest.mark.parametrize("family", FAMILIES)
def test_a_plan_that_removes_a_block_gives_the_logits_of_the_model_without_it(family):
    """For every block k: applying a plan that removes k gives the logits of the dense model run with k
    skipped, of the model with k deleted by hand, and of the masked reference; the rest are renumbered."""
    dense = tiny_model(family)
    ids = tiny_samples()
    for k in range(dense.adapter.num_blocks):
        handle = skipping(dense.model, k)
        expected = logits(dense.model, ids)
        handle.remove()
        by_hand = copy.deepcopy(dense.model)
        by_hand.model.layers = nn.ModuleList([b for i, b in enumerate(by_hand.model.layers) if i != k])
        by_hand.config.num_hidden_layers -= 1
        if getattr(by_hand.config, "layer_types", None):  # each block keeps its type (Gemma's sliding/full mix)
            by_hand.config.layer_types = [t for i, t in enumerate(by_hand.config.layer_types) if i != k]
        masked = mask_plan(copy.deepcopy(dense.model), dense.adapter, removal_plan(dense, [k]))
        lm = copy.deepcopy(dense)
        result = api.apply_plan(lm, removal_plan(lm, [k]))
        got = logits(lm.model, ids)
        assert torch.allclose(got, expected, atol=1e-5), (family, k)
        assert torch.equal(got, logits(by_hand, ids)), (family, k)
        assert torch.allclose(got, logits(masked, ids), atol=1e-5), (family, k)
        blocks = lm.adapter.blocks(lm.model)
        assert len(blocks) == lm.model.config.num_hidden_layers == lm.adapter.num_blocks == dense.adapter.num_blocks - 1
        assert [b.self_attn.layer_idx for b in blocks] == list(range(len(blocks)))
        assert result.report["removed_blocks"] == [k] and result.plan.removed_layers == [k]
        assert result.report["removed"] == sum(p.numel() for p in dense.adapter.blocks(dense.model)[k].parameters())


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_kv_cache_after_removal(family):
    """The renumbered layer_idx give each remaining block its own cache slot: decoding one token with the
    cache gives the logits of the whole sequence."""
    lm = tiny(family)
    api.apply_plan(lm, removal_plan(lm, [0, 2]))
    ids = tiny_samples(n=2)
    with torch.no_grad():
        whole = lm.model(ids).logits[:, -1]
        out = lm.model(ids[:, :-1], use_cache=True)
        step = lm.model(ids[:, -1:], cache=out.cache, use_cache=True).logits[:, -1]
    assert torch.allclose(step, whole, atol=1e-5)


def test_per_layer_config_lists_follow_the_removal(tmp_path):
    """Qwen2 with sliding-window layers: layer_types loses the removed block's entry, max_window_layers
    counts the kept full-attention layers, and the saved model computes what the skipped dense one does."""
    lm = tiny("qwen2", layers=4, use_sliding_window=True, sliding_window=4, max_window_layers=2)
    assert lm.model.config.layer_types == ["full_attention"] * 2 + ["sliding_attention"] * 2
    ids = tiny_samples(n=2, length=12)
    handle = skipping(lm.model, 1)
    expected = logits(lm.model, ids)
    handle.remove()
    result = api.apply_plan(lm, removal_plan(lm, [1]))
    config = lm.model.config
    assert config.layer_types == ["full_attention", "sliding_attention", "sliding_attention"]
    assert config.max_window_layers == 1 and config.num_hidden_layers == 3
    assert torch.allclose(logits(lm.model, ids), expected, atol=1e-5)
    out = save_pruned(lm.model, None, lm.adapter, tmp_path / "out", result.report)
    saved = json.loads((out / "config.json").read_text())
    assert saved["layer_types"] == config.layer_types and saved["num_hidden_layers"] == 3
    assert torch.allclose(logits(AutoModelForCausalLM.from_pretrained(out).eval(), ids), expected, atol=1e-5)


# ------------------------------------------------------------------------------- (b), (c) saving


def _prune_and_save(lm: LoadedModel, tmp_path: Path, **config):
    ids = tiny_samples()
    result = prune(lm, PruneConfig(**config), ids, progress=False)
    out = save_pruned(lm.model, None, lm.adapter, tmp_path / "pruned", result.report)
    return out, ids, logits(lm.model, ids), result


@pytest.mark.parametrize("family", FAMILIES)
def test_b_blocks_removed_with_uniform_widths_save_with_the_stock_config(family, tmp_path):
    lm = tiny(family)
    out, ids, expected, result = _prune_and_save(lm, tmp_path, ratio=0.5, remove_blocks=1, compensation="none")
    removed = result.report["removed_blocks"]
    assert len(removed) == 1 and 0.49 < result.report["removed_fraction"]["non_embedding"] < 0.51
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == STOCK_TYPE[family] and config["num_hidden_layers"] == 3
    assert "auto_map" not in config and not (out / "modeling_llm_bip.py").exists()
    record = json.loads((out / "pruning_record.json").read_text())
    assert record["saved_format"] == "stock" and record["removed_blocks"] == removed
    assert len(record["layer_widths"]) == 3 and record["depth"]["removed"] == removed
    assert len({w["intermediate_size"] for w in record["layer_widths"]}) == 1
    assert record["layer_widths"][0]["intermediate_size"] < 96  # widths were pruned too
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert len(model.model.layers) == 3
    assert torch.allclose(logits(model, ids), expected, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_blocks_only_save_with_the_stock_config(family, tmp_path):
    lm = tiny(family)
    dense = copy.deepcopy(lm.model)
    out, ids, expected, result = _prune_and_save(lm, tmp_path, ratio=None, depth_ratio=0.5)
    assert len(result.report["removed_blocks"]) == 2 and result.report["compensation"]["method"] == "none"
    assert result.report["selection"] == "whole blocks only"
    handles = [skipping(dense, k) for k in result.report["removed_blocks"]]
    assert torch.allclose(expected, logits(dense, ids), atol=1e-5)  # nothing else changed
    for handle in handles:
        handle.remove()
    assert json.loads((out / "config.json").read_text())["model_type"] == STOCK_TYPE[family]
    assert torch.allclose(logits(AutoModelForCausalLM.from_pretrained(out).eval(), ids), expected, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("compensation", ["bias", "refit"])
def test_c_blocks_removed_with_non_uniform_widths_round_trip_the_custom_format(family, compensation, tmp_path):
    lm = tiny(family)
    # The tiny Gemmas' blocks are so alike that block-adaptive gives each the same widths (and a refit the
    # stock config can hold): one block left dense makes them differ.
    options = {"ratio": 0.5, **({"prunable_layers": (0, 1, 2), "ratio": 0.4} if family.startswith("gemma") else {})}
    out, ids, expected, result = _prune_and_save(lm, tmp_path, remove_blocks=1, allocation="block-adaptive",
                                                 compensation=compensation, **options)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == f"llm_bip_{STOCK_TYPE[family]}" and (out / "modeling_llm_bip.py").exists()
    assert config["num_hidden_layers"] == 3 and len(config["layer_widths"]) == 3
    model = AutoModelForCausalLM.from_pretrained(out).eval()  # llm_bip is imported: no flag needed
    assert len(model.model.layers) == 3
    assert torch.allclose(logits(model, ids), expected, atol=1e-5)
    record = json.loads((out / "pruning_record.json").read_text())
    assert record["removed_blocks"] == result.report["removed_blocks"]
    assert {"block": "removed"} in record["compensation"]["blocks"]


# ------------------------------------------------------------------------------- (d) plan formats


def test_d_plans_of_format_1_still_load(tmp_path):
    lm = tiny("llama")
    table = score(lm, make_scorer("llm-bip"), tiny_samples(), progress=False)
    new = plan(table, PruneConfig(ratio=0.3), lm.adapter.embedding_parameters(lm.model))
    data = new.to_json()
    assert data["format"] == "llm-bip-plan/2" and data["removed_layers"] == []
    data["format"] = "llm-bip-plan/1"
    del data["removed_layers"]
    for block in data["blocks"]:
        del block["removed"]
    (tmp_path / "old.json").write_text(json.dumps(data))
    old = PruningPlan.load(tmp_path / "old.json")
    assert old.to_json()["blocks"] == new.to_json()["blocks"] and old.removed_layers == []
    a, b = copy.deepcopy(lm), copy.deepcopy(lm)
    api.apply_plan(a, old)
    api.apply_plan(b, new)
    assert torch.equal(logits(a.model, tiny_samples()), logits(b.model, tiny_samples()))
    (tmp_path / "future.json").write_text(json.dumps({**data, "format": "llm-bip-plan/9"}))
    with pytest.raises(LlmBipError, match="not an llm-bip-plan/2 file"):
        PruningPlan.load(tmp_path / "future.json")


def test_plans_with_removed_blocks_save_load_and_summarise(tmp_path):
    lm = tiny("qwen2")
    table = score(lm, make_scorer("llm-bip"), tiny_samples(), progress=False)
    p = plan(table, PruneConfig(ratio=0.6, depth_ratio=0.5), lm.adapter.embedding_parameters(lm.model))
    p.save(tmp_path / "plan.json")
    back = PruningPlan.load(tmp_path / "plan.json")
    assert back.to_json() == p.to_json() and len(back.removed_layers) == 2
    assert f"removed blocks: {', '.join(map(str, back.removed_layers))} (2 of 4)" in back.summary()
    assert back.meta["removed_blocks"] == back.removed_layers
    assert 0.59 < back.meta["removed_fraction"]["non_embedding"] < 0.61
    ids = tiny_samples()
    masked = mask_plan(copy.deepcopy(lm.model), lm.adapter, back)
    api.apply_plan(lm, back)
    assert torch.allclose(logits(lm.model, ids), logits(masked, ids), atol=1e-5)


def _old_scores_file(table: ScoreTable, path: Path) -> Path:
    """`table` saved as llm-bip-scores/1 wrote it: no block scores."""
    table.save(path)
    with safe_open(str(path), "pt") as handle:
        header = json.loads(handle.metadata()["llm_bip"])
    header["format"] = "llm-bip-scores/1"
    for block in header["blocks"]:
        del block["block_score"]
    save_file(load_file(str(path)), str(path), metadata={"llm_bip": json.dumps(header)})
    return path


def test_scores_format_1_still_loads_but_cannot_remove_blocks(tmp_path):
    lm = tiny("llama")
    table = score(lm, make_scorer("llm-bip"), tiny_samples(), progress=False)
    table.save(tmp_path / "new.safetensors")
    assert ScoreTable.load(tmp_path / "new.safetensors").block_scores() == table.block_scores()
    old = ScoreTable.load(_old_scores_file(table, tmp_path / "old.safetensors"))
    emb = lm.adapter.embedding_parameters(lm.model)
    assert plan(old, PruneConfig(ratio=0.3), emb).to_json() == plan(table, PruneConfig(ratio=0.3), emb).to_json()
    with pytest.raises(LlmBipError, match="no block scores .*llm-bip score"):
        plan(old, PruneConfig(ratio=0.5, remove_blocks=1), emb)


# ------------------------------------------------------------------------------- (f) block scores


@pytest.mark.parametrize("family", FAMILIES)
def test_f_an_identity_block_scores_zero_and_goes_first(family):
    lm = tiny(family)
    make_identity(lm, 2)
    ids = tiny_samples()
    table = score(lm, make_scorer("llm-bip"), ids, progress=False)
    scores = table.block_scores()
    assert scores[2] == 0.0 and all(s > 0 for i, s in enumerate(scores) if i != 2)
    emb = lm.adapter.embedding_parameters(lm.model)
    assert plan(table, PruneConfig(ratio=None, remove_blocks=1), emb).removed_layers == [2]
    for mode in ("sequential", "parallel"):
        pruned = copy.deepcopy(lm)
        result = prune(pruned, PruneConfig(ratio=None, remove_blocks=1, calibration_mode=mode), ids, progress=False)
        assert result.report["removed_blocks"] == [2]
        assert result.report["depth"]["order"] == [{"layer": 2, "score": 0.0}]
        assert torch.equal(logits(pruned.model, ids), logits(lm.model, ids))  # the identity was all it did


def test_block_score_is_the_relative_change_of_skipping_the_block():
    lm = tiny("mistral")
    ids = tiny_samples()
    table = score(lm, make_scorer("llm-bip"), ids, progress=False)
    captured = {}

    def keep(_m, args, kwargs, out):
        captured["x"], captured["y"] = (args[0] if args else kwargs["hidden_states"]), out

    handle = lm.adapter.blocks(lm.model)[1].register_forward_hook(keep, with_kwargs=True)
    with torch.no_grad():
        lm.model(ids)
    handle.remove()
    x, y = captured["x"].double(), captured["y"].double()
    expected = float(((y - x) ** 2).sum() / (y**2).sum())
    assert table.block_scores()[1] == pytest.approx(expected, rel=1e-4)


def test_sequential_removal_scores_again_without_the_removed_blocks():
    """The second block removed is the lowest-scoring one of the model without the first, scored on that
    model's activations (not the dense model's)."""
    lm = tiny("llama", layers=5)
    ids = tiny_samples()
    dense = copy.deepcopy(lm)
    result = prune(lm, PruneConfig(ratio=None, remove_blocks=2), ids, progress=False)
    (first, s1), (second, s2) = [(o["layer"], o["score"]) for o in result.report["depth"]["order"]]
    parallel = score(copy.deepcopy(dense), make_scorer("llm-bip"), ids, progress=False).block_scores()
    assert first == min(range(5), key=lambda i: parallel[i]) and s1 == pytest.approx(parallel[first], rel=1e-5)
    assert result.report["depth"]["scores"] == pytest.approx(parallel, rel=1e-5)
    without = copy.deepcopy(dense)
    api.apply_plan(without, removal_plan(without, [first]))
    again = score(without, make_scorer("llm-bip"), ids, progress=False).block_scores()
    position = second - (first < second)
    assert position == min(range(4), key=lambda i: again[i])
    assert s2 == pytest.approx(again[position], rel=1e-5)
    if second > first:  # scored again, on the inputs of the model without `first`
        assert s2 != pytest.approx(parallel[second], rel=1e-3)
    assert result.report["removed_blocks"] == sorted([first, second])


def test_sequential_passes_start_at_the_block_removed_last(monkeypatch):
    """After the first removal a pass starts at the removed block, from the inputs it received, not at block 0;
    the blocks chosen and their scores are those of passes that start at block 0 every time."""
    from llm_bip import depth
    from llm_bip.pipeline import blocks_of, catch_inputs

    lm = tiny("llama", layers=6)
    make_identity(lm, 2)  # removed first, in the first pass: the second pass can start there
    inputs = catch_inputs(lm, tiny_samples(), 8)
    real, starts = depth.measure, []

    def counted(source, adapter, inputs_, removed, wanted, progress=False, start=0, scored=None):
        starts.append(start)
        return real(source, adapter, inputs_, removed, wanted, progress, start, scored)

    monkeypatch.setattr(depth, "measure", counted)
    fast = depth.choose_by_measuring(blocks_of(lm), lm.adapter, inputs, 3, list(range(6)), sequential=True)

    def from_block_zero(source, adapter, _inputs, removed, wanted, progress=False, start=0, scored=None):
        return real(source, adapter, inputs, removed, wanted, progress)

    monkeypatch.setattr(depth, "measure", from_block_zero)
    slow = depth.choose_by_measuring(blocks_of(lm), lm.adapter, inputs, 3, list(range(6)), sequential=True)
    assert fast["order"][0] == {"layer": 2, "score": 0.0} and starts[:2] == [0, 2]
    assert [o["layer"] for o in fast["order"]] == [o["layer"] for o in slow["order"]]
    assert [o["score"] for o in fast["order"]] == pytest.approx([o["score"] for o in slow["order"]], rel=1e-6)
    assert fast["removed"] == slow["removed"] and fast["scores"] == slow["scores"]
    with pytest.raises(ValueError, match="starts at block 3"):
        real(blocks_of(lm), lm.adapter, inputs, [], [1, 4], start=3)


def test_scores_are_restricted_to_the_prunable_layers():
    lm = tiny("llama")
    make_identity(lm, 3)
    result = prune(lm, PruneConfig(ratio=None, remove_blocks=1, prunable_layers=(0, 1, 2)), tiny_samples(),
                   progress=False)
    assert result.report["removed_blocks"] != [3] and result.report["depth"]["scores"][3] is None


def test_dense_target_refit_runs_the_dense_stream_through_removed_blocks(monkeypatch):
    """With --refit-target dense the pruned stream skips a removed block but the dense one goes through it:
    each kept block is refit towards the dense model's own activations at its depth."""
    from llm_bip.two_stream import DenseTargetRefit

    lm = tiny("llama")
    ids = tiny_samples()
    with torch.no_grad():
        hidden = lm.model(ids, output_hidden_states=True).hidden_states  # hidden[i] enters block i
    seen: dict[int, torch.Tensor] = {}
    start = DenseTargetRefit.start_block

    def spy(self, adapter, block, layer, inputs):
        if self.dense is not None:
            seen[layer] = torch.cat(self.dense)
        start(self, adapter, block, layer, inputs)

    monkeypatch.setattr(DenseTargetRefit, "start_block", spy)
    result = prune(lm, PruneConfig(ratio=0.6, remove_blocks=2, refit_target="dense", head_ratio=0.5),
                   ids, batch_size=6, progress=False)
    removed = result.report["removed_blocks"]
    kept_after_removed = [layer for layer in seen if any(r < layer for r in removed)]
    assert kept_after_removed and all(layer in seen for layer in range(1, 4) if layer not in removed)
    for layer, dense in seen.items():
        assert torch.allclose(dense, hidden[layer], atol=1e-4), layer


def test_parallel_widths_are_chosen_on_the_dense_activations():
    """In parallel mode a removed block still runs in the width loop: the blocks after it are scored on the
    dense model's activations, so scoring in the loop chooses what the saved (dense) scores choose."""
    lm = tiny("llama")
    parts = lm.adapter.parts(lm.adapter.blocks(lm.model)[0])
    with torch.no_grad():  # block 0 changes the stream least (it goes), but does change it
        parts.o_proj.weight.mul_(0.3)
        parts.down_proj.weight.mul_(0.3)
    ids = tiny_samples()
    table = score(copy.deepcopy(lm), make_scorer("llm-bip"), ids, progress=False)
    config = PruneConfig(ratio=0.5, remove_blocks=1, calibration_mode="parallel", compensation="none")
    in_loop = prune(copy.deepcopy(lm), config, ids, progress=False)
    from_table = prune(copy.deepcopy(lm), config, ids, scores=table, progress=False)
    assert in_loop.report["removed_blocks"] == from_table.report["removed_blocks"] == [0]
    assert in_loop.plan.to_json()["blocks"] == from_table.plan.to_json()["blocks"]


# ------------------------------------------------------------------------------- ratio accounting


def test_the_ratio_counts_the_removed_blocks_and_widths_take_the_rest():
    lm = tiny("llama")
    before = sum(p.numel() for p in lm.adapter.blocks(lm.model).parameters())
    result = prune(lm, PruneConfig(ratio=0.4, remove_blocks=1, compensation="none"), tiny_samples(), progress=False)
    report = result.report
    assert report["target_removed"] == round(0.4 * before)
    block = before // 4
    channel = 3 * lm.model.config.hidden_size
    assert abs(report["removed"] - report["target_removed"]) <= 3 * channel / 2  # one channel per remaining block
    assert report["removed"] > block  # the other blocks gave up channels for the rest of the target
    kept = [b for b in result.plan.blocks if not b.removed]
    assert len(kept) == 3 and len({len(b.keep_channels) for b in kept}) == 1


def test_impossible_combinations_are_clear_errors():
    lm = tiny("llama")
    ids = tiny_samples()
    cases = [
        (PruneConfig(ratio=None), "nothing to prune"),
        (PruneConfig(depth_ratio=0.5, remove_blocks=1), "give one of them"),
        (PruneConfig(depth_ratio=1.0), "outside"),
        (PruneConfig(ratio=None, remove_blocks=4), "leaves none"),
        (PruneConfig(ratio=None, depth_ratio=0.1), "removes no block"),
        (PruneConfig(ratio=0.3, remove_blocks=2), "more than --ratio 0.3"),
        (PruneConfig(ratio=None, remove_blocks=2, prunable_layers=(1,)), "cannot remove 2 blocks from layers"),
        (PruneConfig(ratio=0.5, remove_blocks=1, prunable_layers=(1,)), "no prunable block is left"),
    ]
    for config, message in cases:
        with pytest.raises(LlmBipError, match=message):
            prune(copy.deepcopy(lm), config, ids, progress=False)


# ------------------------------------------------------------------------------- (g) streaming


def tiny_tokenizer(path: Path) -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, **{f"w{i}": i + 1 for i in range(VOCAB - 1)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    tokenizer.save_pretrained(path)
    return tokenizer


def write_model(path: Path, family: str, layers: int = 4, dtype=torch.bfloat16) -> Path:
    lm = tiny(family, layers)
    lm.model.to(dtype).save_pretrained(path, max_shard_size="300KB")
    tiny_tokenizer(path)
    return path


def same_outputs(a: Path, b: Path) -> None:
    def tensors(directory):
        out = {}
        for file in sorted(directory.glob("*.safetensors")):
            out.update(load_file(str(file)))
        return out

    ta, tb = tensors(a), tensors(b)
    assert set(ta) == set(tb)
    for name in ta:
        assert ta[name].dtype == tb[name].dtype and torch.equal(ta[name], tb[name]), name
    assert json.loads((a / "config.json").read_text()) == json.loads((b / "config.json").read_text())


SAMPLES = torch.randint(0, VOCAB, (6, 16), generator=torch.Generator().manual_seed(0))
STREAM_OPTIONS = {
    "blocks-only": {"ratio": None, "remove_blocks": 1},
    "default+depth": {"ratio": 0.5, "remove_blocks": 1},
    "dense-target": {"ratio": 0.6, "depth_ratio": 0.5, "refit_target": "dense", "head_ratio": 0.5},
    "parallel-adaptive": {"ratio": 0.5, "remove_blocks": 1, "calibration_mode": "parallel",
                          "allocation": "block-adaptive", "compensation": "bias"},
}


@pytest.mark.parametrize("family", FAMILIES)
def test_g_streamed_prune_with_removed_blocks_writes_what_the_in_memory_prune_writes(family, tmp_path):
    source = write_model(tmp_path / "dense", family)
    options = STREAM_OPTIONS if family == "llama" else {"default+depth": STREAM_OPTIONS["default+depth"]}
    for name, changes in options.items():
        config = PruneConfig(**changes)
        mem_result, in_memory = api.prune_to_disk(api.load(source), config, SAMPLES, tmp_path / f"{name}-mem",
                                                  progress=False)
        str_result, streamed = api.prune_to_disk(api.load(source, streaming=True), config, SAMPLES,
                                                 tmp_path / f"{name}-str", progress=False)
        assert mem_result.report["removed_blocks"] == str_result.report["removed_blocks"] != []
        same_outputs(in_memory, streamed)
        record = json.loads((streamed / "pruning_record.json").read_text())
        assert record["streamed"] and record["removed_blocks"] == mem_result.report["removed_blocks"]
        model = AutoModelForCausalLM.from_pretrained(streamed)
        assert len(model.model.layers) == 4 - len(record["removed_blocks"])
        assert sum(p.numel() for p in model.parameters()) == record["parameters_after"]["total"]


def test_interrupted_streamed_run_with_removed_blocks_resumes_to_the_same_result(tmp_path, monkeypatch):
    from llm_bip.streaming import StreamedBlocks

    source = write_model(tmp_path / "dense", "llama")
    config = PruneConfig(ratio=0.6, remove_blocks=2, head_ratio=0.5)
    _, whole = api.prune_to_disk(api.load(source, streaming=True), config, SAMPLES, tmp_path / "whole",
                                 progress=False)
    done = StreamedBlocks.done

    def interrupted(self, layer, block):
        done(self, layer, block)
        if self.writer is not None and layer >= 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(StreamedBlocks, "done", interrupted)
    out = tmp_path / "resumed"
    with pytest.raises(LlmBipError, match="--resume"):
        api.prune_to_disk(api.load(source, streaming=True), config, SAMPLES, out, progress=False)
    monkeypatch.setattr(StreamedBlocks, "done", done)
    state = json.loads((tmp_path / ".resumed.partial" / "run.json").read_text())
    assert state["depth"]["removed"] == json.loads((whole / "pruning_record.json").read_text())["removed_blocks"]
    _, out = api.prune_to_disk(api.load(source, streaming=True), config, SAMPLES, out, resume=True, progress=False)
    same_outputs(whole, out)


# ------------------------------------------------------------------------------- (e) the CLI


def write_cli_model(folder: Path, layers: int) -> Path:
    """A float32 tiny LLaMA in `folder`/dense with a calibration text of its own words in `folder`/calib.txt."""
    path = write_model(folder / "dense", "llama", layers=layers, dtype=torch.float32)
    words = torch.randint(1, VOCAB - 1, (4000,), generator=torch.Generator().manual_seed(1))
    (folder / "calib.txt").write_text("\n".join(" ".join(f"w{int(w)}" for w in words[i:i + 40])
                                                for i in range(0, 4000, 40)))
    return path


@pytest.fixture(scope="module")
def cli_model(tmp_path_factory) -> Path:
    return write_cli_model(tmp_path_factory.mktemp("depth-cli"), layers=3)


def _cli(cli_model: Path, command: str, *extra: str) -> int:
    calib = ["--calibration", str(cli_model.parent / "calib.txt"), "--num-samples", "4", "--seq-len", "16"]
    if command == "prune":
        calib += ["--eval", "none"]
    return main([command, "--model", str(cli_model), *calib, "--quiet", *extra])


@pytest.mark.parametrize("flags, message", [
    (["--depth-ratio", "0.3", "--remove-blocks", "1"], "give one of them"),
    (["--depth-ratio", "1.5"], "depth ratio 1.5 is outside"),
    (["--depth-ratio", "0.1"], "removes no block"),
    (["--remove-blocks", "3"], "leaves none"),
    (["--remove-blocks", "0"], "must be at least 1"),
    (["--remove-blocks", "2", "--ratio", "0.3"], "more than --ratio 0.3 removes in all"),
    (["--remove-blocks", "1", "--allocation", "block-adaptive", "--head-ratio", "same"],
     "--allocation, --head-ratio cannot apply: --remove-blocks without --ratio"),
    (["--remove-blocks", "1", "--compensation", "bias"], "--compensation cannot apply"),
    (["--remove-blocks", "2", "--layers", "0-1"], "cannot remove 2 blocks from layers 0-1"),
])
def test_e_bad_combinations_are_clear_cli_errors(cli_model, tmp_path, capsys, flags, message):
    out = tmp_path / "out"
    assert _cli(cli_model, "prune", "--output", str(out), *flags) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_cli_score_plan_prune_with_removed_blocks(cli_model, tmp_path, capsys):
    scores, plan_file = tmp_path / "s.safetensors", tmp_path / "plan.json"
    assert _cli(cli_model, "score", "--output", str(scores)) == 0
    assert "block scores (relative change" in capsys.readouterr().out
    assert main(["plan", "--model", str(cli_model), "--scores", str(scores), "--remove-blocks", "1", "--ratio", "0.5",
                 "--output", str(plan_file)]) == 0
    printed = capsys.readouterr().out
    assert "removed blocks: " in printed and "(1 of 3)" in printed
    assert json.loads(plan_file.read_text())["format"] == "llm-bip-plan/2"
    # a saved plan has decided the blocks already
    assert _cli(cli_model, "prune", "--plan", str(plan_file), "--remove-blocks", "1", "--output",
                str(tmp_path / "x")) == 2
    assert "--remove-blocks cannot apply with --plan" in capsys.readouterr().err
    out = tmp_path / "from-plan"
    assert _cli(cli_model, "prune", "--plan", str(plan_file), "--output", str(out)) == 0
    record = json.loads((out / "pruning_record.json").read_text())
    assert record["removed_blocks"] == json.loads(plan_file.read_text())["removed_layers"]
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 2
    # a scores file from before block scores cannot remove blocks
    table = ScoreTable.load(scores)
    old = _old_scores_file(table, tmp_path / "old.safetensors")
    assert main(["plan", "--model", str(cli_model), "--scores", str(old), "--remove-blocks", "1",
                 "--output", str(tmp_path / "p2.json")]) == 2
    assert "no block scores" in capsys.readouterr().err


def test_cli_prune_blocks_only_and_streamed(cli_model, tmp_path):
    for extra in ([], ["--streaming"]):
        out = tmp_path / f"out{len(extra)}"
        assert _cli(cli_model, "prune", "--depth-ratio", "0.34", "--output", str(out), *extra) == 0
        record = json.loads((out / "pruning_record.json").read_text())
        assert len(record["removed_blocks"]) == 1 and record["config"]["ratio"] is None
        assert record["depth"]["mode"].startswith("sequential")
        model = AutoModelForCausalLM.from_pretrained(out)
        assert model.config.num_hidden_layers == 2 and model.config.model_type == "llama"
    same_outputs(tmp_path / "out0", tmp_path / "out1")


def test_score_command_refuses_depth_flags(cli_model, tmp_path):
    assert _cli(cli_model, "score", "--remove-blocks", "1", "--output", str(tmp_path / "s.safetensors")) == 2
