"""The device's own timing of a model's block shapes: what a block costs at a few widths, measured.

Speed does not follow parameter counts (a 135M model decoding one token at a time on a CPU is bound by
per-operator overhead, a wide FFN by arithmetic), so the speed planner asks the device. A small model
of the family is built with random weights at each grid shape (query heads x KV heads x FFN channels),
in the weights' dtype and on the device, with two blocks, and each block is timed inside the model's pass
(the clock read at its entry and exit); the rest of the pass is the fixed cost (embeddings, final norm,
output layer, the framework's own).
Prefill is one forward pass over `batch` x `seq_len` tokens; decode is one token per sequence with a
KV cache of `seq_len` tokens. The table is cached by everything that decides it (family, shapes, dtype,
device, torch version, mode, batch, length), so each device times a model shape once.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import json
import logging
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from llm_bip.dtypes import dtype_name
from llm_bip.errors import LlmBipError
from llm_bip.outputs import write_text_atomic
from llm_bip.widths import BlockWidths

log = logging.getLogger(__name__)

TIMING_FORMAT = "llm-bip-timing/4"  # /4: each block timed inside the pass (/3: block time from the difference
# of passes with 3 blocks and 1, each shape paired with the full-width reference; /2: fastest of paired passes,
# shapes one after the other; /1: medians, timed one model after the other)
MODES = ("prefill", "decode")
CHANNEL_FRACTIONS = (0.1, 0.25, 0.5, 0.75, 1.0)
# Blocks in a timed model: each is timed, the fastest counts (two, so that no one block's place decides).
TIMED_BLOCKS = 2
REPEATS = 5
DECODE_STEPS = 8  # decoding steps timed per pass of a decode timing
# A plan's own shapes (refine): timed in twice the grid's rounds, since their points decide the plan; a point
# within 0.5% of the full width's channels of a plan's width counts as its own (the grid's steps are 10-25%).
REFINE_REPEATS, REFINE_TOLERANCE = 10, 0.005


@dataclass(frozen=True)
class TimingKey:
    """Everything a timing depends on."""

    family: str
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    channels: int
    vocab_size: int
    dtype: str
    device: str  # the device's name (the GPU's model, or "cpu" with its core count)
    torch_version: str
    mode: str
    batch: int
    seq_len: int

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class TimingTable:
    """Milliseconds per block at grid widths, and the fixed cost of one pass, for one `TimingKey`."""

    key: TimingKey
    fixed_ms: float
    points: list[tuple[BlockWidths, float]]  # (widths, ms per block)
    details: dict = field(default_factory=dict)
    # llm-bip's own cache file the table lives in (None: a file the user named, used as it is): a plan's
    # own widths, timed (refine), are saved there, so the next plan for the same target reads them
    cache_file: Path | None = field(default=None, compare=False, repr=False)

    # ---------------------------------------------------------------------------------- prediction

    def block_ms(self, widths: BlockWidths) -> float:
        """One block's time at `widths`: piecewise linear in the FFN channels along each measured head level,
        then linear in the query heads between the two nearest levels (extrapolated beyond them)."""
        lower, upper = self._head_levels(widths.num_heads)
        curves = {h: sorted((w.channels, ms) for w, ms in self.points if w.num_heads == h) for h in (lower, upper)}
        if lower == upper:
            return _interpolate(curves[lower], widths.channels)
        heads = widths.num_heads
        t_low, t_up = _interpolate(curves[lower], widths.channels), _interpolate(curves[upper], widths.channels)
        return max(0.0, t_low + (t_up - t_low) * (heads - lower) / (upper - lower))

    def _head_levels(self, heads: int) -> tuple[int, int]:
        """The two measured query-head levels block_ms draws on for `heads` (the nearest, or the end two where
        it extrapolates); the one level twice where only one was measured."""
        levels = sorted({w.num_heads for w, _ in self.points})
        if len(levels) == 1:
            return levels[0], levels[0]
        upper = next((h for h in levels[1:] if h >= heads), levels[-1])
        return levels[levels.index(upper) - 1], upper

    def model_ms(self, blocks: list[BlockWidths]) -> float:
        """One pass of a model whose kept blocks have these widths."""
        return self.fixed_ms + sum(self.block_ms(w) for w in blocks)

    @property
    def full_widths(self) -> BlockWidths:
        return BlockWidths(self.key.num_heads, self.key.num_kv_heads, self.key.channels)

    def unmeasured(self, widths: BlockWidths, tolerance: float = REFINE_TOLERANCE) -> list[BlockWidths]:
        """The shapes to time so that `widths`' prediction rests on points measured at its own FFN width: on
        each head level block_ms draws on (with a weight above 0), `widths`' channels, unless a point lies
        within `tolerance` of the full width's channels of them."""
        lower, upper = self._head_levels(widths.num_heads)
        # a level's weight in block_ms is 0 where `widths` has exactly the other level's heads
        used = [h for h, other in ((lower, upper), (upper, lower)) if widths.num_heads != other or lower == upper]
        kv_heads = {w.num_heads: w.num_kv_heads for w, _ in self.points}
        near = max(1, round(tolerance * self.key.channels))
        return [BlockWidths(h, kv_heads[h], widths.channels) for h in dict.fromkeys(used)
                if not any(w.num_heads == h and abs(w.channels - widths.channels) <= near for w, _ in self.points)]

    def add_point(self, widths: BlockWidths, ms: float, note: dict) -> None:
        """A measured point in place of any at the same widths; `note` says how it was measured."""
        self.points = [(w, t) for w, t in self.points if w != widths] + [(widths, ms)]
        self.details.setdefault("refined", []).append({**widths.to_json(), "block_ms": ms, **note})

    # ----------------------------------------------------------------------------------------- files

    def to_json(self) -> dict:
        return {"format": TIMING_FORMAT, "key": asdict(self.key), "fixed_ms": self.fixed_ms,
                "points": [{**w.to_json(), "block_ms": ms} for w, ms in self.points], "details": self.details}

    @classmethod
    def from_json(cls, data: dict, source: str = "timing table") -> TimingTable:
        if not isinstance(data, dict) or data.get("format") != TIMING_FORMAT:
            raise LlmBipError(f"{source} is not an llm-bip timing table ({TIMING_FORMAT})")
        try:
            points = [(BlockWidths.from_json(p), float(p["block_ms"])) for p in data["points"]]
            return cls(TimingKey(**data["key"]), float(data["fixed_ms"]), points, data.get("details", {}))
        except (KeyError, TypeError, ValueError) as exc:
            raise LlmBipError(f"{source} is a damaged timing table ({exc}): delete it to time again") from None

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, json.dumps(self.to_json(), indent=1))

    @classmethod
    def load(cls, path: Path) -> TimingTable:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise LlmBipError(f"cannot read the timing table {path}: {exc}") from None
        return cls.from_json(data, str(path))


