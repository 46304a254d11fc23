"""`--round-to auto`: the candidate widths, the choice on a fake timing, the prune it shapes, and the CLI."""

from __future__ import annotations

import copy
import json

import pytest

from conftest import tiny_model, tiny_samples
from llm_bip.config import PruneConfig
from llm_bip.errors import LlmBipError
from llm_bip.speed import rounding
from llm_bip.speed.rounding import MAX_CANDIDATES, MIN_GAIN, RoundingSpec, candidates, choose, round_widths
from llm_bip.widths import BlockWidths
from test_speed import _prune, cli_model  # noqa: F401 (a fixture)


def test_candidates_are_the_planned_width_and_the_multiples_of_8_within_3_percent_below():
    assert candidates(1126) == [1126, 1120, 1112, 1104, 1096]  # down to 1126 - 33
    wide = candidates(4198)
    assert wide[0] == 4198 and all(c % 8 == 0 and 4198 - 125 <= c < 4198 for c in wide[1:])
    llama70b = candidates(22937)  # 20% of Llama-70B's 28,672 channels: the step doubles to keep the count small
    assert len(llama70b) <= MAX_CANDIDATES and all(c % 64 == 0 and c >= 22937 - 688 for c in llama70b[1:])
    assert candidates(64) == [64, 56]  # at least one step below
    assert candidates(5) == [5]  # no multiple of 8 below


def test_the_fastest_width_is_chosen_only_when_it_clearly_pays():
    width = 1126
    flat = dict.fromkeys(candidates(width), 1.0)
    assert choose(width, flat) == width  # a flat curve: keep every channel
    step = flat | {1104: 0.7, 1096: 0.7}
    assert choose(width, step) == 1104  # the step, and of equal times the wider width
    small = flat | {1112: 1 - MIN_GAIN / 2}
    assert choose(width, small) == width  # within the noise: not worth the channels
    assert choose(width, flat | {width: 0.5}) == width


def test_round_widths_moves_only_cut_blocks_and_records_what_it_timed():
    before = [BlockWidths(8, 2, 100)] * 3
    planned = [BlockWidths(8, 2, 83), BlockWidths(8, 2, 100), BlockWidths(8, 2, 70)]
    asked = []

    def timer(widths):
        asked.append(widths)
        return {w: (0.5 if w in (80, 64) else 1.0) for w in widths}

    rounded, record = round_widths(planned, before, timer)
    assert [w.channels for w in rounded] == [80, 100, 64]
    assert set(asked[0]) == set(candidates(83)) | set(candidates(70)) and len(asked) == 1
    assert record["rounded"] == {"70": 64, "83": 80}
    assert record["channels_removed_beyond_plan"] == 3 + 6
    assert record["ffn_speedup"]["83"] == pytest.approx(2.0)
    unchanged, note = round_widths(before, before, timer)
    assert unchanged == before and note["rounded"] == {}


def _fast_at(width: int):
    return lambda widths: {w: (0.5 if w <= width else 1.0) for w in widths}


def test_a_prune_with_round_to_auto_keeps_the_width_the_timing_chose():
    from llm_bip.pipeline import prune

    lm = tiny_model("llama")  # FFN 96 channels
    ids = tiny_samples()
    plain = copy.deepcopy(lm)
    planned = prune(plain, PruneConfig(ratio=0.3), ids, progress=False).plan.blocks[0].widths.channels
    target = candidates(planned)[-1]
    result = prune(lm, PruneConfig(ratio=0.3, round_to="auto"), ids, progress=False, rounder=_fast_at(target))
    assert {b.widths.channels for b in result.plan.blocks} == {target} and target < planned
    assert result.report["rounding"]["rounded"] == {str(planned): target}
    assert result.report["config"]["round_to"] == "auto"
    assert result.report["removed_fraction"]["non_embedding"] > 0.3  # more than asked, as the record says


def test_round_to_auto_without_a_timing_or_a_device_is_an_error_that_says_what_to_do(tmp_path):
    from llm_bip.pipeline import plan, prune, score
    from llm_bip.scoring import make_scorer

    lm = tiny_model("llama")
    ids = tiny_samples()
    with pytest.raises(LlmBipError, match="needs the device's timing"):
        prune(copy.deepcopy(lm), PruneConfig(ratio=0.3, round_to="auto"), ids, progress=False)
    table = score(lm, make_scorer("llm-bip"), ids, progress=False)
    with pytest.raises(LlmBipError, match="prune the model with --round-to auto"):
        plan(table, PruneConfig(ratio=0.3, round_to="auto"), 0)
    with pytest.raises(LlmBipError, match="positive integer, or auto"):
        PruneConfig(round_to="fast").validate()
    with pytest.raises(LlmBipError, match="flap allocation does not round"):
        PruneConfig(allocation="flap", round_to="auto").validate()


def test_the_device_timer_times_every_width_asked():
    lm = tiny_model("llama")
    full = lm.adapter.widths(lm.adapter.blocks(lm.model)[0])
    for spec in (RoundingSpec(), RoundingSpec("decode", 2)):
        timer = rounding.device_timer(lm.model.config, lm.adapter, full, lm.dtype, lm.device, spec, rounds=2)
        times = timer([96, 88, 80])
        assert set(times) == {96, 88, 80} and all(0 < t < 1000 for t in times.values())
        assert timer([96, 88, 80]) is times  # timed once per process


def test_cli_round_to_auto_prunes_saves_and_records_the_rounding(cli_model, tmp_path):  # noqa: F811
    from llm_bip import api

    out = tmp_path / "auto"
    assert _prune(cli_model, out, "--ratio", "0.3", "--round-to", "auto", "--speed-mode", "decode") == 0
    record = json.loads((out / "pruning_record.json").read_text())
    (planned, chosen), = record["rounding"]["rounded"].items()
    assert int(chosen) in candidates(int(planned))
    assert json.loads((out / "config.json").read_text())["intermediate_size"] == chosen
    assert "rounded by the device's timing" in (out / "README.md").read_text()
    loaded = api.load(str(out))
    assert loaded.adapter.widths(loaded.adapter.blocks(loaded.model)[0]).channels == chosen


@pytest.mark.parametrize("flags, message", [
    (["--round-to", "0"], "give a positive integer, or auto"),
    (["--round-to", "fast"], "give a positive integer, or auto"),
    (["--round-to", "8", "--speed-batch", "8"], "or, for the pass, --round-to auto"),
    (["--round-to", "auto", "--streaming"], "not available with --streaming"),
])
def test_cli_round_to_errors(cli_model, tmp_path, flags, message, capsys):  # noqa: F811
    assert _prune(cli_model, tmp_path / "out", "--ratio", "0.3", *flags) != 0
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
