"""Pass 2 of top contexts: re-read only the kept contexts and record, for every (latent, slot), the latent's
activation on each token of a window of the context (what the dashboard highlights), plus the contexts' tokens.

A window is the whole context when it has <= `window` tokens; otherwise `window` tokens around the slot's argmax
token (3/4 of them before it) for `max`/`mean`, or the last `window` tokens for `last`.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import torch

from llama.cli import progress_bar
from sae.analysis.topn import RunningTopN


class Windows(NamedTuple):
    ctx: np.ndarray  # [L, N] compact context index, -1 empty
    pos: np.ndarray  # [L, N] int32
    acts: np.ndarray  # [L, N] float32 scores (0 empty)
    start: np.ndarray  # [L, N] int32
    offsets: np.ndarray  # [L*N + 1] int64
    win_acts: np.ndarray  # [total] float16


class Plan(NamedTuple):
    slot: np.ndarray  # flat slot index l*N + j of each non-empty slot, sorted by context
    lat: np.ndarray
    ctx: np.ndarray  # compact context index
    start: np.ndarray
    length: np.ndarray


def plan_windows(top: RunningTopN, agg: str, compact: np.ndarray, ctx_len: np.ndarray, window: int
                 ) -> tuple[Windows, Plan]:
    """Window start/length for every slot; `compact` maps a global context id to its saved index (or -1)."""
    gctx = top.payload["ctx"].cpu().numpy()
    pos = top.payload["pos"].cpu().numpy()
    L, N = gctx.shape
    flat = np.flatnonzero(gctx.reshape(-1) >= 0)
    g = gctx.reshape(-1)[flat]
    clen = ctx_len[g]
    length = np.minimum(clen, window)
    p = pos.reshape(-1)[flat]
    start = clen - length if agg == "last" else np.clip(p - (length * 3) // 4, 0, clen - length)
    cc = compact[g]
    lens = np.zeros(L * N, dtype=np.int64)
    lens[flat] = length
    offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    start_full = np.zeros(L * N, dtype=np.int32)
    start_full[flat] = start
    ctx_full = np.full(L * N, -1, dtype=np.int64)
    ctx_full[flat] = cc
    vals = top.values.cpu().numpy().astype(np.float32)
    vals[~np.isfinite(vals)] = 0.0
    order = np.argsort(cc, kind="stable")
    w = Windows(ctx_full.reshape(L, N), pos.astype(np.int32), vals, start_full.reshape(L, N), offsets,
                np.zeros(int(offsets[-1]), dtype=np.float16))
    return w, Plan(flat[order], flat[order] // N, cc[order], start[order], length[order])


@torch.no_grad()
def fill_windows(source: Any, sae: Any, tops: dict[str, RunningTopN], ref: np.ndarray, ctx_row0: np.ndarray,
                 ctx_len: np.ndarray, window: int, bos_id: int | None, batch_rows: int = 8192,
                 device: str | torch.device = "cpu", progress: bool = True
                 ) -> tuple[dict[str, Windows], list[np.ndarray]]:
    """ref: sorted global ids of the contexts to save. Returns per-aggregation windows and each saved context's
    token ids (in `ref` order)."""
    compact = np.full(len(ctx_len), -1, dtype=np.int64)
    compact[ref] = np.arange(len(ref))
    plans = {a: plan_windows(t, a, compact, ctx_len, window) for a, t in tops.items()}
    tokens: list[np.ndarray] = []
    r_row0, r_len = ctx_row0[ref], ctx_len[ref]
    bar = progress_bar(total=int(r_len.sum()), unit="tok", desc="windows", disable=not progress, mininterval=1.0)
    c0 = 0
    while c0 < len(ref):
        c1 = c0 + 1  # a batch of whole contexts, at most batch_rows tokens (or one long context)
        while c1 < len(ref) and r_len[c0:c1 + 1].sum() <= batch_rows:
            c1 += 1
        xs, ids = [], []
        i = c0
        while i < c1:  # read runs of adjacent contexts in one call
            j = i + 1
            if source.has_rows:
                while j < c1 and r_row0[j] == r_row0[j - 1] + r_len[j - 1]:
                    j += 1
            x, t = source.read_context(int(r_row0[i]), int(r_len[i:j].sum()))
            xs.append(x)
            ids.append(t)
            i = j
        tok = np.concatenate(ids)
        tokens.extend(np.split(tok, np.cumsum(r_len[c0:c1])[:-1]))
        enc = sae.encode(torch.cat(xs).to(device))
        acts, idx = enc[0].float(), enc[1].long()
        if bos_id is not None:
            acts = acts * torch.from_numpy(tok != bos_id).to(acts.device)[:, None]
        base = np.concatenate([[0], np.cumsum(r_len[c0:c1])])
        for w, plan in plans.values():
            lo, hi = np.searchsorted(plan.ctx, [c0, c1])
            for s0 in range(lo, hi, 4096):
                _fill(w, plan, slice(s0, min(s0 + 4096, hi)), base[plan.ctx[s0:min(s0 + 4096, hi)] - c0],
                      acts, idx)
        bar.update(int(r_len[c0:c1].sum()))
        c0 = c1
    bar.close()
    return {a: w for a, (w, _) in plans.items()}, tokens


def _fill(w: Windows, plan: Plan, sl: slice, base: np.ndarray, acts: torch.Tensor, idx: torch.Tensor) -> None:
    length = plan.length[sl]
    rep = np.repeat(np.arange(len(length)), length)
    within = np.arange(int(length.sum())) - np.repeat(np.cumsum(length) - length, length)
    tok = torch.from_numpy(base[rep] + plan.start[sl][rep] + within).to(acts.device)
    lat = torch.from_numpy(plan.lat[sl][rep]).to(acts.device)
    v = (acts[tok] * (idx[tok] == lat[:, None])).sum(1)
    w.win_acts[w.offsets[plan.slot[sl]][rep] + within] = v.cpu().numpy().astype(np.float16)