def _interpolate(points: list[tuple[int, float]], x: int) -> float:
    """Piecewise-linear through (channels, ms), extrapolated along the end segments; never below 0."""
    if len(points) == 1:
        return points[0][1]
    for (x0, y0), (x1, y1) in zip(points, points[1:], strict=False):
        if x <= x1 or (x1, y1) == points[-1]:
            return max(0.0, y0 + (y1 - y0) * (x - x0) / (x1 - x0))
    return points[-1][1]


# --------------------------------------------------------------------------------------- measuring


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type}:{os.cpu_count()}cores:{torch.get_num_threads()}threads"


def check_pass(mode: str, batch: int, seq_len: int) -> None:
    """The pass a speed-up is of (a speed target's, a timing's, round-to auto's): a known mode, sizes >= 1."""
    if mode not in MODES:
        raise LlmBipError(f"unknown speed mode '{mode}': use one of {', '.join(MODES)}")
    if batch < 1 or seq_len < 1:
        raise LlmBipError("the speed batch and length must be at least 1")


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so a clock read after it times the work (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timing_key(config, family: str, dtype: torch.dtype, device: torch.device, mode: str, batch: int,
               seq_len: int, widths: BlockWidths, head_dim: int) -> TimingKey:
    check_pass(mode, batch, seq_len)
    return TimingKey(family, config.hidden_size, widths.num_heads, widths.num_kv_heads, head_dim, widths.channels,
                     config.vocab_size, dtype_name(dtype), device_name(device), torch.__version__,
                     mode, batch, seq_len)


def head_levels(widths: BlockWidths) -> list[tuple[int, int]]:
    """(query heads, KV heads) the grid times: all of them, and half the KV groups where there are two or more."""
    levels = [(widths.num_heads, widths.num_kv_heads)]
    if widths.num_kv_heads >= 2:
        kv = widths.num_kv_heads // 2
        levels.append((kv * widths.group_size, kv))
    elif widths.num_heads >= 2:
        levels.append((widths.num_heads // 2, 1))
    return levels


def grid(widths: BlockWidths) -> list[BlockWidths]:
    channels = sorted({max(1, round(f * widths.channels)) for f in CHANNEL_FRACTIONS})
    return [BlockWidths(h, kv, c) for h, kv in head_levels(widths) for c in channels]


def shaped_config(config, widths: BlockWidths, head_dim: int, num_blocks: int):
    """The stock config of a model of `num_blocks` blocks, all of `widths` (head_dim kept)."""
    shaped = copy.deepcopy(config)
    if getattr(shaped, "layer_widths", None):  # a pruned model's own class: every block at `widths`
        shaped.layer_widths = [widths.to_json()] * num_blocks
    shaped.num_hidden_layers = num_blocks
    shaped.num_attention_heads, shaped.num_key_value_heads = widths.num_heads, widths.num_kv_heads
    shaped.intermediate_size = widths.channels
    shaped.head_dim = head_dim
    layer_types = getattr(shaped, "layer_types", None)
    if isinstance(layer_types, list | tuple):
        shaped.layer_types = list(layer_types[:num_blocks]) + [layer_types[-1]] * max(0, num_blocks - len(layer_types))
    shaped.use_cache = True
    return shaped


@torch.no_grad()
def time_pass(model: torch.nn.Module, mode: str, batch: int, seq_len: int, repeats: int, device: torch.device,
              clock: Callable[[], float] = time.perf_counter, warm_up: bool = True) -> float:
    """Milliseconds of one pass, the fastest of `repeats` (the host's other work only ever slows a pass down,
    so the minimum is the least noisy estimate): prefill over batch x seq_len tokens, or one decoding step
    per sequence with a KV cache of seq_len tokens (the fastest of DECODE_STEPS steps in each repeat)."""
    return min(seconds for seconds, _ in _timed_passes(model, mode, batch, seq_len, repeats, device, clock,
                                                        warm_up)) * 1000


def time_blocks(model: torch.nn.Module, mode: str, batch: int, seq_len: int, repeats: int, device: torch.device,
                clock: Callable[[], float] = time.perf_counter, warm_up: bool = True) -> tuple[float, float]:
    """(Milliseconds of one block, milliseconds of the rest of a pass), each the fastest of `repeats` passes
    as time_pass runs them: the clock is read as each of the model's blocks starts and ends.

    Timing a block inside the pass instead of as the difference between passes with more blocks and fewer
    takes the noise of two whole passes out of it: on this project's CPU host the difference moved the decoding
    points of a 1B shape by 16% between timings (the median point; the worst by 54%), the direct reading by 3%
    (the worst by 12%; docs/results.md §9). The
    clock waits for the device at each block's edges (synchronize), so on a GPU a block's time includes the
    launch of its kernels, which a pass without the clock overlaps with the block before."""
    stamps: list[float] = []

    def stamp(*_):
        synchronize(device)
        stamps.append(clock())

    layers = list(model.model.layers)
    hooks = [h for layer in layers for h in (layer.register_forward_pre_hook(stamp), layer.register_forward_hook(stamp))]
    try:
        passes = _timed_passes(model, mode, batch, seq_len, repeats, device, clock, warm_up, stamps)
    finally:
        for hook in hooks:
            hook.remove()
    blocks = [[ends - starts for starts, ends in zip(edges[::2], edges[1::2], strict=True)] for _, edges in passes]
    if any(len(b) != len(layers) for b in blocks):
        raise LlmBipError(f"timing expected each of the model's {len(layers)} blocks to run once per pass")
    return (min(min(b) for b in blocks) * 1000,
            max(0.0, min(seconds - sum(b) for (seconds, _), b in zip(passes, blocks, strict=True)) * 1000))


def _timed_passes(model: torch.nn.Module, mode: str, batch: int, seq_len: int, repeats: int, device: torch.device,
                  clock: Callable[[], float], warm_up: bool, stamps: list[float] | None = None
                  ) -> list[tuple[float, list[float]]]:
    """(Seconds, the clock readings `stamps` gathered during it) of each timed pass: one prefill pass per repeat,
    or DECODE_STEPS decoding steps per repeat after a prefill that fills the KV cache (untimed)."""
    vocab = model.config.vocab_size
    # transformers renamed the KV cache argument from past_key_values to cache (5.2x; the old name goes in 5.40)
    cache_argument = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    ids = torch.randint(0, vocab, (batch, seq_len), generator=torch.Generator().manual_seed(0)).to(device)
    stamps = [] if stamps is None else stamps

    def timed(run: Callable[[], object]) -> tuple[object, tuple[float, list[float]]]:
        synchronize(device)
        stamps.clear()
        start = clock()
        out = run()
        synchronize(device)
        elapsed = clock() - start
        return out, (elapsed, list(stamps))

    passes = []
    for repeat in range(repeats + warm_up):
        if mode == "prefill":
            this = [timed(lambda: model(ids, use_cache=False))[1]]
        else:
            out = model(ids, use_cache=True)
            cache, token = _cache_of(out), out.logits[:, -1:].argmax(-1)
            this = []
            for _ in range(DECODE_STEPS):
                out, step = timed(lambda: model(token, use_cache=True, **{cache_argument: cache}))  # noqa: B023
                this.append(step)
                cache, token = _cache_of(out), out.logits[:, -1:].argmax(-1)
        if repeat or not warm_up:
            passes.extend(this)
    return passes


def _cache_of(output):
    """The KV cache a forward pass returned, under the name of this transformers version."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


class _Windows:
    """Times block shapes of one model family in windows beside the full-width reference (measure, refine).

    A window times a shape's model (TIMED_BLOCKS blocks; time_blocks), one pass each round, in `repeats`
    rounds, and the full-width reference the same way in the same rounds. A planner divides model times by
    each other, so what it needs is that shapes compare as if timed at once: on a host whose speed drifts by
    10-20% over a minute (docs/results.md §9), shapes timed one after the other do not."""

    def __init__(self, config, widths: BlockWidths, head_dim: int, dtype: torch.dtype, device: torch.device,
                 mode: str, batch: int, seq_len: int):
        self.config, self.widths, self.head_dim, self.dtype, self.device = config, widths, head_dim, dtype, device
        self.mode, self.batch, self.seq_len = mode, batch, seq_len
        self.reference = self._build(widths)
        self._time(self.reference, warm_up=True)  # its first window may come later; it starts warm there

    def _build(self, shape: BlockWidths, share_with=None) -> torch.nn.Module:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(shaped_config(self.config, shape, self.head_dim, TIMED_BLOCKS),
                                                 dtype=self.dtype)
        if share_with is not None:  # the embedding and output layer do not depend on the block shape: one copy
            model.set_input_embeddings(share_with.get_input_embeddings())
            model.set_output_embeddings(share_with.get_output_embeddings())
        return model.to(self.device).eval()

    def _time(self, model: torch.nn.Module, warm_up: bool) -> tuple[float, float]:
        return time_blocks(model, self.mode, self.batch, self.seq_len, 1, self.device, warm_up=warm_up)

    def window(self, shape: BlockWidths, repeats: int) -> tuple[tuple[float, float], tuple[float, float]]:
        """(the shape's block and fixed ms, the reference's beside it), each the fastest of its rounds."""
        model = self.reference if shape == self.widths else self._build(shape, share_with=self.reference)
        own, beside = [], []
        for repeat in range(repeats):
            own.append(self._time(model, warm_up=repeat == 0))
            if model is not self.reference:
                beside.append(self._time(self.reference, warm_up=False))
        return _fastest(own), _fastest(beside or own)


def _fastest(rounds: list[tuple[float, float]]) -> tuple[float, float]:
    """The fastest block and the fastest rest of a pass over (block ms, fixed ms) rounds."""
    return min(block for block, _ in rounds), min(fixed for _, fixed in rounds)


def measure(config, family: str, widths: BlockWidths, head_dim: int, dtype: torch.dtype, device: torch.device,
            mode: str, batch: int, seq_len: int, repeats: int = REPEATS, progress: bool = True) -> TimingTable:
    """Time the grid of block shapes around `widths` (the model's full widths) on `device`.

    Each shape is timed in a window of its own beside the full-width reference (_Windows). A shape keeps its
    fastest block and rest of a pass, and these are divided by the reference's block time in the same
    window and multiplied by the reference's median over all windows."""
    from tqdm.auto import tqdm

    key = timing_key(config, family, dtype, device, mode, batch, seq_len, widths, head_dim)
    started = time.perf_counter()
    timer = _Windows(config, widths, head_dim, dtype, device, mode, batch, seq_len)
    windows = [(shape, *timer.window(shape, repeats))
               for shape in tqdm(grid(widths), desc=f"timing {mode} shapes", disable=not progress)]
    reference_block = statistics.median(ref[0] for _, _, ref in windows)
    points, fixed, speeds = [], [], []
    for shape, (block, shape_fixed), (ref_block, ref_fixed) in windows:
        # this window's pace against the median (1 where a block timed as nothing, as a tiny model's can)
        speed = ref_block / reference_block if ref_block > 0 and reference_block > 0 else 1.0
        points.append((shape, block / speed))
        fixed.extend((shape_fixed / speed, ref_fixed / speed))
        speeds.append(round(speed, 4))
    details = {"seconds": time.perf_counter() - started, "repeats": repeats, "fixed_ms_per_shape": fixed[::2],
               "window_pace": speeds,
               "method": f"per shape, {repeats} rounds of one pass of a {TIMED_BLOCKS}-block model, and the same "
                         "for the full-width reference beside it; block = the fastest block timed inside a pass, "
                         "fixed = the fastest rest of a pass; both divided by the window's pace (the reference's "
                         "block time there over its median over all windows); fixed: median"}
    return TimingTable(key, max(0.0, statistics.median(fixed)), points, details)


def refine(table: TimingTable, config, shapes: list[BlockWidths], head_dim: int, dtype: torch.dtype,
           device: torch.device, repeats: int = REFINE_REPEATS, progress: bool = True) -> None:
    """Time `shapes` (a plan's own block widths) beside the full-width reference and add them to `table`.

    Between grid widths the table interpolates, and on this host's CPUs time against width is neither
    straight nor free of noise (docs/results.md §9): a plan that sits exactly at its target by the
    interpolation can miss it by the curve's error there. Each shape's point is its block time over the
    reference's in the same rounds, times the table's own full-width block time, so it is on the table's
    scale whatever the host's pace now."""
    from tqdm.auto import tqdm

    key = table.key
    if shapes and (timing_key(config, key.family, dtype, device, key.mode, key.batch, key.seq_len, table.full_widths,
                              head_dim) != key):
        raise LlmBipError("refining a timing table needs the model, device and setting it was timed for")
    full_ms = dict(table.points).get(table.full_widths)
    if full_ms is None:
        raise LlmBipError("the timing table has no full-width point to refine against: delete it to time again")
    timer = _Windows(config, table.full_widths, head_dim, dtype, device, key.mode, key.batch, key.seq_len)
    for shape in tqdm(shapes, desc=f"timing the plan's {key.mode} shapes", disable=not progress):
        started = time.perf_counter()
        (block, _), (ref_block, _) = timer.window(shape, repeats)
        ratio = block / ref_block if ref_block > 0 else None  # (a tiny model's block can time as nothing)
        table.add_point(shape, ratio * full_ms if ratio is not None else block,
                        {"ratio_to_full": ratio, "repeats": repeats, "seconds": time.perf_counter() - started})


def cache_dir() -> Path:
    root = os.environ.get("LLM_BIP_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME") or
                                                          os.path.expanduser("~/.cache"), "llm-bip")
    return Path(root) / "timing"


def cache_file_for(key: TimingKey) -> Path:
    return cache_dir() / f"{key.family}-{key.mode}-b{key.batch}-{key.digest()}.json"


def timing_table(config, family: str, widths: BlockWidths, head_dim: int, dtype: torch.dtype, device: torch.device,
                 mode: str, batch: int, seq_len: int, path: Path | None = None, progress: bool = True) -> TimingTable:
    """The cached table for this key (in `path`, or the cache directory), timed and saved if there is none."""
    key = timing_key(config, family, dtype, device, mode, batch, seq_len, widths, head_dim)
    file = Path(path) if path else cache_file_for(key)
    table = None
    if file.is_file() and path:
        table = TimingTable.load(file)  # the user's file: unreadable or damaged is an error
    elif file.is_file():
        data = _read_json(file)
        if not isinstance(data, dict) or data.get("format") != TIMING_FORMAT:
            log.info("timing table %s is unreadable or from an older llm-bip: timing again", file)  # our own cache
        else:
            table = TimingTable.from_json(data, str(file))
    if table is not None:
        if table.key == key:
            log.info("timing table %s (cached)", file)
            table.cache_file = None if path else file
            return table
        if path:
            raise LlmBipError(f"the timing table {file} was measured for another model, device or setting "
                              f"({_difference(table.key, key)}): give another --timing-table path")
    log.info("timing %s at batch %d on %s (%d shapes; cached in %s)", mode, batch, key.device, len(grid(widths)), file)
    table = measure(config, family, widths, head_dim, dtype, device, mode, batch, seq_len, progress=progress)
    table.save(file)
    table.cache_file = None if path else file
    return table


def _read_json(file: Path):
    """The file's JSON, or None where it cannot be read or parsed."""
    try:
        return json.loads(file.read_text())
    except (OSError, ValueError):
        return None


def _difference(a: TimingKey, b: TimingKey) -> str:
    da, db = asdict(a), asdict(b)
    return ", ".join(f"{k}: {da[k]} vs {db[k]}" for k in da if da[k] != db[k])
