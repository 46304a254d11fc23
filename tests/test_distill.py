"""Distillation recovery and full fine-tuning, on tiny random Llamas with SmolLM2's tokenizer cut to 4,096 tokens.

The student is a "pruned" tiny Llama (layers of other widths than its config says), the teacher a dense one
whose LM head is scaled up so that its next-token distributions are peaked (random models at initialisation
predict nearly uniform distributions, which would leave almost nothing to distil).
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from transformers import LlamaForCausalLM

from llm_bip import api
from llm_bip.adapters import adapter_for
from llm_bip.cli import main
from llm_bip.errors import LlmBipError
from llm_bip.loading import LoadedModel
from llm_bip.recovery import DistillConfig, Teacher, recover
from llm_bip.recovery.distill import (
    EXACT_REST_ABOVE,
    distill_sums,
    kl_and_ce_sums,
    kl_full_sum,
    kl_topk_sum,
    teacher_topk,
)
from llm_bip.recovery.loss import collate
from llm_bip.recovery.objective import DistillObjective
from test_recovery import pruned_like_config as _config
from test_recovery import pruned_like_model as student_model
from test_recovery import small_config, write_instructions

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer(small_tokenizer):
    """A real tokenizer's kind without its 49k-row output layer (conftest.small_tokenizer)."""
    return small_tokenizer


# ------------------------------------------------------------------------------------------- models, data


def teacher_model(vocab_size: int, seed: int = 5) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(_config(vocab_size))
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)  # peaked distributions: something to distil
    return model.eval()


