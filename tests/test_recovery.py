"""LoRA recovery on a tiny random Llama whose layers have non-uniform widths, as pruning leaves them.

`tokenizer` is conftest's real SmolLM2 tokenizer cut to 4,096 tokens (`small_tokenizer`): a real byte-level BPE
with SmolLM2's special tokens and chat template, without the 49k-row output layer that made the tiny models'
steps slow.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from peft import get_peft_model
from safetensors.torch import load_file
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from llm_bip.errors import LlmBipError
from llm_bip.recovery import LoraRecoveryConfig, alpaca_prompt, load_recovery_data, recover
from llm_bip.recovery.lora import build_lora_config, with_targets

pytestmark = pytest.mark.usefixtures("one_thread")


def pruned_like_config(vocab_size: int) -> LlamaConfig:
    """The dense shape the pruned-like model comes from (hidden 64, FFN 128, 4 query / 2 KV heads, 2 layers)."""
    return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=256)


def pruned_like_model(vocab_size: int, dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    """Layer 0 keeps 96 of 128 FFN channels, layer 1 keeps 2 of 4 query heads: widths the config doesn't know."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(pruned_like_config(vocab_size))
    mlp = model.model.layers[0].mlp
    mlp.gate_proj, mlp.up_proj, mlp.down_proj = (
        nn.Linear(64, 96, False),
        nn.Linear(64, 96, False),
        nn.Linear(96, 64, False),
    )
    attn = model.model.layers[1].self_attn
    attn.q_proj, attn.o_proj = nn.Linear(64, 32, False), nn.Linear(32, 64, False)
    attn.num_key_value_groups = 1
    return model.to(dtype)


@pytest.fixture(scope="module")
def tokenizer(small_tokenizer):
    return small_tokenizer


@pytest.fixture
def model(tokenizer):
    return pruned_like_model(len(tokenizer))


def write_instructions(path: Path, n: int = 40) -> Path:
    records = [
        {
            "instruction": f"Name the colour number {i}.",
            "input": "" if i % 3 else "briefly",
            "output": f"Colour {i} is blue.",
        }
        for i in range(n)
    ]
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n", encoding="utf-8")
    return path


def small_config(**overrides) -> LoraRecoveryConfig:
    values = dict(
        batch_size=8, micro_batch_size=4, learning_rate=1e-2, warmup_steps=0, max_steps=6, progress_bar=False
    )
    values.update(overrides)
    return LoraRecoveryConfig(**values)


def shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def test_lora_lowers_loss_and_returns_plain_model_with_same_shapes(model, tokenizer, tmp_path):
    data = write_instructions(tmp_path / "alpaca.jsonl")
    before = shapes(model)
    merged, report = recover(model, tokenizer, data, small_config())
    assert type(merged) is LlamaForCausalLM
    assert shapes(merged) == before
    assert not any("lora" in name for name, _ in merged.named_modules())
    losses = [point["loss"] for point in report["train_loss"]]
    assert report["steps"] == 6 and report["stopped"] == "max_steps" and len(losses) == 6
    assert losses[-1] < losses[0]
    assert report["eval_after"]["loss"] < report["eval_before"]["loss"]
    assert report["n_val"] == 4 and report["n_train"] == 36
    assert report["data_kind"] == "instruction"
    json.dumps(report)  # the CLI writes it as JSON


