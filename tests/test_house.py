"""The defects a new user met (house issue), each as it was met: files destroyed, silent wrong results,
tracebacks instead of messages, debris, file modes, a warm-up that never ends, checks after the load."""

from __future__ import annotations

import errno
import json
import os
import stat
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import save_tiny_llama, tiny_model, tiny_samples
from llm_bip import api
from llm_bip.cli import main
from llm_bip.config import PruneConfig
from llm_bip.errors import LlmBipError
from llm_bip.outputs import PARTIAL_MARKER

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    """A tiny LLaMA saved with a real tokenizer, beside an unrelated file of the user's."""
    path = save_tiny_llama(tmp_path_factory.mktemp("models") / "dense", tokenizer)
    (path / "my-notes.txt").write_text("the user's own file")
    return path


@pytest.fixture(scope="module")
def calib(tmp_path_factory, wikitext_test):
    path = tmp_path_factory.mktemp("text") / "calib.txt"
    path.write_text("\n".join(wikitext_test.read_text().splitlines()[:200]))
    return path


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in directory.rglob("*") if p.is_file()}


def _prune(model_dir, calib, out, *extra) -> int:
    return main(["prune", "--model", str(model_dir), "--calibration", str(calib), "--num-samples", "4", "--seq-len",
                 "32", "--eval", "none", "--output", str(out), "--quiet", *extra])


@pytest.fixture
def no_model_load(monkeypatch):
    """Cheap checks must fail before the model loads."""
    def refuse(*_args, **_kwargs):
        raise AssertionError("the model was loaded before a cheap check failed")

    monkeypatch.setattr(api, "load", refuse)


@pytest.fixture
def read_only_dir(tmp_path):
    """A real read-only place: a read-only tmpfs where this machine lets us mount one, else /sys."""
    target = tmp_path / "ro"
    target.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(target)],
                             capture_output=True).returncode == 0
    if not mounted:
        if os.access("/sys", os.W_OK) and os.geteuid() != 0:
            pytest.skip("no read-only place to write into")
        target = Path("/sys")
    yield target
    if mounted:
        subprocess.run(["umount", str(target)], capture_output=True)


# ----------------------------------------------------------------------------------- user files


def test_output_over_the_input_model_is_refused_even_with_overwrite(model_dir, calib, capsys):
    before = _snapshot(model_dir)
    assert _prune(model_dir, calib, model_dir, "--overwrite") == 2
    assert "input" in capsys.readouterr().err
    assert _snapshot(model_dir) == before  # the dense model and the user's file are untouched


def test_overwrite_replaces_only_our_own_outputs(model_dir, calib, tmp_path, capsys):
    out = tmp_path / "out"
    assert _prune(model_dir, calib, out, "--compensation", "none") == 0
    assert _prune(model_dir, calib, out, "--compensation", "none", "--overwrite") == 0  # ours: replaced
    (out / "keep-me.txt").write_text("the user put this here")
    assert _prune(model_dir, calib, out, "--overwrite") == 2
    assert "did not write" in capsys.readouterr().err and (out / "keep-me.txt").exists()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "data.bin").write_bytes(b"x")
    assert _prune(model_dir, calib, foreign, "--overwrite") == 2
    assert (foreign / "data.bin").read_bytes() == b"x"


def test_plan_output_never_replaces_a_file_unasked_or_its_scores(model_dir, calib, tmp_path, capsys):
    scores, plan = tmp_path / "s.safetensors", tmp_path / "plan.json"
    assert main(["score", "--model", str(model_dir), "--calibration", str(calib), "--num-samples", "4",
                 "--seq-len", "32", "--output", str(scores), "--quiet"]) == 0
    scores_bytes = scores.read_bytes()
    assert main(["plan", "--model", str(model_dir), "--scores", str(scores), "--output", str(scores)]) == 2
    assert main(["plan", "--model", str(model_dir), "--scores", str(scores), "--output", str(scores), "--overwrite"]) == 2
    assert scores.read_bytes() == scores_bytes
    plan.write_text("my own json, not a plan")
    assert main(["plan", "--model", str(model_dir), "--scores", str(scores), "--output", str(plan)]) == 2
    assert main(["plan", "--model", str(model_dir), "--scores", str(scores), "--output", str(plan), "--overwrite"]) == 2
    assert plan.read_text() == "my own json, not a plan"
    err = capsys.readouterr().err
    assert "already exists" in err and "input" in err and "not written by llm-bip" in err


# ---------------------------------------------------------------------------- silent wrong results


