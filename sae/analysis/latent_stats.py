"""Per-latent statistics accumulated while streaming: firing count, max / mean activation, an exact histogram,
and the tokens a latent's decoder direction promotes and suppresses (logit lens).

Histogram without knowing the range in advance: latent l's bins split [0, 2^e_l) into B equal bins, where 2^e_l is
the smallest power of two above every value seen so far. When a larger value arrives, e_l grows and bin pairs are
merged (bin j of the wider range = bins 2j, 2j+1 of the narrower one). Dividing by a power of two is exact in
floating point, so the result equals a histogram computed at the end with the final edges.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

UNSET = -(2**20)  # exponent of a latent that has not fired yet


class LatentStats:
    def __init__(self, n_latents: int, bins: int = 64, device: str | torch.device = "cpu"):
        if bins < 2 or bins & (bins - 1):
            raise ValueError(f"histogram bins must be a power of two >= 2, got {bins}")
        self.n_latents, self.bins = n_latents, bins
        self.n_tokens = 0
        self.fire_count = torch.zeros(n_latents, dtype=torch.long, device=device)
        self.act_sum = torch.zeros(n_latents, dtype=torch.float64, device=device)
        self.max_act = torch.zeros(n_latents, device=device)
        self.hist = torch.zeros(n_latents, bins, dtype=torch.long, device=device)
        self.exp = torch.full((n_latents,), UNSET, dtype=torch.long, device=device)

    def update(self, top_acts: Tensor, top_indices: Tensor, n_tokens: int) -> None:
        """top_acts/top_indices [T, k] of the tokens counted (zero acts = inactive slots); n_tokens = T."""
        self.n_tokens += n_tokens
        fired = top_acts > 0
        idx, acts = top_indices[fired].long(), top_acts[fired].float()
        if idx.numel() == 0:
            return
        self.fire_count.index_add_(0, idx, torch.ones_like(idx))
        self.act_sum.index_add_(0, idx, acts.double())
        self.max_act.scatter_reduce_(0, idx, acts, reduce="amax")
        self._grow_ranges(self.max_act)
        scale = torch.ldexp(torch.ones_like(acts), -self.exp[idx])  # 1 / 2^e, exact
        b = (acts * scale * self.bins).floor().long().clamp_(0, self.bins - 1)
        self.hist.view(-1).index_add_(0, idx * self.bins + b, torch.ones_like(b))

    def _grow_ranges(self, max_act: Tensor) -> None:
        _, e = torch.frexp(max_act)  # max = m * 2^e with 0.5 <= m < 1, so max < 2^e
        need = torch.where(max_act > 0, e.long(), torch.full_like(self.exp, UNSET))
        shift = torch.where(self.exp == UNSET, torch.zeros_like(need), (need - self.exp).clamp(min=0))
        self.exp = torch.maximum(self.exp, need)
        max_shift = int(shift.max()) if shift.numel() else 0
        half = self.bins // 2
        for t in range(1, min(max_shift, self.bins.bit_length() - 1) + 1):  # one bin-pair merge per doubling
            rows = (shift >= t).nonzero().squeeze(1)
            merged = self.hist[rows].view(-1, half, 2).sum(-1)
            self.hist[rows] = torch.cat([merged, torch.zeros_like(merged)], dim=1)
        # (after log2(B) doublings every count sits in bin 0 and further merges change nothing)

    def hist_hi(self) -> Tensor:
        """Upper edge of each latent's histogram (0 for latents that never fired)."""
        hi = torch.ldexp(torch.ones(self.n_latents, device=self.exp.device), self.exp.clamp(min=-1000))
        return torch.where(self.exp == UNSET, torch.zeros_like(hi), hi)

    def mean_act(self) -> Tensor:
        return (self.act_sum / self.fire_count.clamp(min=1)).float()

    def freq(self) -> Tensor:
        return self.fire_count.double() / max(self.n_tokens, 1)


class LogitLens(NamedTuple):
    promoted_ids: Tensor  # [L, P] descending
    promoted_logits: Tensor
    suppressed_ids: Tensor  # [L, P] ascending (most suppressed first)
    suppressed_logits: Tensor


@torch.no_grad()
def logit_lens(W_dec: Tensor, norm_weight: Tensor, W_out: Tensor, n_tokens: int = 20, chunk: int = 1024) -> LogitLens:
    """Tokens each decoder row promotes / suppresses: (W_dec[l] * norm.weight) @ output.weight.T, top / bottom P."""
    p = min(n_tokens, W_out.shape[0])
    outs: list[tuple[Tensor, Tensor, Tensor, Tensor]] = []
    w_out = W_out.float()
    for i in range(0, W_dec.shape[0], chunk):
        logits = (W_dec[i:i + chunk].float() * norm_weight.float()) @ w_out.T
        top = logits.topk(p, dim=1)
        bot = logits.topk(p, dim=1, largest=False)
        outs.append((top.indices, top.values, bot.indices, bot.values))
    return LogitLens(*(torch.cat([o[j] for o in outs]) for j in range(4)))
