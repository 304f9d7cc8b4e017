"""SAE losses and metrics as pure functions: one definition each (DESIGN.md section 4).

`reduce` turns a local sum into a global one under DDP (all-reduce SUM); identity on one process. With it, each
rank's loss is (local numerator) / (global denominator), so the SUM of the ranks' gradients is exactly the
gradient of the global-batch loss.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import Tensor

Reduce = Callable[[Tensor], Tensor]


def identity(t: Tensor) -> Tensor:
    return t


def total_variance(x: Tensor, reduce: Reduce = identity) -> Tensor:
    """sum_b ||x_b - mean(x)||^2 over the (global) batch; no gradient."""
    with torch.no_grad():
        x = x.float()
        stats = reduce(torch.cat([x.sum(0), x.new_full((1,), x.shape[0])]))  # new_full: no host-to-device copy
        mean = stats[:-1] / stats[-1]
        return reduce((x - mean).pow(2).sum())


def fvu(x: Tensor, x_hat: Tensor, reduce: Reduce = identity) -> Tensor:
    """Fraction of variance unexplained: sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 (differentiable in x_hat)."""
    return (x.float() - x_hat.float()).pow(2).sum() / total_variance(x, reduce).clamp_min(1e-12)


def auxk_loss(e: Tensor, e_hat: Tensor, reduce: Reduce = identity) -> Tensor:
    """AuxK: how well the dead latents' decoding (no b_dec) explains the detached residual e = x - x_hat,
    normalised by the residual's variance (OpenAI 2024, eq. 3)."""
    return fvu(e.detach(), e_hat, reduce)


def auxk_select(pre_acts: Tensor, dead_mask: Tensor, k_aux: int) -> tuple[Tensor, Tensor]:
    """Top-min(k_aux, n_dead) pre-activations among DEAD latents only (live ones masked to -inf), ReLU'd."""
    n_dead = int(dead_mask.sum())
    kk = min(k_aux, n_dead)
    masked = pre_acts.masked_fill(~dead_mask, float("-inf"))
    vals, idx = masked.topk(kk, dim=-1, sorted=False)
    return torch.relu(vals), idx


def mean_l0(top_acts: Tensor) -> Tensor:
    """Mean number of non-zero latents per token, as a 0-d tensor on top_acts' device (no host sync)."""
    return (top_acts > 0).sum(-1).float().mean()


def l0(top_acts: Tensor) -> float:
    """Mean number of non-zero latents per token."""
    return float(mean_l0(top_acts))


class Usage(NamedTuple):
    dead_fraction: float
    dense_fraction: float


def usage(fire_counts: Tensor, n_tokens: int, dense_threshold: float = 0.1) -> Usage:
    """Dead = never fired in these n_tokens; dense = fired on more than `dense_threshold` of them."""
    n = fire_counts.numel()
    dead = float((fire_counts == 0).sum()) / n
    dense = float((fire_counts > dense_threshold * max(n_tokens, 1)).sum()) / n
    return Usage(dead, dense)


def fire_counts(top_acts: Tensor, top_indices: Tensor, n_latents: int) -> Tensor:
    """How many tokens each latent fired on (value > 0) in this batch: [n_latents] int64. A scatter-add of 0/1
    (integer adds: deterministic), not boolean indexing + bincount, which read sizes back to the host."""
    fired = (top_acts > 0).flatten().long()
    return fired.new_zeros(n_latents).scatter_add_(0, top_indices.flatten().long(), fired)


def ce_loss_recovered(ce_clean: float, ce_sae: float, ce_ablated: float) -> float:
    """(CE_ablated - CE_sae) / (CE_ablated - CE_clean): 1 = SAE as good as the real activations, 0 = as bad as
    ablating them."""
    return (ce_ablated - ce_sae) / (ce_ablated - ce_clean) if ce_ablated != ce_clean else float("nan")
