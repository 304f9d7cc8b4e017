"""Store-free activations: documents -> contexts -> one forward capturing every point -> a shuffling buffer.

    stream = open_stream(cfg, model, tok, files, points, shards=[0], n_shards=1, rows_per_shard=4096)
    batch = stream.next()            # batch.acts[point]: [rows, d_model] in the model's dtype, on its device
    held = held_out(cfg, model, tok, files, points, rows=32768, val_fraction=0.05)

The contexts, BOS handling, tokenizer and forward are capture's own functions (sae/activations/capture.py), so a
store-free run sees exactly the rows `scripts/capture.py` would store with the same flags; nothing is written.

Data shards. Document i belongs to shard i % S (held-out documents, the store's validation split, are left out).
Shard s's rows are the rows capture writes as rank s of S (sae/activations/packing.py: the same contexts packed
into the same length-sorted batches), in a seeded random order of batches and of equal-length contexts per pass
(`plan_batches(shuffle=(seed, s, pass))`, so a round mixes the whole chunk's documents, not one long document's
consecutive windows), repeated pass after pass over the inputs. A process runs the shards it is given (rank r of
W: shards [r S/W, (r+1) S/W)), so S, not the number of ranks, fixes the data.

The buffer, per shard. Round j is the shard's rows [j R, (j+1) R) with R = buffer_batches * b (b: rows the shard
gives per step), shuffled by a permutation seeded by (seed, shard, j); step i takes entries [(i % m) b,
(i % m + 1) b) of round i // m (m = buffer_batches). Every point's buffer holds the same rows (one forward), so
the SAEs of all points see the same tokens. Memory per point: R rows plus at most one forward batch, whatever the
length of the run. The batch of every step is a pure function of (inputs, flags, step): a resumed run rebuilds
its current round (a tokenize-only replay of the earlier rows, then the forwards of one round) and continues
bit-identically with no activation saved (whole passes before that round are skipped by their row count, which
is the same every pass).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

import numpy as np
import torch
from torch import Tensor

from llama.cli import UserError
from sae.activations.capture import ContextConfig, context_batches, forward_rows
from sae.activations.packing import Batch
from sae.activations.store import is_val_document

Forward = Callable[[Batch], dict[str, Tensor]]


class StreamBatch(NamedTuple):
    acts: dict[str, Tensor]  # point -> [rows, d_model]
    doc_id: np.ndarray  # [rows] where each row came from: document, context within it, position in the context
    ctx: np.ndarray
    pos: np.ndarray


class _Pending(NamedTuple):
    start: int  # the shard's row index of acts[...][0]
    acts: dict[str, Tensor]
    doc_id: np.ndarray
    ctx: np.ndarray
    pos: np.ndarray


class ShardBuffer:
    """One shard's rounds (module docstring). `batches(epoch)` is a fresh pass over the shard's packed batches."""

    def __init__(self, batches: Callable[[int], Iterator[Batch]], forward: Forward, shard: int, rows: int,
                 buffer_batches: int, seed: int, timer: "Timer") -> None:
        self.batches, self.forward, self.shard, self.rows, self.m = batches, forward, shard, rows, buffer_batches
        self.R = rows * buffer_batches
        self.seed, self.timer = seed, timer
        self.it: Iterator[Batch] | None = None
        self.epoch = -1  # passes over the inputs started
        self.next_row = 0  # the shard's row index of the next batch `it` yields
        self.epoch_rows = 0
        self.pass_rows = -1  # rows of one whole pass (the same every pass: only their order changes), once known
        self.pending: _Pending | None = None
        self.round = -1
        self.buf: dict[str, Tensor] = {}
        self.doc_id = np.zeros(self.R, np.int64)
        self.ctx = np.zeros(self.R, np.int32)
        self.pos = np.zeros(self.R, np.int32)
        self.perm = torch.zeros(0, dtype=torch.long)

    def _next_packed(self, want: int) -> Batch:
        while True:
            if self.it is None:
                self.epoch += 1
                if 0 < self.pass_rows <= want - self.next_row:  # a resume past this whole pass: not even tokenized
                    self.next_row += self.pass_rows
                    continue
                self.it, self.epoch_rows = self.batches(self.epoch), 0
            b = next(self.it, None)
            if b is not None:
                self.epoch_rows += b.n_rows
                return b
            if self.epoch_rows == 0:
                raise UserError(f"data shard {self.shard} holds no training rows: the inputs have too few documents "
                                f"for the data shards (or all of them are held out for validation)")
            self.it, self.pass_rows = None, self.epoch_rows  # another pass over the inputs

    def _fill(self, j: int) -> None:
        """Copy the shard's rows [j R, (j+1) R) into the buffer: skip (no forward) what lies before, forward the
        rest."""
        lo, filled = j * self.R, 0
        while filled < self.R:
            want = lo + filled
            p = self.pending
            if p is None or p.start + len(p.doc_id) <= want:
                b = self._next_packed(want)
                start, self.next_row = self.next_row, self.next_row + b.n_rows
                if b.n_rows == 0 or start + b.n_rows <= want:
                    continue  # rows before this round (a resume): tokenized, never run through the model
                with self.timer.forward(b.n_rows):
                    acts = self.forward(b)
                self.pending = p = _Pending(start, acts, b.doc_id, b.ctx, b.pos)
            i0 = want - p.start
            n = min(len(p.doc_id) - i0, self.R - filled)
            for name, a in p.acts.items():
                if name not in self.buf:
                    self.buf[name] = torch.empty(self.R, a.shape[1], dtype=a.dtype, device=a.device)
                self.buf[name][filled:filled + n] = a[i0:i0 + n]
            self.doc_id[filled:filled + n] = p.doc_id[i0:i0 + n]
            self.ctx[filled:filled + n] = p.ctx[i0:i0 + n]
            self.pos[filled:filled + n] = p.pos[i0:i0 + n]
            filled += n
        perm = np.random.default_rng([self.seed, self.shard, j]).permutation(self.R)
        self.perm = torch.from_numpy(perm)
        self.round = j

    def take(self, step: int, n: int | None = None) -> StreamBatch:
        """The shard's rows of `step` (or the first n entries of that step's round: an init sample)."""
        j, k = divmod(step, self.m)
        if j != self.round:
            self._fill(j)
        idx = self.perm[k * self.rows:(k + 1) * self.rows] if n is None else self.perm[:n]
        dev = next(iter(self.buf.values())).device
        acts = {name: buf[idx.to(dev)] for name, buf in self.buf.items()}
        i = idx.numpy()
        return StreamBatch(acts, self.doc_id[i], self.ctx[i], self.pos[i])

    def close(self) -> None:
        close = getattr(self.it, "close", None)
        if close is not None:
            close()  # stops a prefetch thread


class Timer:
    """Seconds and rows spent in the model's forward (synchronised on CUDA so the split is honest)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.seconds, self.rows = 0.0, 0

    def forward(self, rows: int) -> "Timer":
        self._rows = rows
        return self

    def __enter__(self) -> None:
        self._t0 = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        self.seconds += time.perf_counter() - self._t0
        self.rows += self._rows


