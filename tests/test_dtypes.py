"""`auto` dtypes: bf16 where the device multiplies it fast, float32 elsewhere, and the record says which."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_model, tiny_samples
from llm_bip import api, dtypes, loading
from llm_bip.cli import main
from llm_bip.config import PruneConfig
from llm_bip.dtypes import compute_dtype
from llm_bip.errors import LlmBipError

CPU = torch.device("cpu")


@pytest.fixture(params=[True, False], ids=["bf16-units", "no-bf16-units"])
def bf16_units(request, monkeypatch):
    """This CPU as one with bf16 matrix units, and as one without."""
    monkeypatch.setattr(dtypes, "cpu_bf16_flags", lambda: ("amx_bf16",) if request.param else ())
    return request.param


def test_auto_computes_float32_weights_in_bf16_only_with_bf16_units(bf16_units):
    assert compute_dtype("auto", torch.float32, CPU) == ("bfloat16" if bf16_units else "float32")
    assert compute_dtype("auto", torch.bfloat16, CPU) == "bfloat16"  # half-precision weights: their own dtype
    assert compute_dtype("auto", torch.float16, CPU) == "float16"
    assert compute_dtype("bfloat16", torch.float32, CPU) == "bfloat16"  # asked for: done, fast or not


def test_float32_compute_of_half_weights_is_refused_unless_they_are_cast():
    with pytest.raises(LlmBipError, match="--dtype float32 cannot apply to bfloat16 weights.*--weights-dtype float32"):
        compute_dtype("float32", torch.bfloat16, CPU)
    assert compute_dtype("float32", torch.bfloat16, CPU, casts_weights=True) == "float32"
    with pytest.raises(LlmBipError, match="unknown dtype 'float8'"):
        compute_dtype("float8", torch.float32, CPU)


def test_gguf_weights_are_float32_without_bf16_units_unless_streamed_or_too_big(bf16_units, monkeypatch):
    config = tiny_model("llama").model.config
    expected = torch.bfloat16 if bf16_units else torch.float32
    assert loading._gguf_weights_dtype(config, CPU, streamed=False) == expected
    assert loading._gguf_weights_dtype(config, CPU, streamed=True) == torch.bfloat16  # saved at half the size
    monkeypatch.setattr(loading, "_too_big", lambda *a, **k: True)
    assert loading._gguf_weights_dtype(config, CPU, streamed=False) == torch.bfloat16  # half the memory


def test_the_default_model_loads_as_this_cpu_computes_fastest(smollm2):
    expected = torch.bfloat16 if dtypes.fast_bfloat16(CPU) else torch.float32
    assert smollm2.dtype == expected and smollm2.weights_dtype == expected
    assert next(smollm2.model.parameters()).dtype == expected


def test_prune_records_the_weights_and_compute_dtypes(bf16_units):
    lm = tiny_model("llama")
    result = api.prune(lm, PruneConfig(ratio=0.2), tiny_samples(), progress=False)
    assert result.report["weights_dtype"] == "float32"
    assert result.report["compute_dtype"] == ("bfloat16" if bf16_units else "float32")


def test_evaluate_reports_the_dtype_it_computed_in(bf16_units, tokenizer, tmp_path):
    from conftest import save_tiny_llama

    folder = save_tiny_llama(tmp_path / "m", tokenizer)
    text = tmp_path / "eval.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    lm = api.load(folder)
    (result,) = api.evaluate(lm, [str(text)], [32], max_windows=2, progress=False).values()
    assert result["dtype"] == ("bfloat16" if bf16_units else "float32")
    lm.model.to(torch.bfloat16)
    (result,) = api.evaluate(lm, [str(text)], [32], max_windows=2, progress=False).values()
    assert result["dtype"] == "bfloat16"
    with pytest.raises(LlmBipError, match="--dtype float32 cannot apply"):
        api.evaluate(lm, [str(text)], [32], max_windows=2, dtype="float32", progress=False)


def test_cli_refuses_float32_compute_of_bf16_weights_before_any_work(tokenizer, tmp_path, capsys):
    from conftest import save_tiny_llama

    folder = save_tiny_llama(tmp_path / "m", tokenizer)
    out = tmp_path / "out"
    code = main(["prune", "--model", str(folder), "--weights-dtype", "bfloat16", "--dtype", "float32", "--ratio", "0.2",
                 "--calibration", "lee", "--num-samples", "2", "--seq-len", "16", "--eval", "none", "--quiet",
                 "--output", str(out)])
    assert code == 2 and "--dtype float32 cannot apply to bfloat16 weights" in capsys.readouterr().err
    assert not out.exists()
    assert main(["prune", "--model", str(folder), "--ratio", "0.2", "--calibration", "lee", "--num-samples", "2",
                 "--seq-len", "16", "--eval", "none", "--quiet", "--output", str(out)]) == 0
    record = json.loads((out / "pruning_record.json").read_text())
    assert record["weights_dtype"] == "float32" and record["saved_dtype"] == "float32"
    assert record["compute_dtype"] == ("bfloat16" if dtypes.fast_bfloat16(CPU) else "float32")


def test_compare_refuses_float32_compute_of_bf16_weights_before_calibration(tokenizer, tmp_path, capsys, monkeypatch):
    from conftest import save_tiny_llama

    folder = save_tiny_llama(tmp_path / "m", tokenizer)
    out = tmp_path / "out"
    monkeypatch.setattr(api, "calibrate", lambda *a, **k: pytest.fail("calibrated before the dtype was checked"))
    code = main(["compare", "--model", str(folder), "--weights-dtype", "bfloat16", "--dtype", "float32",
                 "--methods", "llm-bip", "--ratios", "0.2", "--calibration", "lee", "--num-samples", "2",
                 "--seq-len", "16", "--eval", "lee", "--quiet", "--output", str(out)])
    assert code == 2 and "--dtype float32 cannot apply to bfloat16 weights" in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())