@pytest.fixture
def data(tmp_path) -> Path:
    return write_instructions(tmp_path / "alpaca.jsonl")


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, tokenizer) -> Path:
    """The teacher saved as a model directory with the real tokenizer (what --teacher points at)."""
    path = tmp_path_factory.mktemp("teacher") / "dense"
    teacher_model(len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def naive_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """sum_positions sum_v p(v) (log p(v) - log q(v)), from full softmaxes in float64."""
    p = torch.softmax(teacher_logits.double() / temperature, -1)
    log_q = torch.log_softmax(student_logits.double() / temperature, -1)
    return (p * (p.log() - log_q)).sum()


# ------------------------------------------------------------------------------------------- the loss


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_kl_equals_a_naive_full_softmax_reference(temperature):
    torch.manual_seed(1)
    student, teacher = torch.randn(37, 300) * 3, torch.randn(37, 300) * 3
    teacher_lp = torch.log_softmax(teacher / temperature, -1)
    expected = naive_kl(student, teacher, temperature)
    torch.testing.assert_close(
        kl_full_sum(student, teacher_lp, temperature).double(), expected, rtol=1e-5, atol=1e-5
    )
    # Top-k with k = vocabulary: no remainder bucket, the same KL (value and gradient).
    full_topk = teacher_topk(teacher, 300, temperature)
    assert torch.all(torch.isneginf(full_topk.remainder))
    s1, s2 = student.clone().requires_grad_(), student.clone().requires_grad_()
    sparse, dense = kl_topk_sum(s1, full_topk, temperature), kl_full_sum(s2, teacher_lp, temperature)
    torch.testing.assert_close(sparse.double(), expected, rtol=1e-5, atol=1e-5)
    sparse.backward(), dense.backward()
    assert torch.isfinite(s1.grad).all()
    torch.testing.assert_close(s1.grad, s2.grad, rtol=1e-4, atol=1e-6)


def bucket_kl_reference(student: torch.Tensor, teacher: torch.Tensor, temperature: float, k: int) -> torch.Tensor:
    """In float64: both distributions collapsed to the teacher's top k tokens plus "everything else"."""
    p = torch.softmax(teacher.double() / temperature, -1)
    q = torch.softmax(student.double() / temperature, -1)
    top = p.topk(k, -1).indices
    p_top, q_top = p.gather(-1, top), q.gather(-1, top)
    p_b = torch.cat([p_top, 1 - p_top.sum(-1, keepdim=True)], -1)
    q_b = torch.cat([q_top, (q.sum(-1, keepdim=True) - q_top.sum(-1, keepdim=True))], -1)
    return (p_b * (p_b.log() - q_b.log())).sum()


def test_the_students_rest_is_exact_where_the_top_holds_nearly_all_of_its_mass():
    """The student's mass outside the teacher's top k is 1 - the top's mass, except where that is below 1%
    (summed over the other tokens there): value and gradient match a float64 reference on both kinds of row."""
    torch.manual_seed(4)
    student, teacher, k = torch.randn(24, 500) * 2, torch.randn(24, 500) * 3, 16
    top = teacher.topk(k, -1).indices
    student[:12] = student[:12].scatter_add(-1, top[:12, :3], torch.full((12, 3), 14.0))  # confident rows
    probs = torch.softmax(student, -1).gather(-1, top).sum(-1)
    assert (probs[:12] > EXACT_REST_ABOVE).all() and (probs[12:] < EXACT_REST_ABOVE).all()
    got_in, ref_in = student.clone().requires_grad_(), student.double().clone().requires_grad_()
    got = kl_topk_sum(got_in, teacher_topk(teacher, k, 1.0), 1.0)
    expected = bucket_kl_reference(ref_in, teacher, 1.0, k)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)
    got.backward(), expected.backward()
    torch.testing.assert_close(got_in.grad.double(), ref_in.grad, rtol=1e-4, atol=1e-6)
    # The teacher's remainder, on rows of both kinds too (the confident student rows as a teacher's).
    rows = teacher_topk(student, k, 1.0)
    exact = torch.log_softmax(student.double(), -1).scatter(-1, rows.indices, float("-inf")).logsumexp(-1)
    torch.testing.assert_close(rows.remainder.double(), exact, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("sparse", [True, False])
def test_kl_and_cross_entropy_from_one_softmax_equal_them_taken_apart(temperature, sparse):
    torch.manual_seed(5)
    student, teacher = torch.randn(20, 300) * 3, torch.randn(20, 300) * 3
    targets = torch.randint(0, 300, (20,))
    rows = teacher_topk(teacher, 12, temperature) if sparse else torch.log_softmax(teacher / temperature, -1)
    apart_in, joint_in = student.clone().requires_grad_(), student.clone().requires_grad_()
    kl_apart = kl_topk_sum(apart_in, rows, temperature) if sparse else kl_full_sum(apart_in, rows, temperature)
    ce_apart = F.cross_entropy(apart_in, targets, reduction="sum")
    kl, ce = kl_and_ce_sums(joint_in, rows, temperature, targets)
    torch.testing.assert_close((kl, ce), (kl_apart, ce_apart), rtol=1e-5, atol=1e-5)
    (0.3 * kl + 0.7 * ce).backward(), (0.3 * kl_apart + 0.7 * ce_apart).backward()
    torch.testing.assert_close(joint_in.grad, apart_in.grad, rtol=1e-4, atol=1e-6)


def test_topk_kl_is_the_kl_of_the_k_plus_one_bucket_distributions():
    torch.manual_seed(2)
    student, teacher, temperature, k = torch.randn(11, 200) * 2, torch.randn(11, 200) * 4, 1.5, 8
    got = kl_topk_sum(student, teacher_topk(teacher, k, temperature), temperature).double()
    # Reference: both distributions collapsed to the teacher's top k tokens plus "everything else".
    p = torch.softmax(teacher.double() / temperature, -1)
    q = torch.softmax(student.double() / temperature, -1)
    top = p.topk(k, -1).indices
    p_top, q_top = p.gather(-1, top), q.gather(-1, top)
    p_b = torch.cat([p_top, 1 - p_top.sum(-1, keepdim=True)], -1)
    q_b = torch.cat([q_top, 1 - q_top.sum(-1, keepdim=True)], -1)
    expected = (p_b * (p_b.log() - q_b.log())).sum()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert got < naive_kl(student, teacher, temperature)  # a lower bound of the full KL


@pytest.mark.parametrize(("alpha", "chunk"), [(1.0, 5), (0.3, 7), (0.3, 1000)])
def test_chunked_loss_and_gradients_equal_the_unchunked_ones(alpha, chunk):
    """distill_sums takes each chunk's gradient at once; the result must be that of one big loss."""
    torch.manual_seed(3)
    n, width, vocab, temperature = 23, 16, 120, 2.0
    weight = torch.randn(64, width)
    head = nn.Linear(width, vocab, bias=False)
    hidden_in = torch.randn(n, 64)
    targets = torch.randint(0, vocab, (n,))
    teacher_lp = torch.log_softmax(torch.randn(n, vocab) * 3 / temperature, -1)
    config = DistillConfig(alpha=alpha, temperature=temperature)

    # Reference: the whole loss at once, one backward.
    w1 = weight.clone().requires_grad_()
    logits = head(hidden_in @ w1)
    kl = naive_kl(logits, teacher_lp * temperature, temperature)  # teacher logits = T * log p gives p at T
    ce = F.cross_entropy(logits.double(), targets, reduction="sum")
    reference = alpha * temperature**2 * kl + (1 - alpha) * ce
    (reference / 10).backward()
    head_grad, w1_grad = head.weight.grad.clone(), w1.grad.clone()
    head.weight.grad = None

    w2 = weight.clone().requires_grad_()
    sums = distill_sums(head, hidden_in @ w2, targets, lambda s, e: teacher_lp[s:e], config, 10, chunk=chunk)
    assert sums["loss"] == pytest.approx(reference.item(), rel=1e-5)
    assert sums["kl"] == pytest.approx(kl.item(), rel=1e-5)
    assert sums["lm"] == pytest.approx(ce.item(), rel=1e-5)
    torch.testing.assert_close(w2.grad, w1_grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(head.weight.grad, head_grad, rtol=1e-4, atol=1e-6)


def test_a_teacher_identical_to_the_student_gives_zero_loss_and_zero_gradients(tokenizer, data):
    from llm_bip.recovery import load_recovery_data

    student = student_model(len(tokenizer))
    teacher = copy.deepcopy(student).eval()
    examples = load_recovery_data(data, tokenizer, 256, 0).train[:4]
    batch = collate(examples, tokenizer.eos_token_id, torch.device("cpu"))
    for temperature in (1.0, 3.0):
        objective = DistillObjective(DistillConfig(temperature=temperature), Teacher.in_memory(teacher))
        student.zero_grad(set_to_none=True)
        sums = objective.train_micro(student, batch, [0, 1, 2, 3], 50)
        assert abs(sums["kl"]) < 1e-5 and abs(sums["loss"]) < 1e-4
        grads = {name: p.grad for name, p in student.named_parameters()}
        assert all(g is not None for g in grads.values())  # the gradient did reach every parameter ...
        assert max(g.abs().max().item() for g in grads.values()) < 1e-6  # ... and it is zero
    # A different teacher: the same code gives a clearly positive loss and gradients.
    objective = DistillObjective(DistillConfig(), Teacher.in_memory(teacher_model(len(tokenizer))))
    student.zero_grad(set_to_none=True)
    sums = objective.train_micro(student, batch, [0, 1, 2, 3], 50)
    assert sums["kl"] > 1.0
    for name, p in student.named_parameters():
        assert p.grad.abs().max().item() > 1e-7, name


# ------------------------------------------------------------------------------------------- training


@pytest.mark.parametrize("trainer", ["lora", "full"])
def test_a_few_distillation_steps_reduce_the_kl_to_the_teacher(tokenizer, data, trainer):
    teacher = teacher_model(len(tokenizer))
    _, report = recover(
        student_model(len(tokenizer)), tokenizer, data, small_config(), trainer=trainer, teacher=teacher
    )
    assert report["trainer"] == trainer
    assert report["objective"]["kind"] == "distill" and report["objective"]["teacher_targets"] == "full"
    kls = [point["kl"] for point in report["train_loss"]]
    assert kls[-1] < kls[0]
    assert report["eval_after"]["kl"] < report["eval_before"]["kl"] - 0.1
    json.dumps(report)


def test_mixed_objective_reports_both_terms(tokenizer, data):
    distill = DistillConfig(alpha=0.25, temperature=2.0)
    _, report = recover(
        student_model(len(tokenizer)),
        tokenizer,
        data,
        small_config(max_steps=2),
        teacher=teacher_model(len(tokenizer)),
        distill=distill,
    )
    assert report["objective"]["kind"] == "mixed"
    assert report["objective"]["alpha"] == 0.25 and report["objective"]["temperature"] == 2.0
    for point in report["train_loss"]:
        assert point["loss"] == pytest.approx(0.25 * 4.0 * point["kl"] + 0.75 * point["lm"], rel=1e-6)


def test_full_finetune_changes_every_weight_and_lora_only_its_targets(tokenizer, data, tmp_path):
    start = student_model(len(tokenizer))
    teacher = teacher_model(len(tokenizer))
    full, report = recover(copy.deepcopy(start), tokenizer, data, small_config(max_steps=3), trainer="full",
                           teacher=teacher)  # fmt: skip
    assert report["trainable_params"] == sum(p.numel() for p in start.parameters())
    assert "lora_r" not in report["config"]
    before = dict(start.named_parameters())
    for name, p in full.named_parameters():
        assert not torch.equal(p, before[name]), f"full fine-tuning left {name} unchanged"

    lora, _ = recover(copy.deepcopy(start), tokenizer, data, small_config(max_steps=3), teacher=teacher)
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    for name, p in lora.named_parameters():
        changed = not torch.equal(p, before[name])
        assert changed == (name.rsplit(".", 2)[-2] in targets), name


def test_full_finetune_of_a_bf16_model_keeps_bf16_weights_and_float32_masters(tokenizer, data, tmp_path):
    start = student_model(len(tokenizer), torch.bfloat16)
    model, report = recover(copy.deepcopy(start), tokenizer, data, small_config(max_steps=3), tmp_path / "ckpt",
                            trainer="full")  # fmt: skip
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    masters = load_file(str(tmp_path / "ckpt" / "checkpoint" / "weights.safetensors"))
    assert masters and all(t.dtype == torch.float32 for t in masters.values())
    params = dict(model.named_parameters())
    for name, master in masters.items():  # the weights are the masters, rounded
        assert torch.equal(params[name], master.to(torch.bfloat16)), name
    assert report["objective"] == {"kind": "lm"}
    losses = [point["loss"] for point in report["train_loss"]]
    assert losses[-1] < losses[0]


def test_full_finetune_with_a_lora_option_is_refused(tokenizer, data):
    with pytest.raises(LlmBipError, match="lora_r cannot apply to full fine-tuning"):
        recover(student_model(len(tokenizer)), tokenizer, data, small_config(lora_r=4), trainer="full")
    with pytest.raises(LlmBipError, match="unknown recovery trainer"):
        recover(student_model(len(tokenizer)), tokenizer, data, small_config(), trainer="adapters")


# ------------------------------------------------------------------------------------------- resume


@pytest.mark.parametrize(
    ("trainer", "cached", "dtype"),
    [
        ("lora", False, torch.float32),
        ("full", False, torch.float32),
        ("lora", True, torch.float32),  # the teacher cache's resume (the same for both trainers)
        ("full", False, torch.bfloat16),  # float32 masters in the checkpoint, bf16 weights in the model
    ],
)
def test_resume_continues_exactly_like_an_uninterrupted_run(
    tokenizer, data, tmp_path, trainer, cached, dtype
):
    start = student_model(len(tokenizer), dtype)
    teacher = teacher_model(len(tokenizer))
    distill = DistillConfig(alpha=0.5, temperature=2.0, top_k=16)
    cache = {"teacher_cache": tmp_path / "cache"} if cached else {}
    common = dict(trainer=trainer, teacher=teacher, distill=distill, **cache)
    # 36 training examples in batches of 8: 5 steps per epoch, so 7 steps cross an epoch boundary.
    straight, straight_report = recover(
        copy.deepcopy(start),
        tokenizer,
        data,
        small_config(max_steps=7, save_steps=3),
        tmp_path / "a",
        **common,
    )
    interrupted = small_config(max_steps=7, save_steps=3, max_time_s=0.0)
    _, report = recover(copy.deepcopy(start), tokenizer, data, interrupted, tmp_path / "b", **common)
    assert report["stopped"] == "max_time" and report["steps"] == 1
    while report["stopped"] == "max_time":
        resumed, report = recover(
            copy.deepcopy(start), tokenizer, data, interrupted, tmp_path / "b", resume=True, **common
        )
    assert report["steps"] == 7 and report["resumed_from_step"] == 6
    assert report["train_loss"] == straight_report["train_loss"]
    assert report["eval_before"] == straight_report["eval_before"]
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_resume_refuses_another_objective_teacher_or_trainer(tokenizer, data, tmp_path):
    start = student_model(len(tokenizer))
    teacher = teacher_model(len(tokenizer))
    recover(
        copy.deepcopy(start), tokenizer, data, small_config(max_steps=2), tmp_path / "ckpt", teacher=teacher
    )

    def resume(**kwargs):
        recover(copy.deepcopy(start), tokenizer, data, small_config(max_steps=2), tmp_path / "ckpt", resume=True,
                **kwargs)  # fmt: skip

    with pytest.raises(LlmBipError, match="objective was distillation .* this run asks for the LM loss"):
        resume()
    with pytest.raises(LlmBipError, match="objective was"):
        resume(teacher=teacher_model(len(tokenizer), seed=6))
    with pytest.raises(LlmBipError, match="objective was"):
        resume(teacher=teacher, distill=DistillConfig(temperature=2.0))
    with pytest.raises(LlmBipError, match="objective was"):
        resume(teacher=teacher, teacher_cache=tmp_path / "cache")
    with pytest.raises(LlmBipError, match="lora trainer, this run asks for full"):
        resume(teacher=teacher, trainer="full")
    resume(teacher=teacher)  # the same objective resumes


# ------------------------------------------------------------------------------------------- teacher cache


def _student(tokenizer) -> LoadedModel:
    model = student_model(len(tokenizer))
    return LoadedModel(model=model, tokenizer=tokenizer, adapter=adapter_for(model), source="student")


def test_teacher_cache_is_written_reused_without_the_teacher_and_refused_on_mismatch(
    tokenizer, data, teacher_dir, tmp_path, monkeypatch
):
    cache = tmp_path / "cache"
    distill = DistillConfig(temperature=2.0, top_k=16)
    run = dict(dtype="float32", distill=distill, teacher_cache=cache)
    first = api.recover(_student(tokenizer), data, small_config(), teacher=str(teacher_dir), **run)
    built = first["objective"]["teacher_cache"]
    assert built["examples_computed"] == 40 and built["examples_reused"] == 0 and built["teacher_ran"]
    assert (cache / "cache.json").is_file() and sorted(p.name for p in cache.glob("shard-*")) == [
        "shard-00000.safetensors"
    ]
    shard = load_file(str(cache / "shard-00000.safetensors"))
    assert shard["logprobs"].shape[1] == 16 and shard["indices"].dtype == torch.int32
    key = json.loads((cache / "cache.json").read_text())
    assert key["teacher"]["source"] == str(teacher_dir.resolve()) and key["seq_len"] == 256

    # A second run reads the cache: the teacher's weights are never loaded, and the numbers are the same.
    def no_loading(*args, **kwargs):
        raise AssertionError("the teacher was loaded although the cache holds everything")

    monkeypatch.setattr(api, "load_model", no_loading)
    second = api.recover(_student(tokenizer), data, small_config(), teacher=str(teacher_dir), **run)
    reused = second["objective"]["teacher_cache"]
    assert reused["examples_computed"] == 0 and reused["examples_reused"] == 40 and not reused["teacher_ran"]
    assert second["train_loss"] == first["train_loss"]

    # The cache's KL is the top-k one, a lower bound of the full KL of a teacher run on the fly.
    monkeypatch.undo()
    live = api.recover(_student(tokenizer), data, small_config(max_steps=1), dtype="float32",
                       teacher=str(teacher_dir), distill=distill)  # fmt: skip
    kl_full, kl_topk = live["train_loss"][0]["kl"], first["train_loss"][0]["kl"]
    assert 0.0 < kl_topk < kl_full

    # Anything the stored numbers depend on differs: refused, and the cache is left as it was.
    before = {p.name: p.read_bytes() for p in cache.iterdir()}
    mismatches = [
        (dict(run, distill=DistillConfig(temperature=1.0, top_k=16)), small_config(), "temperature"),
        (dict(run, distill=DistillConfig(temperature=2.0, top_k=8)), small_config(), "top-k"),
        (run, small_config(cutoff_len=96), "sequence length"),  # longer than every example (84 tokens)
        (dict(run, dtype="bfloat16"), small_config(), "compute dtype"),
    ]
    for kwargs, config, what in mismatches:
        with pytest.raises(LlmBipError, match=f"teacher cache .* was made for another {what}"):
            api.recover(_student(tokenizer), data, config, teacher=str(teacher_dir), **kwargs)
    other_text = write_instructions(tmp_path / "other.jsonl", n=30)
    with pytest.raises(LlmBipError, match="was made for another training text"):
        api.recover(_student(tokenizer), other_text, small_config(), teacher=str(teacher_dir), **run)
    other_teacher = tmp_path / "other-teacher"
    teacher_model(len(tokenizer), seed=6).save_pretrained(other_teacher)
    tokenizer.save_pretrained(other_teacher)
    with pytest.raises(LlmBipError, match="was made for another teacher"):
        api.recover(_student(tokenizer), data, small_config(), teacher=str(other_teacher), **run)
    assert {p.name: p.read_bytes() for p in cache.iterdir()} == before

    # A directory that is not a teacher cache is never written into.
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(LlmBipError, match="not a teacher cache and not empty"):
        api.recover(
            _student(tokenizer),
            data,
            small_config(),
            teacher=str(teacher_dir),
            **dict(run, teacher_cache=foreign),
        )


def test_teacher_cache_grows_for_a_longer_run(tokenizer, data, teacher_dir, tmp_path):
    run = dict(dtype="float32", teacher=str(teacher_dir), teacher_cache=tmp_path / "cache")
    short = api.recover(_student(tokenizer), data, small_config(max_steps=1), **run)["objective"][
        "teacher_cache"
    ]
    assert short["examples_computed"] == 8 + 4  # the first step's batch and the held-out examples
    longer = api.recover(_student(tokenizer), data, small_config(max_steps=3), **run)["objective"][
        "teacher_cache"
    ]
    assert longer["examples_reused"] == 12 and longer["examples_computed"] == 24 - 8
    assert len(list((tmp_path / "cache").glob("shard-*.safetensors"))) == 2


# ------------------------------------------------------------------------------------------- vocabulary


def test_a_teacher_with_another_vocabulary_is_refused(tokenizer, data):
    with pytest.raises(LlmBipError, match="predicts 1000 tokens .* same tokenizer"):
        recover(student_model(len(tokenizer)), tokenizer, data, small_config(), teacher=teacher_model(1000))

    class Shuffled:  # the same number of tokens, two of them swapped
        def get_vocab(self):
            vocab = dict(tokenizer.get_vocab())
            a, b = list(vocab)[:2]
            vocab[a], vocab[b] = vocab[b], vocab[a]
            return vocab

    teacher = Teacher.in_memory(teacher_model(len(tokenizer)), tokenizer=Shuffled())
    with pytest.raises(LlmBipError, match="another tokenizer than the student"):
        recover(student_model(len(tokenizer)), tokenizer, data, small_config(), teacher=teacher)


def test_distillation_settings_without_a_teacher_are_refused(tokenizer, data, tmp_path):
    with pytest.raises(LlmBipError, match="need a teacher"):
        recover(student_model(len(tokenizer)), tokenizer, data, small_config(), distill=DistillConfig())
    with pytest.raises(LlmBipError, match="need a teacher"):
        recover(student_model(len(tokenizer)), tokenizer, data, small_config(), teacher_cache=tmp_path / "c")
    for bad in (dict(alpha=0.0), dict(alpha=1.5), dict(temperature=0.0), dict(top_k=0)):
        with pytest.raises(LlmBipError, match="distillation: "):
            DistillConfig(**bad)


# ------------------------------------------------------------------------------------------- CLI


@pytest.fixture
def student_dir(tmp_path, tokenizer) -> Path:
    path = tmp_path / "pruned"
    torch.manual_seed(0)
    LlamaForCausalLM(_config(len(tokenizer))).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--distill-temperature", "2"], "--distill-temperature cannot apply without --teacher"),
        (["--distill-alpha", "0.5"], "--distill-alpha cannot apply without --teacher"),
        (["--teacher-cache", "c"], "--teacher-cache cannot apply without --teacher"),
        (["--teacher", "T", "--teacher-top-k", "8"], "--teacher-top-k cannot apply without --teacher-cache"),
        (["--full-finetune", "--lora-r", "4"], "--lora-r cannot apply with --full-finetune"),
        (["--full-finetune", "--lora-dropout", "0"], "--lora-dropout cannot apply with --full-finetune"),
        (["--lora-dropout", "1"], "lora_dropout must be in \\[0, 1\\)"),
        (["--schedule-to-time"], "--schedule-to-time\\) needs max_time_s \\(--max-time\\)"),
        (["--teacher", "T", "--distill-alpha", "0"], "alpha .* must be in \\(0, 1\\]"),
        (["--teacher", "T", "--distill-temperature", "-1"], "temperature must be a positive number"),
    ],
)
def test_flags_that_cannot_apply_are_errors_before_any_model_loads(
    tmp_path, capsys, monkeypatch, flags, message
):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before a cheap check failed")

    monkeypatch.setattr(api, "load", refuse)
    monkeypatch.setattr(api, "load_teacher", refuse)
    code = main(["recover", "--model", str(tmp_path / "m"), "--data", str(tmp_path / "d.jsonl"), "--output",
                 str(tmp_path / "out"), "--quiet", *flags])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("llm-bip: error: ") and len(err.strip().splitlines()) == 1

    assert re.search(message, err), err
    assert not (tmp_path / "out").exists()