class ActivationStream:
    """Steps of rows from this process's shards (concatenated in shard order)."""

    def __init__(self, shards: list[ShardBuffer], timer: Timer, start_step: int = 0) -> None:
        self.shards, self.timer, self.step = shards, timer, start_step

    def next(self) -> StreamBatch:
        parts = [s.take(self.step) for s in self.shards]
        self.step += 1
        return _concat(parts)

    def sample(self, rows_per_shard: int) -> dict[str, Tensor]:
        """Up to rows_per_shard random rows of each shard's first round (SAE init), without consuming a step."""
        return _concat([s.take(0, min(rows_per_shard, s.R)) for s in self.shards]).acts

    def buffer_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for s in self.shards for t in s.buf.values())

    def close(self) -> None:
        for s in self.shards:
            s.close()


def _concat(parts: list[StreamBatch]) -> StreamBatch:
    if len(parts) == 1:
        return parts[0]
    return StreamBatch({p: torch.cat([b.acts[p] for b in parts]) for p in parts[0].acts},
                       *(np.concatenate([getattr(b, f) for b in parts]) for f in ("doc_id", "ctx", "pos")))


def document_filter(val_fraction: float, held_out: bool = False) -> Callable[[int], bool]:
    """doc_id -> whether it is a training document (or, held_out=True, a validation one): the store's split."""
    return lambda doc_id: bool(is_val_document(np.array([doc_id]), val_fraction)[0]) == held_out


def open_stream(cfg: ContextConfig, model, tok, files: list[Path], points: list[str], shards: list[int],
                n_shards: int, rows_per_shard: int, buffer_batches: int = 16, seed: int = 0, start_step: int = 0,
                val_fraction: float = 0.05, device: torch.device | None = None) -> ActivationStream:
    """The training stream of a resolved context config: shards `shards` of `n_shards`, held-out documents left out."""
    device = device or torch.device(cfg.device)
    keep = document_filter(val_fraction)
    timer = Timer(device)

    def forward(b: Batch) -> dict[str, Tensor]:
        return forward_rows(model, b, points, device)

    def batches(shard: int, epoch: int) -> Iterator[Batch]:  # each pass packs its chunks in a new random order
        return context_batches(cfg, files, tok, shard, n_shards, keep, shuffle=(seed, shard, epoch))

    buffers = [ShardBuffer(lambda e, s=s: batches(s, e), forward, s, rows_per_shard, buffer_batches, seed, timer)
               for s in shards]
    return ActivationStream(buffers, timer, start_step)


def held_out(cfg: ContextConfig, model, tok, files: list[Path], points: list[str], rows: int, val_fraction: float,
             device: torch.device | None = None) -> dict[str, Tensor]:
    """About `rows` rows of the held-out documents (the store's validation split), read in document order: the
    first contexts packed together hold `rows` tokens, so the set is whole documents, not the longest contexts."""
    device = device or torch.device(cfg.device)
    got: dict[str, list[Tensor]] = {p: [] for p in points}
    n = 0
    batches = context_batches(cfg, files, tok, 0, 1, document_filter(val_fraction, held_out=True), pack_tokens=rows)
    try:
        for b in batches:
            if n >= rows:
                break
            if b.n_rows:
                for p, a in forward_rows(model, b, points, device).items():
                    got[p].append(a)
                n += b.n_rows
    finally:
        getattr(batches, "close", lambda: None)()
    return {p: torch.cat(v) for p, v in got.items()} if n else {}
