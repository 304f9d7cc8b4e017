"""Running top-N per row, merged batch by batch with one torch.topk (no per-row Python loops).

Each row (one latent) keeps its N best scores and, beside them, integer payloads (context index, token position).
A merge concatenates the kept entries with a batch of candidates [rows, C] and keeps the N best of the union:

    kept [L, N] ++ candidates [L, C]  --topk(N)-->  kept [L, N]

Rows where no candidate beats the row's current N-th score are left alone (the common case once the lists fill),
so a merge costs O(rows touched * (N + C)). Memory is O(L * N) plus one batch of candidates.
Empty slots hold score -inf and payload -1.

`merge_sparse` takes candidates as (row, value, payload) triples, the natural form for SAE codes (each context
activates few latents): it keeps each row's N best triples (one sort) and merges an [L, N] block, so the cost no
longer grows with the number of contexts per merge.
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
        self._merge_rows(rows, values[rows], {name: (p.to(self.values.device).long().expand(self.n_rows, c)[rows]
                                                     if p.dim() == 1 else p[rows].long())
                                              for name, p in payload.items()})

    def _merge_rows(self, rows: Tensor, values: Tensor, payload: dict[str, Tensor]) -> None:
        """Merge candidate blocks values/payload [R, C] into the given rows (distinct)."""
        top, idx = torch.cat([self.values[rows], values], dim=1).topk(self.n, dim=1, sorted=True)
        self.values[rows] = top
        empty = top == float("-inf")  # an empty slot's payload says so
        for name, kept in self.payload.items():
            merged = torch.cat([kept[rows], payload[name]], dim=1).gather(1, idx)
            kept[rows] = merged.masked_fill_(empty, -1)

    def merge_sparse(self, row: Tensor, value: Tensor, payload: dict[str, Tensor]) -> None:
        """Candidates as triples: row [P] (long), value [P], payload[name] [P]."""
        value = value.to(self.values.dtype)
        better = (value > self.values[row, -1]).nonzero().squeeze(1)  # cannot enter: dropped before sorting
        if better.numel() == 0:
            return
        row, value = row[better], value[better]
        order = value.argsort(descending=True, stable=True)
        order = order[row[order].argsort(stable=True)]  # grouped by row, best first within a row
        r = row[order]
        first = torch.searchsorted(r, r, right=False)  # index of the row's first entry
        rank = torch.arange(r.numel(), device=r.device) - first
        keep = rank < self.n
        order, r, rank = order[keep], r[keep], rank[keep]
        rows, slot = torch.unique_consecutive(r, return_inverse=True)
        dense = torch.full((rows.numel(), self.n), float("-inf"), device=self.values.device)
        dense[slot, rank] = value[order]
        dense_p = {}
        for name in self.payload:
            d = torch.full((rows.numel(), self.n), -1, dtype=torch.long, device=self.values.device)
            d[slot, rank] = payload[name][better][order].long()
            dense_p[name] = d
        self._merge_rows(rows, dense, dense_p)