def test_merged_weights_give_the_adapter_models_logits(model, tokenizer, tmp_path):
    original = copy.deepcopy(model)
    data = write_instructions(tmp_path / "alpaca.jsonl")
    config = small_config(max_steps=3)
    merged, _ = recover(model, tokenizer, data, config, checkpoint_dir=tmp_path / "ckpt")

    ids = torch.tensor([tokenizer("Name the colour number 7. Colour 7 is blue.")["input_ids"]])
    with torch.no_grad():
        base = original(input_ids=ids).logits
    unmerged = get_peft_model(original, build_lora_config(with_targets(config, original)))
    adapters = load_file(str(tmp_path / "ckpt" / "checkpoint" / "adapter.safetensors"))
    params = dict(unmerged.named_parameters())
    with torch.no_grad():
        for name, value in adapters.items():
            params[name].copy_(value)
    unmerged.eval()
    with torch.no_grad():
        expected = unmerged(input_ids=ids).logits
        got = merged(input_ids=ids).logits
    assert not torch.allclose(got, base, atol=1e-3)  # the adapters did change the model
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_bf16_model_trains_fp32_adapters_and_stays_bf16(tokenizer, tmp_path):
    model = pruned_like_model(len(tokenizer), torch.bfloat16)
    data = write_instructions(tmp_path / "alpaca.jsonl")
    merged, report = recover(
        model, tokenizer, data, small_config(max_steps=4), checkpoint_dir=tmp_path / "ckpt"
    )
    adapters = load_file(str(tmp_path / "ckpt" / "checkpoint" / "adapter.safetensors"))
    assert adapters and all(t.dtype == torch.float32 for t in adapters.values())
    assert all(p.dtype == torch.bfloat16 for p in merged.parameters())
    losses = [point["loss"] for point in report["train_loss"]]
    assert losses[-1] < losses[0]


def test_resume_continues_exactly_like_an_uninterrupted_run(tokenizer, tmp_path):
    data = write_instructions(tmp_path / "alpaca.jsonl")
    start = pruned_like_model(len(tokenizer))
    # 36 training examples in batches of 8: 5 steps per epoch, so 7 steps cross an epoch boundary.
    config = small_config(max_steps=7, save_steps=3)
    straight, straight_report = recover(copy.deepcopy(start), tokenizer, data, config, tmp_path / "a")

    interrupted = small_config(max_steps=7, save_steps=3, max_time_s=0.0)
    _, report = recover(copy.deepcopy(start), tokenizer, data, interrupted, tmp_path / "b")
    assert report["stopped"] == "max_time" and report["steps"] == 1
    while report["stopped"] == "max_time":
        # Each resume with a zero time budget does exactly one more step, so every step is resumed once.
        resumed, report = recover(
            copy.deepcopy(start), tokenizer, data, interrupted, tmp_path / "b", resume=True
        )
    assert report["steps"] == 7 and report["resumed_from_step"] == 6 and report["stopped"] == "max_steps"
    assert report["train_loss"] == straight_report["train_loss"]
    assert report["eval_before"] == straight_report["eval_before"]
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_resume_refuses_a_different_config_and_a_used_directory(model, tokenizer, tmp_path):
    data = write_instructions(tmp_path / "alpaca.jsonl")
    start = copy.deepcopy(model)
    recover(model, tokenizer, data, small_config(max_steps=2), tmp_path / "ckpt")
    with pytest.raises(LlmBipError, match="learning_rate"):
        recover(
            copy.deepcopy(start),
            tokenizer,
            data,
            small_config(max_steps=2, learning_rate=1e-3),
            tmp_path / "ckpt",
            resume=True,
        )
    with pytest.raises(LlmBipError, match="already holds"):
        recover(copy.deepcopy(start), tokenizer, data, small_config(max_steps=2), tmp_path / "ckpt")
    with pytest.raises(LlmBipError, match="no checkpoint"):
        recover(copy.deepcopy(start), tokenizer, data, small_config(), tmp_path / "empty", resume=True)


