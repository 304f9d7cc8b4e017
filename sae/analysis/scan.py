"""Pass 1 of top contexts: one stream over the activations, for EVERY latent at once.

For each complete context (a run of rows with one doc id and context index) and each latent that fired in it
(the distinct (context, latent) keys of the sparse code, never a dense [contexts, L] block), three scores:
    max  = max over the context's tokens of the latent's activation (and the argmax token position)
    mean = sum over tokens / number of (non-BOS) tokens
    last = activation at the last token
and the (context, latent) pairs that fired are merged into running top-N lists (`RunningTopN.merge_sparse`). Every context competes for every latent, so a sentence is
credited to all the latents it activates (the earlier project credited each sentence only to its single top
latent, and 90% of latents never got an example).
"""
from __future__ import annotations

from typing import Any, Iterable, NamedTuple

import numpy as np
import torch
from torch import Tensor

from llama.cli import progress_bar
from sae.analysis.latent_stats import LatentStats
from sae.analysis.sources import Chunk
from sae.analysis.topn import RunningTopN

AGGREGATIONS = ("max", "mean", "last")
NO_POS = 2**62


class ScanResult(NamedTuple):
    tops: dict[str, RunningTopN]  # agg -> lists with payload "ctx" (global context id) and "pos"
    stats: LatentStats
    ctx_row0: np.ndarray  # [n_contexts_seen] first row of each context
    ctx_len: np.ndarray
    ctx_doc: np.ndarray
    ctx_sub: np.ndarray  # the store's context index within the document
    random_ctx: np.ndarray  # [R] global context ids of the random sample
    random_fired: dict[int, tuple[np.ndarray, np.ndarray]]  # ctx id -> (latents active in it, their max act)


def _boundaries(c: Chunk) -> np.ndarray:
    """Start index of every context in the chunk (doc id or context index changes, or rows are not consecutive)."""
    new = np.ones(len(c.doc_id), dtype=bool)
    new[1:] = (c.doc_id[1:] != c.doc_id[:-1]) | (c.ctx[1:] != c.ctx[:-1]) | (c.row[1:] != c.row[:-1] + 1)
    return np.flatnonzero(new)


def _cat(a: Chunk, b: Chunk) -> Chunk:
    return Chunk(torch.cat([a.x, b.x]), *(np.concatenate([u, v]) for u, v in zip(a[1:], b[1:])))


def _slice(c: Chunk, i0: int, i1: int) -> Chunk:
    return Chunk(*(t[i0:i1] for t in c))


