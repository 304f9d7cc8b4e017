"""BatchTopK selection over the GLOBAL batch: under DDP, 2 ranks keep exactly the latents 1 process would.

BatchTopK keeps the K = k * B_global largest ReLU'd pre-activations of the whole batch (not k per token). With
the batch split over ranks, a rank may own up to K of them, so each rank sends its local top-K values (one
all-gather of K floats per rank; K does not grow with the ranks: B_global is the global batch), and every rank
takes the K-th largest of the union, tau, the same number everywhere:

    keep (b, i)  iff  relu(pre[b, i]) >= tau  and  pre[b, i] > 0

The inference threshold is an EMA of the smallest kept positive value. That value is in the gathered candidates
too (if fewer than K values are positive, each rank's candidates hold all of its positives), so every rank
updates the same EMA from the same numbers: the thresholds never drift apart, with no extra collective.
Everything stays on the device (no host sync).
"""
from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor


class Gather(Protocol):
    """Every rank's tensor concatenated along dim 0 (`sae.dist.all_gather`); `world_size` pieces."""
    world_size: int

    def __call__(self, t: Tensor) -> Tensor: ...


class LocalGather:
    """One process: the gather of `t` is `t`."""
    world_size = 1

    def __call__(self, t: Tensor) -> Tensor:
        return t


LOCAL = LocalGather()


def batch_topk(pre: Tensor, k: int, gather: Gather = LOCAL) -> tuple[Tensor, Tensor]:
    """pre [B, n] (this rank's rows) -> (z [B, n] dense code: the kept ReLU'd values, zeros elsewhere;
    smallest kept positive value over the global batch, a 0-dim tensor, +inf when nothing is positive)."""
    flat = torch.relu(pre).flatten()  # [B * n]
    K = k * pre.shape[0] * gather.world_size  # k * B_global
    with torch.no_grad():
        local = flat.detach().topk(min(K, flat.numel()), sorted=False).values  # no rank owns more than K
        cand = gather(local)  # [world * K'] the union of the ranks' candidates
        top = cand.topk(min(K, cand.numel()), sorted=False).values  # the global top K
        tau = top.min()
        smallest = torch.where(top > 0, top, torch.full_like(top, float("inf"))).min()
    keep = (flat >= tau) & (flat > 0)
    return torch.where(keep, flat, torch.zeros_like(flat)).view_as(pre), smallest


@torch.no_grad()
def update_threshold(threshold: Tensor, smallest: Tensor, rate: float = 0.05) -> None:
    """threshold <- EMA of the smallest kept value (its first value is taken as is); unchanged when nothing
    fired (smallest = inf). In place, on the device."""
    t = smallest.to(threshold.dtype).expand_as(threshold)
    w = torch.where(threshold.any(), torch.full_like(threshold, rate), torch.ones_like(threshold))
    threshold.copy_(torch.where(torch.isfinite(t), threshold.lerp(t, w), threshold))