def test_plain_text_file_is_packed_into_cutoff_blocks(tokenizer, tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text("The river runs to the sea and the sea is wide.\n" * 200, encoding="utf-8")
    data = load_recovery_data(text, tokenizer, cutoff_len=64, val_set_size=3, seed=1)
    assert data.kind == "text" and len(data.val) == 3
    assert sum(len(ex.input_ids) != 64 for ex in data.train + data.val) <= 1  # only the last block is short
    assert all(ex.labels == ex.input_ids for ex in data.train)
    # Gemma's blocks start with BOS (as its calibration and evaluation windows): the same text, one token
    # fewer per block.
    first = load_recovery_data(text, tokenizer, cutoff_len=64, val_set_size=3, seed=1, bos_id=7)
    assert all(ex.input_ids[0] == 7 and len(ex.input_ids) <= 64 for ex in first.train + first.val)
    stream = [t for ex in data.train + data.val for t in ex.input_ids]
    assert sum(len(ex.input_ids) - 1 for ex in first.train + first.val) == len(stream)


def test_instruction_prompt_is_masked_and_response_ends_with_eos(tokenizer, tmp_path):
    path = tmp_path / "one.json"
    path.write_text(
        json.dumps([{"instruction": "Say hi.", "input": "", "output": "Hi there."}]), encoding="utf-8"
    )
    data = load_recovery_data(path, tokenizer, cutoff_len=256, val_set_size=0)
    (ex,) = data.train
    prompt_len = len(tokenizer(alpaca_prompt("Say hi."))["input_ids"])
    assert ex.labels[:prompt_len] == [-100] * prompt_len
    assert ex.labels[prompt_len:] == ex.input_ids[prompt_len:]
    assert ex.input_ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ex.input_ids[prompt_len:-1]) == "Hi there."


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("wrong.jsonl", '{"question": "q", "answer": "a"}\n', "instruction, input .optional., output"),
        ("empty.jsonl", "\n", "empty"),
        ("empty.json", "[]", "no records"),
        ("broken.jsonl", '{"text": "fine"}\n{"text": \n', "line 2"),
        ("blank.txt", "  \n", "empty"),
        ("table.csv", "a,b\n", "unsupported"),
        ("numbers.jsonl", '{"instruction": "x", "output": 3}\n', "non-string"),
    ],
)
def test_bad_data_files_raise_clear_errors(tokenizer, tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(LlmBipError, match=message):
        load_recovery_data(path, tokenizer, cutoff_len=64, val_set_size=0)


def test_missing_file_and_offline_hub_name_raise_clear_errors(tokenizer, tmp_path, monkeypatch):
    with pytest.raises(LlmBipError, match="not found"):
        load_recovery_data(tmp_path / "nope.jsonl", tokenizer, cutoff_len=64, val_set_size=0)

    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'yahma/alpaca-cleaned' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(LlmBipError, match="pass a local .json/.jsonl/.txt file") as info:
        load_recovery_data("yahma/alpaca-cleaned", tokenizer, cutoff_len=64, val_set_size=0)
    assert "\n" not in str(info.value)


def test_unknown_target_module_fails_before_training(model, tokenizer, tmp_path):
    data = write_instructions(tmp_path / "alpaca.jsonl")
    with pytest.raises(LlmBipError, match="c_attn not found"):
        recover(model, tokenizer, data, small_config(target_modules=("q_proj", "c_attn")))


def test_config_round_trips_through_json_and_validates(tmp_path):
    config = LoraRecoveryConfig(micro_batch_size=8, max_steps=100)
    config.save(tmp_path / "lora.json")
    assert LoraRecoveryConfig.load(tmp_path / "lora.json") == config
    assert LoraRecoveryConfig().to_dict()["target_modules"] is None  # the model family's adapter decides
    assert with_targets(LoraRecoveryConfig(), pruned_like_model(32)).target_modules == (
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
    )  # fmt: skip
    with pytest.raises(LlmBipError, match="multiple of"):
        LoraRecoveryConfig(batch_size=64, micro_batch_size=5)
    with pytest.raises(LlmBipError, match="unknown field"):
        LoraRecoveryConfig.from_dict({"rank": 8})
    assert LoraRecoveryConfig.recipe("llm-pruner") == LoraRecoveryConfig()
    budget = LoraRecoveryConfig.recipe("time-budget")
    assert (budget.cutoff_len * budget.batch_size, budget.schedule_to_time, budget.max_time_s) == (2048, True, 1800.0)
    with pytest.raises(LlmBipError, match="unknown recovery recipe"):
        LoraRecoveryConfig.recipe("fast")


def test_ctrl_c_saves_the_last_step_and_resume_matches(tokenizer, tmp_path, monkeypatch):
    import llm_bip.recovery.objective as objective

    data = write_instructions(tmp_path / "alpaca.jsonl")
    start = pruned_like_model(len(tokenizer))
    config = small_config(max_steps=4, save_steps=100)
    straight, straight_report = recover(copy.deepcopy(start), tokenizer, data, config, tmp_path / "a")

    calls = 0
    real_loss = objective.summed_loss

    def interrupting_loss(model, batch):
        nonlocal calls
        calls += 1
        if calls == 6:  # the second of step 3's two micro-batches
            raise KeyboardInterrupt
        return real_loss(model, batch)

    monkeypatch.setattr(objective, "summed_loss", interrupting_loss)
    with pytest.raises(KeyboardInterrupt):
        recover(copy.deepcopy(start), tokenizer, data, config, tmp_path / "b")
    monkeypatch.setattr(objective, "summed_loss", real_loss)
    assert json.loads((tmp_path / "b" / "checkpoint" / "state.json").read_text())["step"] == 2
    resumed, report = recover(copy.deepcopy(start), tokenizer, data, config, tmp_path / "b", resume=True)
    assert report["resumed_from_step"] == 2
    assert report["train_loss"] == straight_report["train_loss"]
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_steps_that_fit_the_time_left_at_the_measured_pace():
    from llm_bip.recovery.schedule import FIT_MARGIN, steps_that_fit

    assert FIT_MARGIN == 0.97
    # 5 steps took 30 s of a 1000 s budget; 10 s a step fits (970 - 30) / 10 = 94 more.
    assert steps_that_fit(5, 30.0, 1000.0, 10.0) == 99
    # An evaluation of 20 s every 10 steps makes a step cost 12 s: 78 more.
    assert steps_that_fit(5, 30.0, 1000.0, 10.0, eval_s=20.0, eval_every=10) == 83
    # Already past the budget's share: the run ends where it is.
    assert steps_that_fit(5, 990.0, 1000.0, 10.0) == 5


def test_a_schedule_continued_to_a_new_end_does_not_jump():
    from llm_bip.recovery.schedule import LinearSchedule

    schedule = LinearSchedule(2, 12)
    assert [schedule(s) for s in range(4)] == pytest.approx([0.0, 0.5, 1.0, 0.9])
    schedule.continue_to(4, 20)  # from 0.8 at step 4 down to 0 at step 20
    assert [schedule(s) for s in (4, 12, 20, 25)] == pytest.approx([0.8, 0.4, 0.0, 0.0])
    schedule.restart(3, 30)
    assert [schedule(s) for s in (1, 3, 30)] == pytest.approx([1 / 3, 1.0, 0.0])


class FakeClock:
    """A clock that advances by one second for each training micro-batch, whatever the machine's speed."""

    def __init__(self, monkeypatch) -> None:
        import llm_bip.recovery.objective as objective
        import llm_bip.recovery.train as train

        self.seconds = 0.0
        real_loss = objective.summed_loss

        def timed_loss(model, batch):
            self.seconds += 1.0
            return real_loss(model, batch)

        monkeypatch.setattr(objective, "summed_loss", timed_loss)
        monkeypatch.setattr(train, "_now", lambda: self.seconds)


def time_fitted_config(**overrides) -> LoraRecoveryConfig:
    """36 examples in batches of 8: 5 steps an epoch, the last one of a single micro-batch, so an epoch takes
    2 + 2 + 2 + 2 + 1 = 9 s on the fake clock; 10 epochs (50 steps) planned, 40 s of budget."""
    return small_config(**{"max_steps": None, "num_epochs": 10, "max_time_s": 40.0, "schedule_to_time": True,
                           "warmup_steps": 4, **overrides})  # fmt: skip


def test_schedule_fitted_to_the_time_budget_decays_to_zero_when_time_is_up(tokenizer, tmp_path, monkeypatch):
    FakeClock(monkeypatch)
    data = write_instructions(tmp_path / "alpaca.jsonl")
    config = time_fitted_config()
    _, report = recover(pruned_like_model(len(tokenizer)), tokenizer, data, config, tmp_path / "a")
    fits = report["time_fit"]
    # First fit after steps 2-5 (7 s: 1.75 s a step), 9 s spent: (0.97 * 40 - 9) / 1.75 = 17 more steps.
    # Then at a quarter (step 6, 11 s), half (step 11, 20 s), three quarters (step 17, 31 s) and 90% of the
    # budget (step 20, 36 s), each from the pace since step 1 (1.8 s a step): 21 steps, 38 s in all.
    assert [(f["at_step"], f["elapsed_s"], f["total_steps"]) for f in fits] == [
        (5, 9.0, 22), (6, 11.0, 21), (11, 20.0, 21), (17, 31.0, 21), (20, 36.0, 21)
    ]
    assert fits[0]["step_s"] == 1.75 and fits[1]["step_s"] == 1.8 and all(f["shortened"] for f in fits)
    assert report["total_steps"] == report["steps"] == 21 and report["stopped"] == "time_schedule"
    assert report["train_time_s"] == 38.0
    assert report["warmup_steps"] == fits[0]["warmup_steps"] == 3  # a tenth of the first fitted run
    rates = [point["lr"] for point in report["train_loss"]]
    peak = config.learning_rate
    # Warm-up planned for 4 steps until the first fit, then decay with no jump at a later fit, to near zero.
    assert rates[:6] == pytest.approx([0.0, peak / 4, peak / 2, 3 * peak / 4, peak, peak * 17 / 19])
    drops = [a - b for a, b in zip(rates[5:], rates[6:], strict=False)]
    assert all(0 < d < 0.06 * peak for d in drops), drops  # 16/19 over the 15 steps from step 6: 0.056
    assert rates[-1] < 0.06 * peak

    # Without the fit the same budget stops the planned 50-step schedule with the rate near its peak.
    plain = time_fitted_config(schedule_to_time=False)
    _, cut = recover(pruned_like_model(len(tokenizer)), tokenizer, data, plain, tmp_path / "b")
    assert cut["stopped"] == "max_time" and cut["time_fit"] is None and cut["train_loss"][-1]["lr"] > 0.5 * peak


def interrupted_at(clock: FakeClock, monkeypatch, seconds: float) -> None:
    """The next micro-batch that starts at `seconds` on the fake clock raises KeyboardInterrupt (Ctrl-C)."""
    import llm_bip.recovery.objective as objective

    timed_loss = objective.summed_loss

    def interrupting_loss(model, batch):
        if clock.seconds == seconds:
            monkeypatch.setattr(objective, "summed_loss", timed_loss)
            raise KeyboardInterrupt
        return timed_loss(model, batch)

    monkeypatch.setattr(objective, "summed_loss", interrupting_loss)


def test_resume_keeps_the_fitted_schedule(tokenizer, tmp_path, monkeypatch):
    clock = FakeClock(monkeypatch)
    data = write_instructions(tmp_path / "alpaca.jsonl")
    start = pruned_like_model(len(tokenizer))
    config = time_fitted_config(save_steps=100)
    straight, straight_report = recover(copy.deepcopy(start), tokenizer, data, config, tmp_path / "a")

    # Interrupted in the last step (its second micro-batch, at 37 s), after every fit: the resumed run takes
    # that step at the rate the fitted schedule gives it, even with another budget.
    clock.seconds = 0.0
    interrupted_at(clock, monkeypatch, 37.0)
    with pytest.raises(KeyboardInterrupt):
        recover(copy.deepcopy(start), tokenizer, data, config, tmp_path / "b")
    state = json.loads((tmp_path / "b" / "checkpoint" / "state.json").read_text())
    assert state["step"] == 20 and state["time_fit"] == straight_report["time_fit"]
    longer = time_fitted_config(save_steps=100, max_time_s=1000.0)
    resumed, report = recover(copy.deepcopy(start), tokenizer, data, longer, tmp_path / "b", resume=True)
    assert report["total_steps"] == report["steps"] == 21 and report["time_fit"] == straight_report["time_fit"]
    assert report["train_loss"] == straight_report["train_loss"]
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), name

    # Interrupted early (step 8, after the fits at steps 5 and 6): the resumed run keeps those two and fits
    # again at the shares of the budget still ahead.
    clock.seconds = 0.0
    interrupted_at(clock, monkeypatch, 14.0)
    with pytest.raises(KeyboardInterrupt):
        recover(copy.deepcopy(start), tokenizer, data, config, tmp_path / "c")
    _, report = recover(copy.deepcopy(start), tokenizer, data, config, tmp_path / "c", resume=True)
    assert report["resumed_from_step"] == 7 and report["time_fit"][:2] == straight_report["time_fit"][:2]
    assert len(report["time_fit"]) > 2 and report["stopped"] == "time_schedule"


def test_schedule_to_time_needs_a_time_budget():
    with pytest.raises(LlmBipError, match="needs max_time_s"):
        small_config(schedule_to_time=True)