def test_plan_from_another_model_with_the_same_shape_is_refused(tmp_path):
    lm, other = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    table = api.score(lm, tiny_samples(), progress=False)
    plan = api.plan(table, PruneConfig(ratio=0.3), lm)
    plan.save(tmp_path / "plan.json")
    from llm_bip.plan import PruningPlan

    loaded = PruningPlan.load(tmp_path / "plan.json")
    with pytest.raises(LlmBipError, match="another model"):
        api.apply_plan(other, loaded)
    api.apply_plan(lm, loaded)  # the model it was made for takes it
    (tmp_path / "old.json").write_text(json.dumps({"blocks": [], "meta": {}}))  # an old plan: no fingerprint
    with pytest.raises(LlmBipError, match="fingerprint"):
        PruningPlan.load(tmp_path / "old.json")


def test_flags_that_cannot_apply_with_a_plan_are_errors_and_the_record_says_what_was_done(
        model_dir, calib, tmp_path, capsys):
    scores, plan, out = tmp_path / "s.safetensors", tmp_path / "plan.json", tmp_path / "out"
    common = ["--model", str(model_dir), "--calibration", str(calib), "--num-samples", "4", "--seq-len", "32"]
    assert main(["score", *common, "--output", str(scores), "--quiet"]) == 0
    assert main(["plan", "--model", str(model_dir), "--scores", str(scores), "--ratio", "0.3", "--output", str(plan)]) == 0
    assert _prune(model_dir, calib, out, "--plan", str(plan), "--ratio", "0.5", "--method", "magnitude") == 2
    err = capsys.readouterr().err
    assert "--method" in err and "--ratio" in err and "cannot apply with --plan" in err and not out.exists()
    assert _prune(model_dir, calib, out, "--plan", str(plan), "--compensation", "bias") == 0
    record = json.loads((out / "pruning_record.json").read_text())
    assert record["selection"] == "saved plan" and record["compensation"]["method"] == "bias"
    assert "ratio" not in record["config"] and record["plan_file"] == str(plan.resolve())
    assert 0.29 < record["removed_fraction"]["non_embedding"] < 0.31


def test_scores_that_would_do_nothing_are_refused(model_dir, calib, tmp_path, capsys):
    scores = tmp_path / "s.safetensors"
    assert main(["score", "--model", str(model_dir), "--calibration", str(calib), "--num-samples", "4",
                 "--seq-len", "32", "--output", str(scores), "--quiet"]) == 0
    assert _prune(model_dir, calib, tmp_path / "a", "--scores", str(scores)) == 2
    assert "--scores does nothing here" in capsys.readouterr().err
    assert _prune(model_dir, calib, tmp_path / "b", "--scores", str(scores), "--calibration-mode", "parallel") == 0
    record = json.loads((tmp_path / "b" / "pruning_record.json").read_text())
    assert record["selection"] == "saved scores" and record["scores_file"] == str(scores.resolve())
    assert _prune(model_dir, calib, tmp_path / "c", "--scores", str(scores), "--calibration-mode", "parallel",
                  "--lipschitz", "none") == 2  # scored with L by JVP: other options, other scores
    assert "score again" in capsys.readouterr().err


def test_refit_with_fewer_tokens_than_inputs_falls_back_and_says_so(caplog):
    """4 x 12 = 48 calibration tokens cannot determine a refit of down_proj's 68 kept inputs."""
    ids = tiny_samples(n=4)
    refit, plain = tiny_model("llama"), tiny_model("llama")
    result = api.prune(refit, PruneConfig(ratio=0.2), ids, progress=False)
    api.prune(plain, PruneConfig(ratio=0.2, compensation="none"), ids, progress=False)
    blocks = result.report["compensation"]["blocks"]
    assert all(b["down_proj"].startswith("plain cut: 48 tokens") for b in blocks)
    assert "cannot determine a refit" in caplog.text
    with torch.no_grad():
        assert torch.equal(refit.model(ids).logits, plain.model(ids).logits)


def test_refit_keeps_the_plain_cut_where_it_does_worse(monkeypatch):
    """The checks that keep a refit only if it solves its equations and lowers the block's output error on the
    calibration tokens: a numerically wrecked solution is caught, and the plain cut kept."""
    import llm_bip.compensation as compensation

    real = compensation.ridge_solve

    def broken(*args, **kwargs):
        weight, bias = real(*args, **kwargs)
        return weight * 50, bias  # a numerically wrecked solution

    monkeypatch.setattr(compensation, "ridge_solve", broken)
    ids = tiny_samples(n=24, length=16)  # 384 tokens: enough to determine the fit
    lm, plain = tiny_model("qwen2"), tiny_model("qwen2")
    result = api.prune(lm, PruneConfig(ratio=0.2), ids, progress=False)
    api.prune(plain, PruneConfig(ratio=0.2, compensation="none"), ids, progress=False)
    assert all(b["down_proj"].startswith("plain cut: the refit failed (it does not solve its normal equations")
               for b in result.report["compensation"]["blocks"])
    with torch.no_grad():
        assert torch.equal(lm.model(ids).logits, plain.model(ids).logits)


def test_seq_len_beyond_the_context_is_refused_before_work(model_dir, calib, tmp_path, capsys):
    assert _prune(model_dir, calib, tmp_path / "o", "--seq-len", "4096") == 2
    assert "longer than the model's context of 256" in capsys.readouterr().err


