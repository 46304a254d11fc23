"""Training-free repair of the block output that a cut changes: compensators the block loop plugs in.

Each block, the loop gathers the statistics a compensator asks for (`stats_request`), selects what to
keep, calls `compensate` on the still uncut block, and cuts. A compensator changes only the weights and
biases of the kept inputs of o_proj / down_proj, so the cut that follows keeps exactly what it wrote.

- `none`: the cut alone;
- `bias` (FLAP): the removed inputs' mean contribution W[:, removed] · mean(x[removed]) goes into the
  output bias, so the block output keeps its mean;
- `refit`: o_proj / down_proj re-solved on the kept inputs to reproduce the block's own output on the
  current inputs, in closed form from the calibration Gram matrix (ridge-damped), guarded: a refit the
  data cannot determine, or one that does worse than the plain cut on the calibration tokens, is not
  kept (logged, and recorded per block);
- `refit` towards the dense model (`two_stream.DenseTargetRefit`): the same, matching the dense
  model's block outputs instead.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch import nn

from llm_bip.activations import BlockInputs, full_precision
from llm_bip.adapters import FamilyAdapter
from llm_bip.plan import BlockPlan
from llm_bip.scoring.base import BlockGeometry
from llm_bip.stats import BlockStats, StatsRequest
from llm_bip.surgery import head_columns
from llm_bip.widths import BlockWidths

log = logging.getLogger(__name__)


class Compensator:
    """No compensation. Subclasses override what they need."""

    name = "none"
    # Whether it must see the blocks the plan removes (the dense stream of two-stream refit goes through them).
    reads_removed_blocks = False

    def stats_request(self, geometry: BlockGeometry, target: BlockWidths, tokens: int) -> StatsRequest:
        """The statistics it needs to repair a block of `geometry` cut to `target` from `tokens` tokens."""
        return StatsRequest()

    def needs_activations(self, has_table: bool) -> bool:
        """Whether it needs a forward pass (a saved score table keeps the activation means)."""
        return False

    def select(self, adapter: FamilyAdapter, block: nn.Module, stats: BlockStats, plan: BlockPlan, gqa_mode: str) -> BlockPlan:
        """The structures to keep, given the scores' choice `plan` at the target widths: a compensator
        whose repair can rebuild some structures better than others may choose differently."""
        return plan

    def start_block(self, adapter: FamilyAdapter, block: nn.Module, layer: int, inputs: BlockInputs) -> None:
        """Called with the uncut block before its statistics are gathered."""

    def finish_block(self) -> None:
        """Called once the block is cut and its outputs are the next block's inputs."""

    def skip_block(self, adapter: FamilyAdapter, block: nn.Module, layer: int, inputs: BlockInputs) -> None:
        """Called (if `reads_removed_blocks`) with a block the plan removes; `inputs` pass it unchanged."""

    def compensate(self, adapter: FamilyAdapter, block: nn.Module, plan: BlockPlan, stats: BlockStats,
                   inputs: BlockInputs) -> dict:
        """Repair the uncut block for `plan`; returns what was done (for the pruning record)."""
        return {}

    def state(self) -> dict[str, torch.Tensor]:
        """Tensors a resumed run needs to continue exactly (the dense stream of two-stream refit)."""
        return {}

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        pass


def _kept(plan: BlockPlan, adapter: FamilyAdapter) -> tuple[torch.Tensor, torch.Tensor]:
    return head_columns(plan.keep_heads, adapter.head_dim), torch.tensor(plan.keep_channels, dtype=torch.long)


@torch.no_grad()
def add_output_bias(adapter: FamilyAdapter, linear: nn.Linear, delta: torch.Tensor) -> None:
    adapter.zero_bias_like(linear)
    linear.bias += delta.to(linear.bias.dtype).to(linear.bias.device)


