"""`--round-to auto`: a kept FFN width moved down to one the device runs clearly faster, where its own
timing shows one close by.

Time against FFN width has steps on real kernels, but not at a fixed multiple (docs/results.md §9, with
bench_round.py: on this CPU SmolLM2's MLP at batch-8 prefill halves below 1,064 channels, and TinyLlama's
is 28% faster at 4,192 than at 4,198), so no one `--round-to N` is right. Instead the device times the
family's FFN sub-layer (norm, MLP, residual add; random weights in the model's dtype) at the planned width
and at every multiple of `STEP` down to `WINDOW` below it, in rounds of a new random order each (a slow
phase of the host falls on every width), each width keeping its fastest time. The fastest width is kept
if it is at least `MIN_GAIN` faster than the planned one; otherwise the planned width stays. Rounding only
ever removes channels: the prune then removes a little more than the ratio asked, and its record says
how much and why.
"""

from __future__ import annotations

import copy
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from llm_bip.speed.timing import check_pass, device_name, shaped_config, synchronize
from llm_bip.widths import BlockWidths

log = logging.getLogger(__name__)

STEP = 8  # candidate widths are multiples of this (of a larger power of two where the window is wide)
MAX_CANDIDATES = 16  # widths timed per planned width: a 70B model's window would otherwise hold 86
WINDOW = 0.03  # at most this fraction of the planned width more is removed
MIN_GAIN = 0.05  # the FFN must be at least this much faster than at the planned width (above the timing noise)
ROUNDS = 7
MIN_SAMPLE_SECONDS = 0.002  # a timed sample repeats the FFN until it takes about this long (decoding is µs)


@dataclass(frozen=True)
class RoundingSpec:
    """What the widths are rounded for: the same pass a speed target names."""

    mode: str = "prefill"
    batch: int = 1
    seq_len: int = 128  # prefill tokens per sequence (decoding times one token per sequence)

    @classmethod
    def of(cls, target) -> RoundingSpec:
        """The pass a speed target (`planner.SpeedTarget`) is of."""
        return cls(target.mode, target.batch, target.seq_len)

    def validate(self) -> RoundingSpec:
        check_pass(self.mode, self.batch, self.seq_len)
        return self