# ------------------------------------------------------------------------ messages, not tracebacks


def test_output_under_a_file(model_dir, calib, tmp_path, capsys, no_model_load):
    (tmp_path / "afile").write_text("x")
    assert _prune(model_dir, calib, tmp_path / "afile" / "out") == 2
    assert main(["score", "--output", str(tmp_path / "afile" / "s.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.count("is a file, not a directory") == 2 and "Traceback" not in err


def test_read_only_places_fail_before_any_work(model_dir, calib, read_only_dir, capsys, no_model_load):
    assert _prune(model_dir, calib, read_only_dir / "out") == 2
    assert main(["score", "--output", str(read_only_dir / "s.safetensors")]) == 2
    assert main(["plan", "--scores", "x.safetensors", "--model", "none", "--output", str(read_only_dir / "p.json")]) == 2
    err = capsys.readouterr().err
    assert err.count("cannot write in") == 3 and "Traceback" not in err


def test_disk_full_while_saving_is_a_message_and_leaves_nothing(tmp_path, monkeypatch):
    lm = tiny_model("llama")
    api.apply_plan(lm, api.plan(api.score(lm, tiny_samples(), progress=False), PruneConfig(ratio=0.3), lm))

    def full(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(type(lm.model), "save_pretrained", full)
    with pytest.raises(LlmBipError, match="no space left"):
        api.save(lm, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_report_into_a_missing_directory_is_created(model_dir, calib, tmp_path):
    report = tmp_path / "reports" / "deep" / "r.json"
    assert _prune(model_dir, calib, tmp_path / "out", "--compensation", "none", "--report", str(report)) == 0
    assert json.loads(report.read_text())["format"] == "llm-bip-record/1"


def test_layers_and_batch_size_that_cannot_be(model_dir, calib, tmp_path, capsys):
    assert _prune(model_dir, calib, tmp_path / "o", "--layers", "2-40") == 2
    assert "do not exist: the model has 3 blocks" in capsys.readouterr().err
    assert _prune(model_dir, calib, tmp_path / "o", "--batch-size", "0") == 2
    assert "must be at least 1" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_model_directory_without_tokenizer_says_what_to_do(model_dir, tmp_path, capsys):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bare / name).write_bytes((model_dir / name).read_bytes())
    assert main(["info", "--model", str(bare)]) == 2
    err = capsys.readouterr().err
    assert "has no tokenizer files" in err and "copy the base model's tokenizer files" in err


def test_cheap_checks_come_before_the_model_loads(model_dir, tmp_path, capsys, no_model_load):
    out = tmp_path / "o"
    assert _prune(model_dir, tmp_path / "missing.txt", out) == 2
    assert main(["prune", "--model", str(model_dir), "--plan", str(tmp_path / "nope.json"), "--output", str(out)]) == 2
    (tmp_path / "bad.json").write_text("{")
    assert main(["prune", "--model", str(model_dir), "--plan", str(tmp_path / "bad.json"), "--output", str(out)]) == 2
    assert main(["prune", "--model", str(model_dir), "--eval", str(tmp_path / "no-eval.txt"), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert "neither a file nor a known name" in err and "does not exist" in err and "cannot read plan" in err
    assert not out.exists()


# ----------------------------------------------------------------------------------- debris, modes


def test_debris_of_a_killed_save_is_cleaned_by_the_next_run(tmp_path):
    out = tmp_path / "out"
    ours = tmp_path / ".out.tmp-deadbeef"
    ours.mkdir()
    (ours / PARTIAL_MARKER).write_text("")
    (ours / "model.safetensors").write_bytes(b"partial")
    users = tmp_path / ".out.tmp-users-own"  # same pattern, but not marked as ours
    users.mkdir()
    lm = tiny_model("llama")
    api.save(lm, out)
    assert not ours.exists() and users.exists() and out.is_dir()


def test_outputs_get_the_users_normal_file_mode(tmp_path):
    lm = tiny_model("llama")
    table = api.score(lm, tiny_samples(), progress=False)
    table.save(tmp_path / "s.safetensors")
    out = api.save(lm, tmp_path / "m")
    mask = os.umask(0)
    os.umask(mask)
    expected = 0o666 & ~mask
    for path in [tmp_path / "s.safetensors", *out.iterdir()]:
        assert stat.S_IMODE(path.stat().st_mode) == expected, path


# -------------------------------------------------------------------------------------- recovery


def test_short_recovery_caps_its_warm_up(caplog):
    from llm_bip.recovery.lora import effective_warmup

    assert effective_warmup(100, 60) == 6  # a tenth of the run, not 100 steps that never end
    assert effective_warmup(100, 1560) == 100  # LLM-Pruner's recipe is untouched
    assert effective_warmup(3, 60) == 3
