"""The speed target: the device's timing table, the planner's arithmetic on a fake table, and the CLI."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import TINY_CONFIGS
from llm_bip.config import PruneConfig
from llm_bip.errors import LlmBipError
from llm_bip.params import BlockCosts
from llm_bip.speed import timing
from llm_bip.speed.planner import REFINE_ROUNDS, SpeedTarget, plan_speed, plan_speed_refined
from llm_bip.speed.timing import TimingKey, TimingTable
from llm_bip.widths import BlockWidths

FULL = BlockWidths(8, 2, 100)
KEY = TimingKey("llama", 64, 8, 2, 8, 100, 128, "bfloat16", "fake", "0", "prefill", 1, 128)


def fake_table(fixed: float = 10.0) -> TimingTable:
    """A block costs 1 ms + 0.02 ms per channel + 0.25 ms per query head: full width 5 ms."""
    points = [(BlockWidths(h, kv, c), 1 + 0.02 * c + 0.25 * h) for h, kv in ((8, 2), (4, 1)) for c in (10, 50, 100)]
    return TimingTable(KEY, fixed, points)


def costs(num_blocks: int = 10) -> list[BlockCosts]:
    # head 2, kv 1, channel 3 parameters; a block's prunable part is 8*2 + 2*1 + 100*3 = 318, fixed 2.
    return [BlockCosts(2, 1, 3, FULL, 2) for _ in range(num_blocks)]


def counts(c: list[BlockCosts]) -> dict:
    blocks = sum(x.total(x.widths) for x in c)
    return {"total": blocks + 1000, "embedding": 1000, "non_embedding": blocks}


def test_interpolation_is_exact_on_a_linear_table():
    table = fake_table()
    for widths in (BlockWidths(8, 2, 73), BlockWidths(6, 2, 40), BlockWidths(4, 1, 100), BlockWidths(8, 2, 5)):
        assert table.block_ms(widths) == pytest.approx(1 + 0.02 * widths.channels + 0.25 * widths.num_heads)
    assert table.model_ms([FULL] * 10) == pytest.approx(60.0)


def test_depth_route_takes_the_fewest_blocks_that_meet_the_target():
    # Dense: 10 + 10 * 5 = 60 ms. n blocks removed: 60 / (60 - 5n) >= 1.5  <=>  n >= 4.
    c = costs()
    speed = plan_speed(c, counts(c), PruneConfig(), fake_table(), SpeedTarget(1.5, route="depth", margin=0))
    assert (speed.ratio, speed.remove_blocks) == (None, 4)
    assert speed.predicted_speedup == pytest.approx(1.5) and speed.pruned_ms == pytest.approx(40.0)
    speed = plan_speed(c, counts(c), PruneConfig(), fake_table(), SpeedTarget(1.6, route="depth", margin=0))
    assert speed.remove_blocks == 5 and speed.predicted_speedup == pytest.approx(60 / 35)


def test_width_route_finds_the_smallest_ratio_that_meets_the_target():
    c = costs()
    config = PruneConfig()  # channels only (head ratio 0) at these ratios
    speed = plan_speed(c, counts(c), config, fake_table(), SpeedTarget(1.25, route="width", margin=0))
    assert speed.remove_blocks == 0 and speed.predicted_speedup >= 1.25
    # 60 / 1.25 = 48 ms: each block sheds 1.2 ms = 60 channels = 180 of its 320 parameters (0.5625), and
    # the uniform allocation rounds to whole channels per block, so from 59.5 channels (0.5578) on.
    assert speed.ratio == pytest.approx(0.5578, abs=2e-4)
    below = plan_speed(c, counts(c), config, fake_table(), SpeedTarget(1.2, route="width", margin=0))
    assert below.ratio < speed.ratio
    # One step less than the chosen ratio no longer meets the target.
    from llm_bip.pipeline import plan_widths

    smaller = plan_widths(c, round((speed.ratio - 0.002) * counts(c)["non_embedding"]), config, None)
    assert 60 / fake_table().model_ms(smaller) < 1.25


def test_mixed_route_takes_its_share_from_whole_blocks():
    c = costs()
    speed = plan_speed(c, counts(c), PruneConfig(), fake_table(),
                       SpeedTarget(1.5, route="mixed", depth_share=0.5, margin=0))
    assert speed.remove_blocks >= 1 and speed.ratio is not None and speed.predicted_speedup >= 1.5
    per_block = c[0].total(FULL)
    share = speed.remove_blocks * per_block / (speed.ratio * counts(c)["non_embedding"])
    assert share == pytest.approx(0.5, abs=per_block / (speed.ratio * counts(c)["non_embedding"]))
    planned = speed.config(PruneConfig())
    assert planned.ratio == speed.ratio and planned.remove_blocks == speed.remove_blocks


def test_the_margin_plans_above_the_target():
    """A 5% margin plans for 1.5 x 1.05 = 1.575: 60 / (60 - 5n) >= 1.575 needs n >= 4.38, so 5 blocks, where the
    target alone takes 4; the margin is checked, and it is named where the aim is out of reach."""
    c = costs()
    target = SpeedTarget(1.5, route="depth")
    assert target.margin == 0.05 and target.aim == pytest.approx(1.575)
    assert plan_speed(c, counts(c), PruneConfig(), fake_table(), target).remove_blocks == 5
    assert plan_speed(c, counts(c), PruneConfig(), fake_table(), SpeedTarget(1.5, route="depth", margin=0)
                      ).remove_blocks == 4
    for margin in (-0.1, 1.0):
        with pytest.raises(LlmBipError, match="speed margin"):
            SpeedTarget(1.5, margin=margin).validate()
    for bad in (0, 2.5):
        with pytest.raises(LlmBipError, match="route samples"):
            SpeedTarget(1.5, route_samples=bad).validate()
    # 9 of 10 blocks give 60 / 15 = 4x; 3.9x is in reach by itself but not with a 5% margin (4.095x)
    with pytest.raises(LlmBipError, match=r"planned for 4.09x.*lower --target-speedup or --speed-margin"):
        plan_speed(c, counts(c), PruneConfig(), fake_table(), SpeedTarget(3.9, route="depth"))
    assert plan_speed(c, counts(c), PruneConfig(), fake_table(), SpeedTarget(3.9, route="depth", margin=0)
                      ).remove_blocks == 9


def test_out_of_reach_is_a_clear_error():
    c = costs()
    with pytest.raises(LlmBipError, match="out of reach by width"):
        plan_speed(c, counts(c), PruneConfig(), fake_table(fixed=500.0), SpeedTarget(1.5, route="width"))
    with pytest.raises(LlmBipError, match="factor above 1"):
        SpeedTarget(0.9).validate()


def test_measured_table_is_cached_and_checked(tmp_path, monkeypatch):
    config = TINY_CONFIGS["llama"]()
    monkeypatch.setenv("LLM_BIP_CACHE", str(tmp_path / "cache"))
    widths = BlockWidths(6, 2, 96)
    table = timing.timing_table(config, "llama", widths, 8, torch.float32, torch.device("cpu"), "decode", 1, 16,
                                progress=False)
    assert len(table.points) == len(timing.grid(widths)) == 10  # 2 head levels x 5 channel widths
    assert {w.num_heads for w, _ in table.points} == {6, 3} and all(ms >= 0 for _, ms in table.points)
    assert table.fixed_ms >= 0 and table.model_ms([widths] * 3) > 0  # (a tiny model's fixed part can time as 0)
    files = list((tmp_path / "cache" / "timing").glob("*.json"))
    assert len(files) == 1

    def no_timing(*args, **kwargs):
        raise AssertionError("timed again instead of reading the cache")

    monkeypatch.setattr(timing, "measure", no_timing)
    again = timing.timing_table(config, "llama", widths, 8, torch.float32, torch.device("cpu"), "decode", 1, 16)
    assert again.to_json() == table.to_json()
    with pytest.raises(LlmBipError, match="measured for another model"):
        timing.timing_table(config, "llama", widths, 8, torch.float32, torch.device("cpu"), "prefill", 1, 16,
                            path=files[0])
    files[0].write_text(json.dumps({"format": "something else"}))
    with pytest.raises(LlmBipError, match="not an llm-bip timing table"):
        timing.TimingTable.load(files[0])
    with pytest.raises(LlmBipError, match="not an llm-bip timing table"):  # a file the user named: an error
        timing.timing_table(config, "llama", widths, 8, torch.float32, torch.device("cpu"), "decode", 1, 16,
                            path=files[0])
    # Our own cache file from an older llm-bip (or damaged) is timed again, not an error.
    monkeypatch.setattr(timing, "measure", lambda *args, **kwargs: table)
    for stale in (json.dumps({"format": "llm-bip-timing/1"}), "{damaged"):
        files[0].write_text(stale)
        again = timing.timing_table(config, "llama", widths, 8, torch.float32, torch.device("cpu"), "decode", 1, 16)
        assert again is table and json.loads(files[0].read_text())["format"] == timing.TIMING_FORMAT


def test_timing_cancels_a_host_that_drifts_between_shapes(monkeypatch):
    """Each shape's window is timed at its own pace (the host 1.0-1.9x slower from one shape to the next); the
    reference timed beside it in the same rounds puts every shape at the same pace, so the table's ratios are the
    true ones (timed one after the other, they would be off by up to 1.9x)."""
    config = TINY_CONFIGS["llama"]()
    widths = BlockWidths(6, 2, 96)
    fixed_cost = 3.0

    def cost(shape_config) -> float:  # ms per block at this shape, at pace 1
        return 0.5 + 0.01 * shape_config.intermediate_size + 0.2 * shape_config.num_attention_heads

    seen: list[tuple[int, int]] = []

    def fake_blocks(model, mode, batch, seq_len, repeats, device, warm_up=True):
        shape = (model.config.num_attention_heads, model.config.intermediate_size)
        if shape != (widths.num_heads, widths.channels) and shape not in seen:
            seen.append(shape)  # a new window starts, at a new pace
        pace = 1.0 + 0.1 * (len(seen) % 10)
        return pace * cost(model.config), pace * fixed_cost

    monkeypatch.setattr(timing, "time_blocks", fake_blocks)
    table = timing.measure(config, "llama", widths, 8, torch.float32, torch.device("cpu"), "prefill", 1, 16,
                           repeats=2, progress=False)
    full = dict(table.points)[widths]
    truth = {w: 0.5 + 0.01 * w.channels + 0.2 * w.num_heads for w, _ in table.points}
    assert len(seen) == len(timing.grid(widths)) - 1
    for shape, ms in table.points:
        assert ms / full == pytest.approx(truth[shape] / truth[widths])
    assert table.fixed_ms / full == pytest.approx(fixed_cost / truth[widths])
    assert len(set(table.details["window_pace"])) > 5


def test_timing_keeps_the_fastest_pass():
    ticks = iter([0.0, 0.005, 10.0, 10.003, 20.0, 20.004])  # passes of 5, 3, 4 ms

    class Model(torch.nn.Module):
        config = TINY_CONFIGS["llama"]()

        def forward(self, ids, use_cache=False):
            return None

    assert timing.time_pass(Model(), "prefill", 1, 4, 3, torch.device("cpu"), clock=lambda: next(ticks),
                            warm_up=False) == pytest.approx(3.0)


def test_blocks_are_timed_inside_the_pass():
    """The clock is read at each block's edges: a block's time is the fastest between its own two readings, the
    fixed cost the fastest rest of a pass, whatever else the pass spends (decoding: every step of every repeat)."""
    now = [0.0]

    def clock() -> float:
        return now[0]

    class Block(torch.nn.Module):
        def __init__(self, ms: float):
            super().__init__()
            self.ms = ms

        def forward(self, x):
            now[0] += self.ms / 1000
            return x

    class Model(torch.nn.Module):
        config = TINY_CONFIGS["llama"]()

        def __init__(self):
            super().__init__()
            self.model = torch.nn.Module()
            self.model.layers = torch.nn.ModuleList([Block(4.0), Block(3.0)])
            self.calls = 0

        def forward(self, ids, use_cache=False, past_key_values=None):
            self.calls += 1
            now[0] += (2.0 + self.calls % 3) / 1000  # the rest of the pass: 2-4 ms, 2 at its fastest
            for layer in self.model.layers:
                ids = layer(ids)
            logits = torch.zeros(ids.shape[0], ids.shape[1], 5)
            return SimpleNamespace(logits=logits, past_key_values=None, cache=None)

    for mode in ("prefill", "decode"):
        block, fixed = timing.time_blocks(Model(), mode, 1, 4, 3, torch.device("cpu"), clock=clock)
        assert block == pytest.approx(3.0) and fixed == pytest.approx(2.0)


def test_block_timing_reads_a_real_model_of_the_family_and_leaves_no_hooks():
    """A real (tiny) model of the family, both modes: its blocks are found and timed, and the clock's hooks are
    gone afterwards (a model timed once must run as before)."""
    config = TINY_CONFIGS["llama"]()
    config.num_hidden_layers = timing.TIMED_BLOCKS
    model = AutoModelForCausalLM.from_config(config).eval()
    for mode in ("prefill", "decode"):
        block, fixed = timing.time_blocks(model, mode, 1, 16, 2, torch.device("cpu"))
        assert block > 0 and fixed > 0
        assert not any(layer._forward_hooks or layer._forward_pre_hooks for layer in model.model.layers)


# ------------------------------------------------------------------------------------------ the CLI


@pytest.fixture(scope="module")
def cli_model(tmp_path_factory) -> Path:
    from test_depth import write_cli_model

    return write_cli_model(tmp_path_factory.mktemp("speed-cli"), layers=4)


def _prune(cli_model: Path, out: Path, *extra: str) -> int:
    from llm_bip.cli import main

    return main(["prune", "--model", str(cli_model), "--calibration", str(cli_model.parent / "calib.txt"),
                 "--num-samples", "4", "--seq-len", "16", "--eval", "none", "--quiet", "--output", str(out), *extra])


def _fake_table_for(cli_model: Path, path: Path | None, mode: str = "prefill") -> Path:
    """A linear fake timing table under the key this machine would measure for the tiny model, in `path` (None:
    where llm-bip's own cache keeps it)."""
    from llm_bip import api

    lm = api.load(str(cli_model))
    full = lm.adapter.widths(lm.adapter.blocks(lm.model)[0])
    key = timing.timing_key(lm.model.config, "llama", lm.dtype, lm.device, mode, 1, 128, full, lm.adapter.head_dim)
    points = [(BlockWidths(h, kv, c), 1 + 0.02 * c + 0.1 * h) for h, kv in ((full.num_heads, full.num_kv_heads),
                                                                          (full.num_heads // 2, full.num_kv_heads // 2))
              for c in (10, full.channels // 2, full.channels)]
    path = path or timing.cache_file_for(key)
    TimingTable(key, 4.0, points).save(path)
    return path


def test_cli_prunes_to_a_speed_target(cli_model, tmp_path):
    table = _fake_table_for(cli_model, tmp_path / "timing.json")
    # Dense: 4 + 4 * (1 + 1.92 + 0.6) = 18.08 ms; one block less: 14.56 ms = 1.24x; two: 11.04 = 1.64x.
    out = tmp_path / "depth"
    assert _prune(cli_model, out, "--target-speedup", "1.3", "--speed-route", "depth", "--timing-table", str(table)) == 0
    record = json.loads((out / "pruning_record.json").read_text())
    assert record["speed_target"]["remove_blocks"] == 2
    assert record["speed_target"]["predicted_speedup"] == pytest.approx(18.08 / 11.04)
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 2
    out = tmp_path / "width"
    assert _prune(cli_model, out, "--target-speedup", "1.2", "--speed-route", "width", "--timing-table", str(table)) == 0
    record = json.loads((out / "pruning_record.json").read_text())
    assert record["speed_target"]["predicted_speedup"] >= 1.2 and record["speed_target"]["ratio"] > 0
    assert "route_choice" not in record["speed_target"]


def test_the_default_route_prunes_by_each_and_keeps_the_best_on_held_out_text(cli_model, tmp_path):
    table = _fake_table_for(cli_model, tmp_path / "timing.json")
    out = tmp_path / "auto"
    assert _prune(cli_model, out, "--target-speedup", "1.3", "--timing-table", str(table)) == 0
    speed = json.loads((out / "pruning_record.json").read_text())["speed_target"]
    choice = speed["route_choice"]
    candidates = {c["route"]: c for c in choice["candidates"]}
    assert set(candidates) == {"width", "mixed", "depth"}
    assert all(c["predicted_speedup"] >= 1.3 and c["held_out_perplexity"] > 1 for c in candidates.values())
    best = min(candidates.values(), key=lambda c: c["held_out_perplexity"])
    assert speed["route"] == best["route"] and speed["ratio"] == best["ratio"]
    assert speed["remove_blocks"] == best["remove_blocks"]
    assert choice["held_out"]["windows"] > 0 and choice["held_out"]["overlap_with_calibration_tokens"] == 0
    assert choice["trial_prunes_use"] == {"calibration_samples": 4, "of": 4, "which": "the first ones"}
    layers = json.loads((out / "config.json").read_text())["num_hidden_layers"]
    assert layers == 4 - best["remove_blocks"]


def test_the_default_route_leaves_depth_out_where_width_options_are_given(cli_model, tmp_path, monkeypatch):
    from llm_bip import api

    pruned_from = []  # the calibration samples each prune got: the routes' trials, then the chosen route's prune
    real_prune = api.prune

    def counting_prune(lm, config, samples, *args, **kwargs):
        pruned_from.append(samples.shape[0])
        return real_prune(lm, config, samples, *args, **kwargs)

    monkeypatch.setattr(api, "prune", counting_prune)
    table = _fake_table_for(cli_model, tmp_path / "timing.json")
    out = tmp_path / "auto"
    assert _prune(cli_model, out, "--target-speedup", "1.3", "--round-to", "4", "--route-samples", "2",
                  "--timing-table", str(table)) == 0
    choice = json.loads((out / "pruning_record.json").read_text())["speed_target"]["route_choice"]
    assert [c["route"] for c in choice["candidates"]] == ["width", "mixed"]
    assert choice["trial_prunes_use"]["calibration_samples"] == 2 and choice["trial_prunes_use"]["of"] == 4
    assert pruned_from == [2, 2, 4]


def test_the_default_route_is_refused_for_a_streamed_model_with_what_to_do(cli_model, tmp_path, capsys):
    table = _fake_table_for(cli_model, tmp_path / "timing.json")
    assert _prune(cli_model, tmp_path / "out", "--target-speedup", "1.3", "--streaming", "--timing-table",
                  str(table)) != 0
    assert "choose --speed-route width, mixed or depth" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert _prune(cli_model, tmp_path / "out", "--target-speedup", "9", "--timing-table", str(table)) != 0
    assert "out of reach by width or mixed or depth on this device's timing" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags, message", [
    (["--target-speedup", "1.3", "--ratio", "0.2"], "leave out --ratio"),
    (["--target-speedup", "1.3", "--remove-blocks", "1"], "leave out --remove-blocks"),
    (["--speed-mode", "decode"], "cannot apply without --target-speedup"),
    (["--target-speedup", "1.3", "--speed-route", "depth", "--depth-share", "0.3"], "applies to --speed-route mixed"),
    (["--target-speedup", "1.3", "--speed-route", "width", "--route-samples", "8"], "applies to --speed-route auto"),
    (["--route-samples", "8"], "cannot apply without --target-speedup"),
    (["--target-speedup", "0.5"], "factor above 1"),
    (["--target-speedup", "1.3", "--speed-route", "depth", "--allocation", "block-adaptive"], "whole blocks only"),
])
def test_cli_speed_target_errors(cli_model, tmp_path, flags, message, capsys):
    table = _fake_table_for(cli_model, tmp_path / "timing.json")
    assert _prune(cli_model, tmp_path / "out", *flags, "--timing-table", str(table)) != 0
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- a plan's own widths, timed


def humped(widths: BlockWidths) -> float:
    """The 'true' block time: fake_table's line, plus a hump of up to 0.4 ms between its grid points at 50 and
    100 channels (a curve the grid cannot see)."""
    hump = 0.4 * max(0.0, 1 - abs(widths.channels - 75) / 25)
    return 1 + 0.02 * widths.channels + 0.25 * widths.num_heads + hump


def test_a_plan_that_rests_on_interpolation_is_timed_at_its_own_widths_and_planned_again():
    c, table, timed = costs(), fake_table(), []

    def time_shapes(shapes):
        timed.append(shapes)
        for shape in shapes:
            table.add_point(shape, humped(shape), {"fake": True})

    target = SpeedTarget(1.1, route="width", margin=0)  # 60 / 1.1 ms: 73 channels on the grid's line, inside the hump
    grid_plan = plan_speed(c, counts(c), PruneConfig(), fake_table(), target)
    speed, earlier = plan_speed_refined(c, counts(c), PruneConfig(), table, target, time_shapes)
    assert earlier[0] == grid_plan and timed[0] == [grid_plan.kept_widths[0]]
    # Truth at the final plan: its widths were timed, and the target holds on the true curve.
    kept = speed.kept_widths[0]
    assert table.unmeasured(kept) == []
    assert 60 / (10 + 10 * humped(kept)) >= 1.1 - 1e-9
    assert 60 / (10 + 10 * humped(grid_plan.kept_widths[0])) < 1.1  # the grid's own plan misses on it
    assert speed.ratio > grid_plan.ratio and 1 <= len(timed) <= REFINE_ROUNDS
    # Depth keeps full widths, which the grid timed: nothing to time.
    depth, before = plan_speed_refined(c, counts(c), PruneConfig(), fake_table(), SpeedTarget(1.5, route="depth", margin=0),
                                       lambda shapes: pytest.fail(f"timed {shapes}"))
    assert depth.remove_blocks == 4 and before == []
    # Without a timer (a table the user gave), the grid's plan as it is.
    assert plan_speed_refined(c, counts(c), PruneConfig(), fake_table(), target, None) == (grid_plan, [])


def test_a_plan_between_head_levels_is_timed_on_both():
    table = fake_table()
    assert table.unmeasured(BlockWidths(8, 2, 73)) == [BlockWidths(8, 2, 73)]
    assert table.unmeasured(BlockWidths(8, 2, 50)) == []  # a grid point
    assert table.unmeasured(BlockWidths(6, 2, 40)) == [BlockWidths(4, 1, 40), BlockWidths(8, 2, 40)]
    assert table.unmeasured(BlockWidths(4, 1, 100)) == []
    assert table.unmeasured(BlockWidths(2, 1, 30)) == [BlockWidths(4, 1, 30), BlockWidths(8, 2, 30)]  # extrapolated
    table.add_point(BlockWidths(8, 2, 73), 3.0, {"fake": True})
    assert table.unmeasured(BlockWidths(8, 2, 73)) == [] and table.block_ms(BlockWidths(8, 2, 73)) == 3.0
    assert table.details["refined"] == [{**BlockWidths(8, 2, 73).to_json(), "block_ms": 3.0, "fake": True}]


def test_refine_puts_the_plan_widths_on_the_tables_scale_whatever_the_pace_now(monkeypatch):
    """The table was timed at one pace; the host now runs 1.7x slower. The new point is the shape's time over the
    reference's in the same rounds, times the table's full-width point: the true ratio on the table's scale."""
    config = TINY_CONFIGS["llama"]()
    widths = BlockWidths(6, 2, 96)

    def cost(shape_config) -> float:
        return 0.5 + 0.01 * shape_config.intermediate_size + 0.2 * shape_config.num_attention_heads

    def fake_blocks(model, mode, batch, seq_len, repeats, device, warm_up=True, pace=1.0):
        return pace * cost(model.config), pace * 3.0

    monkeypatch.setattr(timing, "time_blocks", fake_blocks)
    table = timing.measure(config, "llama", widths, 8, torch.float32, torch.device("cpu"), "prefill", 1, 16,
                           repeats=2, progress=False)
    monkeypatch.setattr(timing, "time_blocks", lambda *a, **k: fake_blocks(*a, **k, pace=1.7))
    shape = BlockWidths(6, 2, 61)
    timing.refine(table, config, [shape], 8, torch.float32, torch.device("cpu"), repeats=2, progress=False)
    full = dict(table.points)[widths]
    assert dict(table.points)[shape] / full == pytest.approx((0.5 + 0.61 + 1.2) / (0.5 + 0.96 + 1.2))
    assert table.details["refined"][0]["intermediate_size"] == 61
    with pytest.raises(LlmBipError, match="timed for"):
        timing.refine(table, config, [shape], 8, torch.bfloat16, torch.device("cpu"), progress=False)


def test_a_cached_table_gains_the_plans_own_widths_and_a_given_one_stays_as_it_is(cli_model, tmp_path, monkeypatch):
    monkeypatch.setenv("LLM_BIP_CACHE", str(tmp_path / "cache"))
    cached = _fake_table_for(cli_model, None)

    def on_the_tables_line(model, mode, batch, seq_len, repeats, device, warm_up=True):
        """A clock by which every block costs what the fake table's line says (a tiny model's real passes time as
        noise): the timed widths land on the line, so the plan stays where it is once they are timed."""
        c = model.config
        return 1 + 0.02 * c.intermediate_size + 0.1 * c.num_attention_heads, 4.0

    monkeypatch.setattr(timing, "time_blocks", on_the_tables_line)
    out = tmp_path / "first"
    assert _prune(cli_model, out, "--target-speedup", "1.2", "--speed-margin", "0", "--speed-route", "width") == 0
    speed = json.loads((out / "pruning_record.json").read_text())["speed_target"]
    assert speed["own_widths"].startswith("timed") and len(speed["plans_before_timing_own_widths"]) == 1
    assert (speed["margin"], speed["planned_for"]) == (0, 1.2)
    assert speed["plans_before_timing_own_widths"][0]["ratio"] == speed["ratio"]  # on the line: the same plan
    refined = json.loads(cached.read_text())["details"]["refined"]  # timed, kept in the cache
    assert len(refined) == 1 and refined[0]["intermediate_size"] == json.loads((out / "config.json").read_text())[
        "intermediate_size"]
    assert speed["timing_table"]["details"]["refined"] == refined

    def no_timing(*args, **kwargs):
        raise AssertionError("timed the plan's widths again instead of reading them from the cache")

    monkeypatch.setattr(timing, "refine", no_timing)
    out = tmp_path / "again"
    assert _prune(cli_model, out, "--target-speedup", "1.2", "--speed-margin", "0", "--speed-route", "width") == 0
    again = json.loads((out / "pruning_record.json").read_text())["speed_target"]
    assert again["ratio"] == speed["ratio"] and again["plans_before_timing_own_widths"] == []
    # A table the user names is used as it is: nothing timed, nothing written into their file.
    given = _fake_table_for(cli_model, tmp_path / "given.json")
    before = given.read_text()
    out = tmp_path / "given"
    assert _prune(cli_model, out, "--target-speedup", "1.2", "--speed-margin", "0", "--speed-route", "width", "--timing-table", str(given)) == 0
    speed = json.loads((out / "pruning_record.json").read_text())["speed_target"]
    assert speed["own_widths"].startswith("not timed") and given.read_text() == before


def test_mixed_route_finds_the_smallest_ratio_where_a_whole_block_costs_speed():
    """Where a block's parameters buy less time than channels do, the predicted speed-up falls where the plan's
    block count steps up (the widths give back what the block takes). Bisection over the whole range then lands
    past the step; the planner searches each stretch of one block count in turn."""
    from llm_bip.pipeline import depth_parameters, plan_widths

    c, config = costs(), PruneConfig()
    # A block costs 0.05 ms a channel plus 0.01 ms a head, nothing fixed: 5.08 ms for 320 parameters, where
    # 3 parameters' channel costs 0.05 ms (5.33 ms for 320).
    table = TimingTable(KEY, 0.5, [(BlockWidths(h, kv, ch), 0.05 * ch + 0.01 * h)
                                   for h, kv in ((8, 2), (4, 1)) for ch in (10, 50, 100)])
    base, dense = counts(c)["non_embedding"], table.model_ms([FULL] * 10)

    def speedup(ratio: float, blocks: int) -> float:
        removed = list(range(10 - blocks, 10))
        widths = plan_widths(c, round(ratio * base) - depth_parameters(c, removed), config, None, removed)
        return dense / table.model_ms([w for i, w in enumerate(widths) if i not in removed])

    speed = plan_speed(c, counts(c), config, table, SpeedTarget(1.11, route="mixed", depth_share=0.5, margin=0))
    first_step = 0.5 * c[0].total(FULL) / (0.5 * base)  # from here on the mixed plan takes one whole block
    assert speed.remove_blocks == 0 and speed.ratio < first_step and speed.predicted_speedup >= 1.11
    assert speedup(first_step, 1) < 1.11  # just past the step the target is missed again
    assert speedup(round(speed.ratio - 1e-4, 4), 0) < 1.11  # and one step less than the plan misses it