def candidates(width: int) -> list[int]:
    """The planned width, then every multiple of the step below it down to WINDOW of it (at least one STEP):
    the step is STEP, doubled until at most MAX_CANDIDATES - 1 multiples lie in the window."""
    span = max(STEP, math.floor(WINDOW * width))
    lowest = max(1, width - span)
    step = STEP
    while span // step >= MAX_CANDIDATES:
        step *= 2
    below = range((width - 1) // step * step, lowest - 1, -step)
    return [width] + [c for c in below if c >= 1]


def choose(width: int, ffn_ms: dict[int, float]) -> int:
    """The fastest candidate if it beats the planned width by MIN_GAIN (the wider one on a tie), else `width`."""
    best = min(candidates(width), key=lambda c: (ffn_ms[c], -c))
    return best if ffn_ms[best] <= (1 - MIN_GAIN) * ffn_ms[width] else width


Timer = Callable[[list[int]], dict[int, float]]


def round_widths(widths: list[BlockWidths], before: list[BlockWidths], timer: Timer) -> tuple[list[BlockWidths], dict]:
    """Each pruned block's FFN width rounded by the timing (`timer`: milliseconds of the FFN sub-layer at
    each width asked); blocks whose FFN keeps every channel it has (`before`) stay as they are. Returns the
    widths and the record of what was timed and chosen."""
    cut = [w.channels < b.channels for w, b in zip(widths, before, strict=True)]
    planned = sorted({w.channels for w, c in zip(widths, cut, strict=True) if c})
    if not planned:
        return widths, {"rounded": {}, "note": "no FFN channel is removed: nothing to round"}
    asked = sorted({c for width in planned for c in candidates(width)}, reverse=True)
    ffn_ms = timer(asked)
    chosen = {width: choose(width, ffn_ms) for width in planned}
    rounded = [BlockWidths(w.num_heads, w.num_kv_heads, chosen[w.channels]) if c else w
               for w, c in zip(widths, cut, strict=True)]
    record = {
        "rule": f"the fastest FFN width among the planned one and the multiples of {STEP} (of a larger power of two "
                f"where more than {MAX_CANDIDATES - 1} would lie in the window) down to {WINDOW:.0%} below it, if at "
                f"least {MIN_GAIN:.0%} faster than the planned one; every width timed is in ffn_ms",
        "rounded": {str(w): c for w, c in chosen.items()},
        "ffn_ms": {str(c): round(ms, 5) for c, ms in sorted(ffn_ms.items())},
        "ffn_speedup": {str(w): ffn_ms[w] / ffn_ms[c] for w, c in chosen.items()},
        "channels_removed_beyond_plan": sum(a.channels - b.channels for a, b in zip(widths, rounded, strict=True)),
    }
    for width, c in chosen.items():
        log.info("round-to auto: FFN width %d -> %d (%.2f ms -> %.2f ms on the device's timing)", width, c,
                 ffn_ms[width], ffn_ms[c])
    return rounded, record


_TIMED: dict[tuple, dict[int, float]] = {}  # per process: the auto speed route prunes several copies


def device_timer(config, adapter, full: BlockWidths, dtype: torch.dtype, device: torch.device, spec: RoundingSpec,
                 rounds: int = ROUNDS) -> Timer:
    """A timer of the family's FFN sub-layer on `device` (`full`: the model's widths, heads kept)."""
    spec.validate()

    def timer(widths: list[int]) -> dict[int, float]:
        key = (adapter.family, config.to_json_string(), str(dtype), device_name(device), spec, tuple(widths), rounds)
        if key not in _TIMED:
            _TIMED[key] = time_ffn(config, adapter, full, widths, dtype, device, spec, rounds)
        return _TIMED[key]

    return timer


@torch.no_grad()
def time_ffn(config, adapter, full: BlockWidths, widths: list[int], dtype: torch.dtype, device: torch.device,
             spec: RoundingSpec, rounds: int = ROUNDS) -> dict[int, float]:
    """Milliseconds of one FFN sub-layer pass at each width: a block of the family with random weights, its
    FFN cut to each width, run on random residual activations of the pass `spec` names. Each timed sample
    cuts its own copy and frees it, so memory holds the block and one copy, whatever the number of widths."""
    from transformers import AutoModelForCausalLM

    started = time.perf_counter()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(shaped_config(config, full, adapter.head_dim, 1), dtype=dtype)
    block = adapter.blocks(model)[0].to(device).eval()
    del model
    heads = torch.arange(full.num_heads * adapter.head_dim)
    kv = torch.arange(full.num_kv_heads * adapter.head_dim)
    tokens = spec.seq_len if spec.mode == "prefill" else 1
    generator = torch.Generator().manual_seed(0)
    h = torch.randn(spec.batch, tokens, config.hidden_size, generator=generator).to(device, dtype)

    def run(width: int, repeat: int) -> float:
        cut = copy.deepcopy(block)
        adapter.cut(cut, heads, kv, torch.arange(width))
        adapter.ffn_sublayer(cut, h)  # warm-up: kernels chosen, caches filled
        synchronize(device)
        start = time.perf_counter()
        for _ in range(repeat):
            adapter.ffn_sublayer(cut, h)
        synchronize(device)
        return (time.perf_counter() - start) / repeat

    repeat = max(1, math.ceil(MIN_SAMPLE_SECONDS / max(run(widths[0], 1), 1e-7)))
    best = dict.fromkeys(widths, math.inf)
    order = list(widths)
    shuffle = random.Random(0)
    for _ in range(rounds):
        shuffle.shuffle(order)
        for width in order:
            best[width] = min(best[width], run(width, repeat) * 1000)
    log.info("round-to auto: timed the FFN at %d widths (%s, batch %d) in %.1f s", len(widths), spec.mode, spec.batch,
             time.perf_counter() - started)
    return best