class Scanner:
    def __init__(self, sae: Any, n_latents: int, n: int = 50, hist_bins: int = 64, n_random: int = 500,
                 bos_id: int | None = None, seed: int = 0,
                 device: str | torch.device = "cpu"):
        self.sae, self.L, self.bos_id, self.device = sae, n_latents, bos_id, device
        self.tops = {a: RunningTopN(n_latents, n, ("ctx", "pos"), device) for a in AGGREGATIONS}
        self.stats = LatentStats(n_latents, hist_bins, device)
        self.reservoir = RunningTopN(1, max(n_random, 1), ("ctx",), device)
        self.n_random = n_random
        self.random_fired: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self.gen = torch.Generator().manual_seed(seed)
        self.table: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
        self.n_ctx = 0

    def run(self, chunks: Iterable[Chunk], total_rows: int | None = None, progress: bool = True) -> ScanResult:
        carry: Chunk | None = None
        bar = progress_bar(total=total_rows, unit="tok", desc="top contexts", disable=not progress, mininterval=1.0)
        for chunk in chunks:
            bar.update(len(chunk.token_id))
            carry = self._process(_cat(carry, chunk) if carry is not None else chunk, final=False)
        if carry is not None and len(carry.token_id):
            self._process(carry, final=True)
        bar.close()
        row0, ln, doc, sub = (np.concatenate([t[j] for t in self.table]) if self.table
                              else np.zeros(0, np.int64) for j in range(4))
        kept = self.reservoir.payload["ctx"][0]
        kept = kept[kept >= 0].cpu().numpy()
        fired = {int(c): self.random_fired[int(c)] for c in kept}
        return ScanResult(self.tops, self.stats, row0, ln, doc, sub, kept, fired)

    @torch.no_grad()
    def _process(self, c: Chunk, final: bool) -> Chunk | None:
        starts = _boundaries(c)
        cut = len(c.token_id) if final else int(starts[-1])
        if cut == 0:
            return c  # one context still open: wait for more rows
        done, rest = _slice(c, 0, cut), _slice(c, cut, len(c.token_id))
        starts = starts[starts < cut]
        ends = np.append(starts[1:], cut)
        n_ctx = len(starts)
        ids = np.arange(self.n_ctx, self.n_ctx + n_ctx, dtype=np.int64)
        self.table.append((done.row[starts], ends - starts, done.doc_id[starts], done.ctx[starts]))
        self.n_ctx += n_ctx

        enc = self.sae.encode(done.x.to(self.device))
        acts, idx = enc[0].float(), enc[1].long()
        valid = torch.ones(cut, dtype=torch.bool, device=self.device)
        if self.bos_id is not None:
            valid = torch.from_numpy(done.token_id != self.bos_id).to(self.device)
            acts = acts * valid[:, None]
        self.stats.update(acts[valid], idx[valid], int(valid.sum()))

        tctx = torch.from_numpy(np.repeat(np.arange(n_ctx), ends - starts)).to(self.device)
        tpos = torch.arange(cut, device=self.device) - torch.from_numpy(starts).to(self.device)[tctx]
        self._contexts(acts, idx, tctx, tpos, valid, torch.from_numpy(ids).to(self.device),
                       torch.from_numpy(ends - starts - 1).to(self.device))
        return rest if len(rest.token_id) else None

    def _contexts(self, acts: Tensor, idx: Tensor, tctx: Tensor, tpos: Tensor, valid: Tensor, gid: Tensor,
                  last: Tensor) -> None:
        """Per (context, latent) pair that fired: max (+ argmax position), mean and last-token scores, merged."""
        L, k = self.L, acts.shape[1]
        a = acts.reshape(-1)
        fired = a > 0
        a = a[fired]
        key = (tctx[:, None] * L + idx).reshape(-1)[fired]
        tp = tpos[:, None].expand(-1, k).reshape(-1)[fired]
        at_last = (tpos == last[tctx])[:, None].expand(-1, k).reshape(-1)[fired]
        uk, inv = torch.unique(key, return_inverse=True)  # the (context, latent) pairs, sorted by context
        m = uk.numel()
        maxv = torch.zeros(m, device=a.device).scatter_reduce_(0, inv, a, reduce="amax")
        is_max = a == maxv[inv]
        posv = torch.full((m,), NO_POS, dtype=torch.long, device=a.device)
        posv.scatter_reduce_(0, inv[is_max], tp[is_max], reduce="amin")
        sumv = torch.zeros(m, device=a.device).index_add_(0, inv, a)
        n_valid = torch.zeros(gid.numel(), device=a.device).index_add_(0, tctx, valid.float()).clamp(min=1)
        lat, c = uk % L, uk // L
        self.tops["max"].merge_sparse(lat, maxv, {"ctx": gid[c], "pos": posv})
        self.tops["mean"].merge_sparse(lat, sumv / n_valid[c], {"ctx": gid[c], "pos": posv})
        li = inv[at_last]
        self.tops["last"].merge_sparse(lat[li], a[at_last], {"ctx": gid[c[li]], "pos": last[c[li]]})
        if self.n_random > 0:
            self._sample(c, lat, maxv, gid)

    def _sample(self, c: Tensor, lat: Tensor, maxv: Tensor, gid: Tensor) -> None:
        """Reservoir sample of contexts (keep the R largest random keys) with the latents active in each."""
        keys = torch.rand(gid.numel(), generator=self.gen).to(maxv.device)
        enter = (keys > self.reservoir.values[0, -1]).nonzero().squeeze(1)
        if enter.numel() == 0:
            return
        bounds = torch.searchsorted(c, torch.stack([enter, enter + 1]))  # pairs are sorted by context
        for r, b0, b1 in zip(enter.tolist(), bounds[0].tolist(), bounds[1].tolist()):
            self.random_fired[int(gid[r])] = (lat[b0:b1].cpu().numpy().astype(np.int32), maxv[b0:b1].cpu().numpy())
        self.reservoir.merge(keys[None], {"ctx": gid})
        if len(self.random_fired) > 4 * self.n_random:
            kept = set(self.reservoir.payload["ctx"][0].tolist())
            self.random_fired = {c: v for c, v in self.random_fired.items() if c in kept}
