"""Phi-3's fused projections (qkv_proj: q, k, v rows; gate_up_proj: gate, up rows): what the family-wide
tests (conftest's FAMILIES) cannot see — hand-made cuts of heads and KV groups, scores read from row
ranges, the stock format with heads removed, LongRoPE with partial rotary, LoRA targets, GGUF refusal."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Phi3Config

from conftest import TINY_CONFIGS, VOCAB, tiny_from_config, tiny_model, tiny_samples
from llm_bip import api
from llm_bip.adapters import adapter_for
from llm_bip.errors import LlmBipError
from llm_bip.loading import LoadedModel, skeleton
from llm_bip.pipeline import PruneConfig, prune, score
from llm_bip.plan import BlockPlan, PruningPlan
from llm_bip.saving import save_pruned
from llm_bip.scoring import make_scorer
from llm_bip.surgery import apply_plan, cut_block, mask_plan
from llm_bip.widths import BlockWidths

pytestmark = pytest.mark.usefixtures("one_thread")

# Block 0 loses KV group 0 (and its query heads 0, 1); block 1 keeps both groups with one query head each.
# Channels out of order: the gate and up halves must follow the same order.
HAND_PLAN = [BlockPlan(0, [2, 3], [1], list(range(95, 0, -2))), BlockPlan(1, [0, 2], [0, 1], [5, 1, 60, 7, 33])]


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_cut_of_heads_groups_and_channels_equals_the_masked_dense_model():
    lm, ids = tiny_model("phi3"), tiny_samples()
    plan = PruningPlan(HAND_PLAN)
    expected = logits(mask_plan(copy.deepcopy(lm.model), lm.adapter, plan), ids)
    apply_plan(lm.model, lm.adapter, plan)
    torch.testing.assert_close(logits(lm.model, ids), expected, atol=1e-5, rtol=1e-4)
    head_dim = lm.adapter.head_dim
    assert [lm.adapter.widths(b) for b in lm.adapter.blocks(lm.model)] == [BlockWidths(2, 1, 48), BlockWidths(2, 2, 5)]
    attn, mlp = lm.model.model.layers[0].self_attn, lm.model.model.layers[0].mlp
    assert attn.qkv_proj.out_features == (2 + 2 * 1) * head_dim and mlp.gate_up_proj.out_features == 2 * 48
    assert attn.config.num_attention_heads == 2 and lm.model.config.num_attention_heads == 4  # a per-block view
    lm.model.set_attn_implementation("sdpa")  # the view reads the model config's switch through
    assert attn.config._attn_implementation == "sdpa"
    torch.testing.assert_close(logits(lm.model, ids), expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(logits(copy.deepcopy(lm.model), ids), expected, atol=1e-5, rtol=1e-4)


def test_a_cut_on_the_meta_device_gives_the_planned_shapes():
    """A resumed streamed run cuts the blocks it already wrote on the meta skeleton."""
    model = skeleton(TINY_CONFIGS["phi3"](), torch.float32)
    lm = LoadedModel(model=model, tokenizer=None, adapter=adapter_for(model), source="meta")
    for block, plan in zip(lm.adapter.blocks(model), HAND_PLAN, strict=True):
        cut_block(lm.adapter, block, plan)
        assert lm.adapter.widths(block) == plan.widths and block.self_attn.qkv_proj.weight.is_meta


def _unfused_llama(lm: LoadedModel) -> LoadedModel:
    """The same network as LLaMA, with q/k/v and gate/up split out of the fused weights."""
    c = lm.model.config
    config = LlamaConfig(hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                         num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                         num_key_value_heads=c.num_key_value_heads, vocab_size=c.vocab_size, rms_norm_eps=c.rms_norm_eps,
                         rope_theta=c.rope_parameters["rope_theta"])
    llama = tiny_from_config(config, "unfused")
    state = {}
    for name, tensor in lm.model.state_dict().items():
        if "qkv_proj" in name:
            q = c.num_attention_heads * lm.adapter.head_dim
            kv = c.num_key_value_heads * lm.adapter.head_dim
            for proj, part in zip(("q_proj", "k_proj", "v_proj"), tensor.split([q, kv, kv]), strict=True):
                state[name.replace("qkv_proj", proj)] = part
        elif "gate_up_proj" in name:
            for proj, part in zip(("gate_proj", "up_proj"), tensor.chunk(2), strict=True):
                state[name.replace("gate_up_proj", proj)] = part
        else:
            state[name] = tensor
    llama.model.load_state_dict(state)
    return llama


@pytest.mark.parametrize("method", ["magnitude", "taylor", "llm-bip"])
def test_scores_read_from_the_fused_rows_equal_those_of_the_unfused_model(method):
    torch.manual_seed(0)
    config = TINY_CONFIGS["phi3"]()
    config.rope_parameters["partial_rotary_factor"] = 1.0  # LLaMA rotates whole heads
    lm, ids = tiny_from_config(config, "phi3"), tiny_samples()
    llama = _unfused_llama(lm)
    torch.testing.assert_close(logits(llama.model, ids), logits(lm.model, ids), atol=1e-5, rtol=1e-4)
    fused, unfused = score(lm, make_scorer(method), ids, progress=False), score(llama, make_scorer(method), ids, progress=False)
    for a, b in zip(fused.scores, unfused.scores, strict=True):
        for kind in ("heads", "groups", "channels"):
            torch.testing.assert_close(getattr(a, kind), getattr(b, kind), rtol=1e-4, atol=1e-6)
    assert [c.to_json() for c in fused.costs] == [c.to_json() for c in unfused.costs]


def test_uniform_prune_without_some_heads_saves_as_stock_phi3(tmp_path):
    lm, ids = tiny_model("phi3"), tiny_samples()
    result = prune(lm, PruneConfig(ratio=0.4, head_ratio=0.5, compensation="none"), ids, progress=False)
    assert {b.widths.num_heads for b in result.plan.blocks} == {2}
    out = save_pruned(lm.model, None, lm.adapter, tmp_path / "pruned", result.report)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "phi3" and config["num_attention_heads"] == 2 and config["num_key_value_heads"] == 1
    assert not (out / "modeling_llm_bip.py").exists()
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(model).__name__ == "Phi3ForCausalLM"
    torch.testing.assert_close(logits(model, ids), logits(lm.model, ids), atol=1e-5, rtol=1e-4)


def test_per_block_widths_load_from_the_directory_alone_with_trust_remote_code(tmp_path):
    """The hand cut (fewer heads than the config says) saved with modeling_llm_bip.py, loaded in a fresh
    interpreter that never imports llm_bip."""
    from test_saving import _REMOTE

    lm, ids = tiny_model("phi3"), tiny_samples()
    apply_plan(lm.model, lm.adapter, PruningPlan(HAND_PLAN))
    out = save_pruned(lm.model, None, lm.adapter, tmp_path / "pruned")
    assert json.loads((out / "config.json").read_text())["model_type"] == "llm_bip_phi3"
    torch.save(ids, tmp_path / "ids.pt")
    subprocess.run([sys.executable, "-c", _REMOTE.format(flag=True), str(out), str(tmp_path / "ids.pt"),
                    str(tmp_path / "logits.pt")], check=True, cwd=tmp_path)
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), logits(lm.model, ids), atol=1e-5, rtol=1e-4)


def longrope_config() -> Phi3Config:
    """Phi-3.5-mini / Phi-4-mini in small: LongRoPE factors over a partial rotary width (8 of 16 dims), and
    calibration sequences longer than the original context, so the long factors are in use."""
    return Phi3Config(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=None,
                      max_position_embeddings=64, original_max_position_embeddings=8,
                      rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                                       "short_factor": [1.0, 1.1, 1.2, 1.3], "long_factor": [1.5, 2.0, 3.0, 4.0]})


@pytest.mark.parametrize("uniform", [True, False])
def test_longrope_with_partial_rotary_survives_head_pruning_and_the_round_trip(uniform, tmp_path):
    """Phi3Config checks the factors' length against hidden_size // num_attention_heads (not head_dim), so the
    stock config of a uniform prune with fewer heads is refused and per-block widths are saved; either way
    the saved model loads with the same logits."""
    torch.manual_seed(0)
    lm, ids = tiny_from_config(longrope_config(), "phi3-longrope"), tiny_samples()
    if uniform:
        result = prune(lm, PruneConfig(ratio=0.4, head_ratio=0.5), ids, progress=False)
        assert {b.widths.num_heads for b in result.plan.blocks} == {2}
    else:
        apply_plan(lm.model, lm.adapter, PruningPlan(HAND_PLAN))
    out = save_pruned(lm.model, None, lm.adapter, tmp_path / "pruned")
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert model.config.rope_parameters["long_factor"] == [1.5, 2.0, 3.0, 4.0]
    torch.testing.assert_close(logits(model, ids), logits(lm.model, ids), atol=1e-5, rtol=1e-4)


def test_lora_targets_the_fused_projections_and_merges_back(tmp_path):
    from peft import get_peft_model

    from llm_bip.recovery import LoraRecoveryConfig
    from llm_bip.recovery.lora import build_lora_config, model_signature, with_targets

    lm, ids = tiny_model("phi3"), tiny_samples()
    apply_plan(lm.model, lm.adapter, PruningPlan(HAND_PLAN))
    config = with_targets(LoraRecoveryConfig(lora_r=4), lm.model)
    assert config.target_modules == ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
    model_signature(lm.model, config.target_modules)  # raises for a name the model does not have
    base = logits(lm.model, ids)
    peft_model = get_peft_model(lm.model, build_lora_config(config))
    wrapped = {name.rsplit(".", 1)[-1] for name, m in peft_model.named_modules() if hasattr(m, "lora_A")}
    assert wrapped == set(config.target_modules)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    peft_model.eval()
    expected = logits(peft_model, ids)
    merged = peft_model.merge_and_unload()
    assert not torch.allclose(expected, base, atol=1e-3)
    torch.testing.assert_close(logits(merged, ids), expected, atol=1e-5, rtol=1e-4)


def test_gguf_export_refuses_phi3(tmp_path):
    lm = tiny_model("phi3")
    out = save_pruned(lm.model, None, lm.adapter, tmp_path / "model")
    with pytest.raises(LlmBipError, match="cannot export 'phi3' to GGUF: the export supports llama"):
        api.export_gguf(out, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()