def bias_shift(weight: torch.Tensor, mean: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """W[:, removed] · mean(x[removed]): the average output that the removed inputs contributed."""
    removed = torch.ones(weight.shape[1], dtype=torch.bool, device=weight.device)
    removed[keep.to(weight.device)] = False
    with full_precision():
        return weight.float()[:, removed] @ mean.float().to(weight.device)[removed]


class BiasCompensation(Compensator):
    name = "bias"

    def needs_activations(self, has_table: bool) -> bool:
        return not has_table

    def compensate(self, adapter, block, plan, stats, inputs) -> dict:
        parts = adapter.parts(block)
        cols, keep = _kept(plan, adapter)
        done = {}
        for key, linear, mean, kept in (("o_proj", parts.o_proj, stats.attn_mean, cols),
                                        ("down_proj", parts.down_proj, stats.ffn_mean, keep)):
            if len(kept) < linear.in_features:
                add_output_bias(adapter, linear, bias_shift(linear.weight, mean, kept))
                done[key] = "bias"
        return done


_CHUNK = 512  # rows of a Gram matrix handled at a time: bounds the float64 temporaries of a refit


def ridge_solve(system: torch.Tensor, rhs: torch.Tensor, intercept: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Solve `system` · X = `rhs` for the symmetric positive definite (ridge-damped) `system` in float64,
    in place (`system` becomes its Cholesky factor, `rhs` the solution): returns X^T split into weights and
    intercept. On the CPU through LAPACK directly, because torch's solvers copy both matrices into
    column-major order first (+ 240 MB for a TinyLlama down_proj); `rhs` should be column-major."""
    if system.device.type == "cpu":
        from scipy.linalg import lapack

        # A symmetric matrix is its own transpose: the row-major system seen column-major, no copy.
        factor, info = lapack.dpotrf(system.numpy().T, lower=1, overwrite_a=1, clean=0)
        if info:
            raise torch.linalg.LinAlgError("the damped Gram matrix is not positive definite")
        solved, info = lapack.dpotrs(factor, rhs.numpy(), lower=1, overwrite_b=1)
        solution = torch.from_numpy(solved).T
    else:
        _, info = torch.linalg.cholesky_ex(system, out=(system, torch.empty((), dtype=torch.int32, device=system.device)))
        if int(info):
            raise torch.linalg.LinAlgError("the damped Gram matrix is not positive definite")
        solution = torch.cholesky_solve(rhs, system, out=rhs).T
    if intercept:
        return solution[:, :-1].float(), solution[:, -1].float()
    return solution.float(), None


def _damp(system: torch.Tensor, rhs: torch.Tensor, prior: torch.Tensor, damping: float) -> None:
    """Add the ridge D = damping · diag(G) (per input, by its own energy) to the system, and W_prior · D to
    the right-hand side, in place (a chunk of inputs at a time); the intercept (last row, if any beyond
    `prior`) is pulled towards 0."""
    d = damping * torch.diagonal(system).clamp_min(1e-12)
    system.diagonal().add_(d)
    for start in range(0, prior.shape[1], _CHUNK):
        end = min(start + _CHUNK, prior.shape[1])
        rhs[start:end].addcmul_(prior[:, start:end].T.double(), d[start:end, None])


def solve_refit(
    cross: torch.Tensor, gram: torch.Tensor, prior: torch.Tensor, mean: torch.Tensor | None,
    target_mean: torch.Tensor | None, damping: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Ridge least squares for W' (and an intercept b) minimising E_t ||t_t - W' x_t - b||^2.

    Inputs are per-token expectations over the kept inputs x: `cross` = E[t x^T] [out, in], `gram` =
    E[x x^T], `mean` = E[x], `target_mean` = E[t]; `prior` is the weight the ridge pulls towards (the
    original W_S), so nothing moves where the data says nothing. The ridge is scaled per input by its
    own energy (damping · G_ii): massive-activation channels, whose energy is orders of magnitude above
    the rest, neither dominate nor starve the damping of the others. Without `mean` no intercept is fit.
    Normal equations: (G + D) W'^T = E[x t^T] + D W_prior^T, with D = damping · diag(G); float64.
    """
    dim, intercept = gram.shape[0], mean is not None
    system = torch.empty(dim + intercept, dim + intercept, dtype=torch.float64, device=gram.device)
    system[:dim, :dim] = gram
    rhs = torch.empty(cross.shape[0], dim + intercept, dtype=torch.float64, device=gram.device).T  # column-major
    rhs[:dim] = cross.T
    if intercept:
        system[:dim, dim] = system[dim, :dim] = mean
        system[dim, dim] = 1.0
        rhs[dim] = target_mean
    _damp(system, rhs, prior, damping)
    return ridge_solve(system, rhs, intercept)


def output_errors(weight: torch.Tensor, gram_sum: torch.Tensor, tokens: int, mean: torch.Tensor,
                  keep: torch.Tensor, new_weight: torch.Tensor, bias_change: torch.Tensor | None) -> tuple[float, float]:
    """E_t ||W x_t - (W'_S x_S,t + Δb)||^2 over the calibration tokens for the plain cut (W'_S = W_S,
    Δb = 0) and for the refit, from the tokens' Gram matrix (a sum over `tokens`) and mean, a chunk of
    its rows at a time: E ||M x + c||^2 = tr(M G M^T) / n + 2 c·(M mean) + ||c||^2. The matrices are
    float32 (this only decides which of two errors is smaller), the sums float64."""
    refit = weight.detach().float().clone()
    device = refit.device
    removed = torch.ones(refit.shape[1], dtype=torch.bool, device=device)
    removed[keep.to(device)] = False
    plain = refit[:, removed]  # the plain cut's M is W on the removed inputs, zero elsewhere
    refit[:, keep.to(device)] -= new_weight.to(device, torch.float32)  # the refit's M: W - W' (W' zero on removed)
    quadratic_plain = quadratic_refit = 0.0
    for start in range(0, refit.shape[1], _CHUNK):
        rows = gram_sum[start : start + _CHUNK].to(device, torch.float32)  # [chunk, in]
        chunk_removed = removed[start : start + _CHUNK]
        quadratic_refit += float((refit[:, start : start + _CHUNK] * (refit @ rows.T)).double().sum())
        if chunk_removed.any():
            first = int(removed[:start].sum())  # where this chunk's removed inputs start among plain's columns
            block = plain[:, first : first + int(chunk_removed.sum())]
            quadratic_plain += float((block * (plain @ rows[chunk_removed][:, removed].T)).double().sum())
    c = -bias_change.to(device, torch.float64) if bias_change is not None else torch.zeros(refit.shape[0], dtype=torch.float64, device=device)
    mu = mean.to(device, torch.float64)
    plain_error = quadratic_plain / tokens
    refit_error = quadratic_refit / tokens + 2 * float(c @ (refit @ mu.float()).double()) + float(c @ c)
    return max(plain_error, 0.0), max(refit_error, 0.0)


@dataclass
class RefitCompensation(Compensator):
    """Ridge least-squares refit of o_proj (where heads go) and down_proj (where channels go) on the kept
    inputs, towards the layer's own output W x on the current calibration inputs.

    Guards, per projection: fewer calibration tokens than kept inputs leaves the fit undetermined (it
    interpolates the calibration tokens and fails elsewhere), so the plain cut is kept; a refit whose
    output error on the calibration tokens is above the plain cut's (numerical trouble) is not kept.
    `intercept` maps a projection to whether an output bias may be fit with it."""

    attn_damping: float = 1.0
    damping: float = 0.01
    intercept: dict | None = None
    refit_aware: bool = False  # choose what goes by its cost after the refit (scoring/obs.py), not before
    name: str = "refit"

    def __post_init__(self) -> None:
        self._solved: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = {}

    def stats_request(self, geometry: BlockGeometry, target: BlockWidths, tokens: int) -> StatsRequest:
        # A Gram matrix only where a refit can use it: inputs go, and the tokens can determine the fit.
        kept_columns = target.num_heads * geometry.head_dim
        return StatsRequest(ffn_gram=geometry.channels > target.channels > 0 and tokens > target.channels,
                            full_attn_gram=geometry.num_heads > target.num_heads and tokens > kept_columns)

    def needs_activations(self, has_table: bool) -> bool:
        return True

    def _intercept(self, key: str) -> bool:
        return self.intercept is None or self.intercept.get(key, True)

    @torch.no_grad()
    def select(self, adapter, block, stats, plan, gqa_mode) -> BlockPlan:
        """With `refit_aware`: channels (and whole KV groups) removed by their block-output cost after the
        refit of the rest, greedily (optimal brain surgeon); the refit's weights come with the choice."""
        self._solved = {}
        if not self.refit_aware:
            return plan
        from llm_bip.scoring.obs import obs_remove

        parts, widths, n = adapter.parts(block), adapter.widths(block), stats.tokens
        keep_channels, keep_heads, keep_kv = plan.keep_channels, plan.keep_heads, plan.keep_kv_heads
        removed = widths.channels - len(plan.keep_channels)
        if removed and n > len(plan.keep_channels) and stats.ffn_gram is not None:
            mean = stats.ffn_mean if self._intercept("down_proj") else None
            keep_channels, _costs, w, b = obs_remove(parts.down_proj.weight, stats.ffn_gram, n, mean, 1, removed, self.damping)
            self._solved["down_proj"] = (torch.tensor(keep_channels), w, b)
        groups_removed = widths.num_kv_heads - len(plan.keep_kv_heads)
        group_width = widths.group_size * adapter.head_dim
        if (groups_removed and gqa_mode == "kv-groups" and stats.attn_gram is not None and not stats.attn_gram_block
                and n > len(plan.keep_heads) * adapter.head_dim):
            mean = stats.attn_mean if self._intercept("o_proj") else None
            keep_kv, _costs, w, b = obs_remove(parts.o_proj.weight, stats.attn_gram, n, mean, group_width, groups_removed,
                                               self.attn_damping)
            keep_heads = [g * widths.group_size + i for g in keep_kv for i in range(widths.group_size)]
            self._solved["o_proj"] = (head_columns(keep_heads, adapter.head_dim), w, b)
        return BlockPlan(plan.layer, keep_heads, keep_kv, keep_channels)

    @torch.no_grad()
    def compensate(self, adapter, block, plan, stats, inputs) -> dict:
        parts = adapter.parts(block)
        cols, keep = _kept(plan, adapter)
        n = stats.tokens
        done = {}
        for key, linear, kept, gram_field, mean, ridge in (
            ("o_proj", parts.o_proj, cols, "attn_gram", stats.attn_mean, self.attn_damping),
            ("down_proj", parts.down_proj, keep, "ffn_gram", stats.ffn_mean, self.damping),
        ):
            if len(kept) == linear.in_features:
                continue
            if n <= len(kept):
                log.warning("layer %s %s: %d calibration tokens cannot determine a refit of %d inputs; kept the "
                            "plain cut (use more calibration tokens: --num-samples × --seq-len)", plan.layer, key, n,
                            len(kept))
                done[key] = f"plain cut: {n} tokens for {len(kept)} inputs"
                continue
            if getattr(stats, gram_field) is None or (key == "o_proj" and stats.attn_gram_block):
                raise AssertionError(f"a refit of {key} needs the full Gram matrix of its input")
            with_intercept = self._intercept(key)
            if key in self._solved and torch.equal(self._solved[key][0], kept.cpu()):
                _, new, bias = self._solved[key]  # the refit-aware selection solved it on the way
                errors = output_errors(linear.weight, getattr(stats, gram_field), n, mean, kept, new, bias)
            else:
                # _solve takes the Gram matrix over (the largest statistic) and drops it once the system is built.
                new, bias, errors = self._solve(linear.weight.detach(), kept, _take(stats, gram_field), n, mean, ridge,
                                                with_intercept)
            done[key] = self._apply(adapter, linear, kept, new, bias, errors, plan.layer, key, with_intercept)
        self._solved = {}
        return done

    def _solve(self, w, kept, gram_box: list[torch.Tensor], tokens, mean, ridge, with_intercept):
        """The ridge refit of `w`'s kept columns towards its own output t = W x, and the output errors of the
        plain cut and of the refit on the calibration tokens. Float64 temporaries are bounded by a chunk of
        the Gram matrix's rows, and the Gram matrix itself is dropped before the solve: the refit's error
        comes from the normal equations, E||t - W'z||^2 = E||t||^2 - tr(W'C) + Σ_j d_j (W0_j - W'_j)·W'_j,
        with C = E[z t^T] and D the ridge."""
        device = w.device
        kept = kept.to(device)
        dim, out = len(kept), w.shape[0]
        gram_sum = gram_box.pop()
        removed = torch.ones(w.shape[1], dtype=torch.bool, device=device)
        removed[kept] = False
        energy, plain = _energies(w, gram_sum, tokens, removed)
        # The kept rows of the Gram matrix are split into its kept and removed columns (float32) before the
        # float64 system exists, so the Gram matrix, its kept part and the system are never alive together
        # (for TinyLlama's down_proj that lowers the refit's peak from 329 MB to 263 MB).
        kept_kept = torch.empty(dim, dim, dtype=gram_sum.dtype, device=gram_sum.device)
        kept_removed = torch.empty(dim, int(removed.sum()), dtype=gram_sum.dtype, device=gram_sum.device)
        kept_at, removed_at = kept.to(gram_sum.device), removed.to(gram_sum.device)
        for start in range(0, dim, _CHUNK):
            rows = gram_sum[kept_at[start : start + _CHUNK]]
            kept_kept[start : start + len(rows)] = rows[:, kept_at]
            kept_removed[start : start + len(rows)] = rows[:, removed_at]
        del gram_sum, rows  # its last reference
        system = torch.empty(dim + with_intercept, dim + with_intercept, dtype=torch.float64, device=device)
        system[:dim, :dim] = kept_kept
        del kept_kept
        system[:dim, :dim].div_(tokens)  # E[x_S x_S^T]
        kept_removed = kept_removed.to(device, torch.float64).div_(tokens)  # E[x_S x_R^T]
        # rhs = E[x_S t^T] with t = W x = W_S x_S + W_R x_R, a chunk of outputs at a time
        rhs = torch.empty(out, dim + with_intercept, dtype=torch.float64, device=device).T  # column-major (LAPACK)
        for start in range(0, out, _CHUNK):
            chunk = w[start : start + _CHUNK].double()
            rhs[:dim, start : start + len(chunk)] = system[:dim, :dim] @ chunk[:, kept].T + kept_removed @ chunk[:, removed].T
        del kept_removed
        mu = mean.to(device, torch.float64)
        if with_intercept:
            system[:dim, dim] = system[dim, :dim] = mu[kept]
            system[dim, dim] = 1.0
            rhs[dim] = w.double() @ mu
        cross = rhs.T.float()  # C^T = E[t z^T], before the ridge is added (float32: for the error only)
        prior = w[:, kept]
        _damp(system, rhs, prior, ridge)
        damping = torch.diagonal(system).clone()
        try:
            new, bias = ridge_solve(system, rhs, with_intercept)
        except torch.linalg.LinAlgError:
            return None, "its system is not positive definite", (plain, math.inf)
        del rhs
        # d_j = the ridge added to input j (damping · G_jj); recovered as diag(G + D) · damping / (1 + damping)
        d = damping * (ridge / (1 + ridge))
        # The error below holds for a solution of the normal equations W'(H + D) = C^T + W0 D; check that it is
        # one on a few random directions (H + D from its Cholesky factor), so a numerical failure cannot pass.
        probes = torch.randn(system.shape[0], 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        hv = _times_factored(system, probes.to(device))
        del system
        explained = pulled = residual_sq = target_sq = 0.0
        for start in range(0, out, _CHUNK):  # a chunk of outputs at a time: no full-size float64 copies
            end = min(start + _CHUNK, out)
            solved = new[start:end].double()
            prior_chunk = prior[start:end].double()
            if bias is not None:
                solved = torch.cat([solved, bias[start:end, None].double()], 1)
                prior_chunk = torch.cat([prior_chunk, torch.zeros(end - start, 1, dtype=torch.float64, device=device)], 1)
            c = cross[start:end].double()
            explained += float((solved * c).sum())
            pulled += float(((prior_chunk - solved) * solved * d).sum())
            target = c @ probes.to(device) + (prior_chunk * d) @ probes.to(device)
            residual_sq += float(((solved @ hv - target) ** 2).sum())
            target_sq += float((target**2).sum())
        residual = (residual_sq / max(target_sq, 1e-300)) ** 0.5
        if not residual < 1e-4:
            return None, f"it does not solve its normal equations (relative residual {residual:.2g})", (plain, math.inf)
        return new, bias, (plain, max(energy - explained + pulled, 0.0))

    def _apply(self, adapter, linear, kept, new, bias, errors, layer, key, with_intercept) -> str:
        """Write the refit into the kept columns (and the bias), unless it failed, is not finite, or does
        worse than the plain cut on the calibration tokens."""
        if new is None:  # `bias` says why
            log.warning("layer %s %s: the refit failed (%s); kept the plain cut", layer, key, bias)
            return f"plain cut: the refit failed ({bias})"
        w = linear.weight.detach()
        kept = kept.to(w.device)
        if not torch.isfinite(new).all() or (bias is not None and not torch.isfinite(bias).all()):
            log.warning("layer %s %s: the refit is not finite; kept the plain cut", layer, key)
            return "plain cut: refit not finite"
        plain, refit = errors
        if not refit < plain:
            log.warning("layer %s %s: the refit's calibration error (%.4g) is not below the plain cut's (%.4g); kept "
                        "the plain cut", layer, key, refit, plain)
            return f"plain cut: refit error {refit:.4g} >= {plain:.4g}"
        full = w.clone()
        full[:, kept] = new.to(full.dtype)
        linear.weight.copy_(full)
        if bias is not None:
            add_output_bias(adapter, linear, bias)
        return "refit" + ("" if with_intercept else " (no intercept)")


def _times_factored(factor: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(H + D) v from the Cholesky factor L that `ridge_solve` left in `factor` (H + D = L L^T), without
    copying it."""
    if factor.device.type == "cpu":
        from scipy.linalg import blas

        lower = factor.numpy().T  # where LAPACK left L (see ridge_solve)
        return torch.from_numpy(blas.dtrmm(1.0, lower, blas.dtrmm(1.0, lower, v.numpy(), lower=1, trans_a=1),
                                           lower=1, trans_a=0))
    lower = torch.tril(factor)
    return lower @ (lower.T @ v)


def _take(stats: BlockStats, field: str) -> list[torch.Tensor]:
    """Hand a statistic over to its one consumer: the stats no longer hold it, and the consumer can free
    it mid-way by emptying the returned list."""
    box = [getattr(stats, field)]
    setattr(stats, field, None)
    return box


def _energies(w: torch.Tensor, gram_sum: torch.Tensor, tokens: int, removed: torch.Tensor) -> tuple[float, float]:
    """E||W x||^2 and the plain cut's error E||W_R x_R||^2 (R the removed inputs), a chunk of output rows
    at a time (no copy of W or of the Gram matrix)."""
    gram_removed = gram_sum[:, removed][removed].to(w.device, torch.float32)
    energy = plain = 0.0
    for start in range(0, w.shape[0], _CHUNK):
        chunk = w[start : start + _CHUNK].float()
        energy += float((chunk * (chunk @ gram_sum.to(w.device, torch.float32))).double().sum())
        chunk_removed = chunk[:, removed]
        plain += float((chunk_removed * (chunk_removed @ gram_removed)).double().sum())
    return energy / tokens, plain / tokens


COMPENSATIONS = ("none", "bias", "refit")