def test_cli_distillation_runs_and_the_record_says_what_was_done(
    student_dir, teacher_dir, data, tmp_path, capsys
):
    common = ["recover", "--model", str(student_dir), "--data", str(data), "--max-steps", "2", "--batch-size", "4",
              "--micro-batch-size", "2", "--warmup-steps", "0", "--dtype", "float32", "--quiet",
              "--teacher", str(teacher_dir)]  # fmt: skip
    out = tmp_path / "distilled"
    assert main([*common, "--output", str(out), "--teacher-cache", str(tmp_path / "cache")]) == 0
    assert "recovered with LoRA (distill, alpha 1.0, T 1.0, from" in capsys.readouterr().out
    record = json.loads((out / "pruning_record.json").read_text())["recovery"]
    assert record["trainer"] == "lora" and record["steps"] == 2 and record["tokens_trained"] > 0
    assert record["time_s"] > 0 and record["train_time_s"] > 0
    objective = record["objective"]
    assert objective["kind"] == "distill" and objective["alpha"] == 1.0 and objective["temperature"] == 1.0
    assert objective["teacher"] == str(teacher_dir.resolve()) and objective["top_k"] == 64
    assert objective["teacher_cache"]["dir"] == str(tmp_path / "cache")

    out = tmp_path / "full"
    args = [
        *common,
        "--output",
        str(out),
        "--full-finetune",
        "--distill-alpha",
        "0.5",
        "--distill-temperature",
        "2",
    ]
    assert main(args) == 0
    record = json.loads((out / "pruning_record.json").read_text())
    assert record["recovery_command"].startswith("llm-bip recover")
    recovery = record["recovery"]
    assert recovery["trainer"] == "full" and recovery["objective"]["kind"] == "mixed"
    assert recovery["objective"]["alpha"] == 0.5 and recovery["objective"]["temperature"] == 2.0
    assert (
        recovery["objective"]["teacher_targets"] == "full" and recovery["objective"]["teacher_cache"] is None
    )


def test_cli_float32_compute_of_a_bf16_model_needs_float32_weights(tokenizer, data, tmp_path, capsys):
    """Full fine-tuning autocasts, and autocast cannot run bf16 weights in float32: refused, with the way out."""
    path = tmp_path / "bf16"
    torch.manual_seed(0)
    LlamaForCausalLM(_config(len(tokenizer))).to(torch.bfloat16).save_pretrained(path)
    tokenizer.save_pretrained(path)
    common = ["recover", "--model", str(path), "--data", str(data), "--max-steps", "1", "--batch-size", "2",
              "--micro-batch-size", "2", "--warmup-steps", "0", "--full-finetune", "--dtype", "float32", "--quiet"]
    out = tmp_path / "out"
    assert main([*common, "--output", str(out)]) == 2
    assert re.search("--dtype float32 cannot apply to bfloat16 weights.*--weights-dtype float32", capsys.readouterr().err)
    assert not out.exists()
    assert main([*common, "--weights-dtype", "float32", "--output", str(out)]) == 0
    record = json.loads((out / "pruning_record.json").read_text())
    assert record["recovery"]["compute_dtype"] == "float32" and record["saved_dtype"] == "float32"
