"""A pruning plan as data: which heads, KV groups and FFN channels each block keeps, and which blocks go.

Plans print, save to JSON, load and diff; `api.apply_plan` carries one out. Allocators decide *how
many* of each structure a block keeps (`BlockWidths`); `select` decides *which*, from scores. A plan
has one `BlockPlan` per block of the model it was made for, by its layer index there; a removed block
(depth pruning, `depth.py`) is marked `removed` and keeps nothing. A plan carries the fingerprint of
the model it was made for, and applying it to another model is refused. Format /2 added `removed`;
/1 plans (no block removed) still load.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from llm_bip.errors import LlmBipError
from llm_bip.widths import BlockWidths

GQA_MODES = ("kv-groups", "query-heads")
PLAN_FORMAT = "llm-bip-plan/2"
READABLE_PLAN_FORMATS = ("llm-bip-plan/1", PLAN_FORMAT)  # /1: no `removed`


@dataclass
class BlockPlan:
    layer: int
    keep_heads: list[int]  # query heads, sorted; grouped so that each kept KV group keeps the same count
    keep_kv_heads: list[int]
    keep_channels: list[int]
    removed: bool = False  # the whole block goes (it then keeps nothing)

    @property
    def widths(self) -> BlockWidths:
        return BlockWidths(len(self.keep_heads), len(self.keep_kv_heads), len(self.keep_channels))

    @classmethod
    def keep_all(cls, layer: int, widths: BlockWidths) -> BlockPlan:
        return cls(layer, list(range(widths.num_heads)), list(range(widths.num_kv_heads)), list(range(widths.channels)))

    @classmethod
    def remove(cls, layer: int) -> BlockPlan:
        return cls(layer, [], [], [], removed=True)


@dataclass
class PruningPlan:
    blocks: list[BlockPlan]
    meta: dict = field(default_factory=dict)
    fingerprint: str = ""  # of the model the plan was made for

    @property
    def removed_layers(self) -> list[int]:
        """Layers (of the model the plan was made for) whose whole block the plan removes."""
        return [b.layer for b in self.blocks if b.removed]

    def to_json(self) -> dict:
        return {"format": PLAN_FORMAT, "fingerprint": self.fingerprint, "meta": self.meta,
                "removed_layers": self.removed_layers, "blocks": [asdict(b) for b in self.blocks]}

    @classmethod
    def from_json(cls, data: dict, where: str = "plan") -> PruningPlan:
        if data.get("format") not in READABLE_PLAN_FORMATS:
            raise LlmBipError(f"{where} is not an {PLAN_FORMAT} file (format {data.get('format')!r}; plans from "
                              "older versions carry no model fingerprint): make it again with `llm-bip plan`")
        blocks = [BlockPlan(**b) for b in data["blocks"]]
        if any(b.removed and (b.keep_heads or b.keep_kv_heads or b.keep_channels) for b in blocks):
            raise LlmBipError(f"{where} marks a block removed that keeps structures: make it again with `llm-bip plan`")
        return cls(blocks=blocks, meta=data.get("meta", {}), fingerprint=data.get("fingerprint", ""))

    def save(self, path: str | Path) -> None:
        from llm_bip.outputs import write_text_atomic

        write_text_atomic(Path(path), json.dumps(self.to_json(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> PruningPlan:
        try:
            data = json.loads(Path(path).read_text())
            return cls.from_json(data, where=str(path))
        except FileNotFoundError:
            raise LlmBipError(f"plan file {path} does not exist: make one with `llm-bip plan`") from None
        except (OSError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
            raise LlmBipError(f"cannot read plan {path} ({type(exc).__name__}: {exc}): make it again with `llm-bip plan`") from None

    def check_model(self, fingerprint: str, where: str = "the plan") -> None:
        if self.fingerprint != fingerprint:
            raise LlmBipError(f"{where} was made for another model (fingerprint {self.fingerprint or 'none'}, this "
                              f"model {fingerprint}): make a plan for this model with `llm-bip plan` or `llm-bip prune`")

    def summary(self) -> str:
        rows = [f"{'layer':>5} {'heads':>5} {'kv':>3} {'channels':>8}"]
        rows += [f"{b.layer:>5} {'removed':>18}" if b.removed else
                 f"{b.layer:>5} {len(b.keep_heads):>5} {len(b.keep_kv_heads):>3} {len(b.keep_channels):>8}"
                 for b in self.blocks]
        removed = self.removed_layers
        if removed:
            rows.append(f"removed blocks: {', '.join(map(str, removed))} ({len(removed)} of {len(self.blocks)})")
        return "\n".join(rows)


def select(
    heads: torch.Tensor,
    groups: torch.Tensor,
    channels: torch.Tensor,
    widths: BlockWidths,
    gqa_mode: str,
    layer: int,
) -> BlockPlan:
    """The most important structures of one block at the given widths."""
    num_heads, num_kv = heads.numel(), groups.numel()
    group_size = num_heads // num_kv
    if gqa_mode == "kv-groups":
        kept_groups = _top(groups, widths.num_kv_heads)
        kept_heads = [g * group_size + i for g in kept_groups for i in range(group_size)]
    elif gqa_mode == "query-heads":
        per_group = widths.num_heads // num_kv
        kept_groups = list(range(num_kv))
        kept_heads = []
        for g in kept_groups:
            local = _top(heads[g * group_size : (g + 1) * group_size], per_group)
            kept_heads += [g * group_size + i for i in local]
    else:
        raise LlmBipError(f"unknown GQA mode '{gqa_mode}': use one of {', '.join(GQA_MODES)}")
    return BlockPlan(layer=layer, keep_heads=kept_heads, keep_kv_heads=kept_groups,
                     keep_channels=_top(channels, widths.channels))


def _top(scores: torch.Tensor, k: int) -> list[int]:
    # Stable order: ties broken by index, so plans are deterministic.
    order = sorted(range(scores.numel()), key=lambda i: (-float(scores[i]), i))
    return sorted(order[:k])
