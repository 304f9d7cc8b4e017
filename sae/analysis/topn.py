"""Running top-N per row, merged batch by batch with one torch.topk (no per-row Python loops).

Each row (one latent) keeps its N best scores and, beside them, integer payloads (context index, token position).
A merge concatenates the kept entries with a batch of candidates [rows, C] and keeps the N best of the union:

    kept [L, N] ++ candidates [L, C]  --topk(N)-->  kept [L, N]

Rows where no candidate beats the row's current N-th score are left alone (the common case once the lists fill),
so a merge costs O(rows touched * (N + C)). Memory is O(L * N) plus one batch of candidates.
Empty slots hold score -inf and payload -1.
"""
from __future__ import annotations

import torch
from torch import Tensor


class RunningTopN:
    def __init__(self, n_rows: int, n: int, payload_names: tuple[str, ...] = (), device: str | torch.device = "cpu"):
        self.n = n
        self.values = torch.full((n_rows, n), float("-inf"), device=device)
        self.payload = {name: torch.full((n_rows, n), -1, dtype=torch.long, device=device) for name in payload_names}

    @property
    def n_rows(self) -> int:
        return self.values.shape[0]

    def merge(self, values: Tensor, payload: dict[str, Tensor]) -> None:
        """values [L, C] (use -inf for "no candidate"); payload[name] [L, C] or [C] (same for every row)."""
        if values.shape[0] != self.n_rows:
            raise ValueError(f"expected {self.n_rows} rows of candidates, got {values.shape[0]}")
        c = values.shape[1]
        if c == 0:
            return
        values = values.to(self.values.dtype)
        rows = (values > self.values[:, -1:]).any(dim=1).nonzero().squeeze(1)
        if rows.numel() == 0:
            return
        cand = values[rows]
        merged = torch.cat([self.values[rows], cand], dim=1)
        top, idx = merged.topk(self.n, dim=1, sorted=True)
        self.values[rows] = top
        for name, kept in self.payload.items():
            p = payload[name].to(device=kept.device, dtype=torch.long)
            p = p.expand(self.n_rows, c)[rows] if p.dim() == 1 else p[rows]
            kept[rows] = torch.cat([kept[rows], p], dim=1).gather(1, idx)
        # a slot whose score is -inf is empty: its payload must say so
        empty = self.values[rows] == float("-inf")
        if empty.any():
            for kept in self.payload.values():
                sub = kept[rows]
                sub[empty] = -1
                kept[rows] = sub
