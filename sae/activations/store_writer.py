"""Writing an activation store: fixed-size shards committed atomically, through a bounded queue on a background
thread, and the manifest that describes all shards of all ranks (layout: sae/activations/store_format.py).

    writer = BackgroundWriter(ShardWriter(store, rank, points, d_model, shard_rows, resume=committed), max_queue=8)
    writer.put(ShardRows(acts={point: bits [n, D] uint16}, token_id=..., doc_id=..., ctx=..., pos=...))
    writer.close()                      # writes the last (short) shard, then `r{rank}.done.json`
    write_manifest(store, plan, world_size, extra)     # rank 0, after every rank is done
"""
from __future__ import annotations

import errno
import queue
import threading
from pathlib import Path
from typing import NamedTuple

import numpy as np

from llama.cli import UserError, atomic_write_json
from sae.activations import store_format as fmt
from sae.activations.store_format import META_FIELDS, Moments


class ShardRows(NamedTuple):
    acts: dict[str, np.ndarray]  # point -> uint16 bf16 bits [n, D]
    token_id: np.ndarray
    doc_id: np.ndarray
    ctx: np.ndarray
    pos: np.ndarray


class ShardWriter:
    """Accumulates rows into a preallocated shard buffer; every `shard_rows` rows it commits one shard."""

    def __init__(self, store: Path, rank: int, points: list[str], d_model: int, shard_rows: int,
                 resume: list[dict] | None = None) -> None:
        self.store, self.rank, self.points, self.shard_rows = Path(store), rank, list(points), shard_rows
        resume = resume or []
        self.index = len(resume)  # next shard to write
        self.rows_done = sum(s["rows"] for s in resume)  # rows of this rank already committed
        self.acts = {p: np.empty((shard_rows, d_model), np.uint16) for p in self.points}
        self.meta = {k: np.empty(shard_rows, dt) for k, dt in META_FIELDS.items()}
        self.fill = 0

    def add(self, rows: ShardRows) -> None:
        n, i = len(rows.token_id), 0
        while i < n:
            take = min(n - i, self.shard_rows - self.fill)
            sl = slice(self.fill, self.fill + take)
            for p in self.points:
                self.acts[p][sl] = rows.acts[p][i:i + take]
            for k in META_FIELDS:
                self.meta[k][sl] = getattr(rows, k)[i:i + take]
            self.fill += take
            i += take
            if self.fill == self.shard_rows:
                self._commit()

    def flush(self) -> None:
        """Commit the short last shard (if any) and mark this rank done."""
        if self.fill:
            self._commit()
        atomic_write_json(self.store / fmt.SHARD_DIR / f"r{self.rank}.done.json",
                          {"rank": self.rank, "rows": self.rows_done, "shards": self.index})

    def _commit(self) -> None:
        n, name = self.fill, fmt.shard_name(self.rank, self.index)
        stats = {}
        for p in self.points:
            fmt.atomic_save_npy(fmt.shard_file(self.store, name, p), self.acts[p][:n])
            stats[p] = fmt.moments_of(self.acts[p][:n]).to_json()
        for k in META_FIELDS:
            fmt.atomic_save_npy(fmt.shard_file(self.store, name, k), self.meta[k][:n])
        marker = {"name": name, "rank": self.rank, "index": self.index, "rows": n,
                  "row_start": self.rows_done, "stats": stats}
        atomic_write_json(self.store / fmt.SHARD_DIR / f"{name}.json", marker)  # the commit point
        self.index += 1
        self.rows_done += n
        self.fill = 0


def _as_user_error(e: BaseException, store: Path) -> BaseException:
    if isinstance(e, OSError):
        what = "the disk is full" if e.errno in (errno.ENOSPC, errno.EDQUOT) else f"writing failed ({e})"
        return UserError(f"{what} while writing the activation store {store}; every committed shard is kept and "
                         f"the store is resumable: free space and rerun the same command")
    return e


class BackgroundWriter:
    """Runs a ShardWriter on its own thread behind a bounded queue, so the forward pass never waits on disk
    (unless the disk is slower than the model: then the queue fills and `put` blocks, bounding memory)."""

    def __init__(self, writer: ShardWriter, max_queue: int = 8) -> None:
        self.writer = writer
        self.q: queue.Queue[ShardRows | None] = queue.Queue(maxsize=max(1, max_queue))
        self.error: BaseException | None = None
        self.aborted = False
        self.thread = threading.Thread(target=self._run, name="shard-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            item = self.q.get()
            if item is None:
                break
            if self.error is None and not self.aborted:
                try:
                    self.writer.add(item)
                except BaseException as e:  # reported to the main thread on its next put/close
                    self.error = e
        if self.error is None and not self.aborted:  # the short last shard only at the true end of the stream
            try:
                self.writer.flush()
            except BaseException as e:
                self.error = e

    def _raise(self) -> None:
        if self.error is not None:
            raise _as_user_error(self.error, self.writer.store) from self.error

    def put(self, rows: ShardRows) -> None:
        while True:
            self._raise()
            try:
                self.q.put(rows, timeout=0.2)
                return
            except queue.Full:
                continue

    def _stop(self) -> None:
        while self.thread.is_alive():
            try:
                self.q.put(None, timeout=0.2)
                break
            except queue.Full:
                continue
        self.thread.join()

    def close(self) -> None:
        """Write what is left (the short last shard too), wait for the thread, re-raise any write error."""
        self._stop()
        self._raise()

    def abort(self) -> None:
        """Stop after an error elsewhere: drop queued rows and never write a short shard (the rows it would hold
        are recomputed on resume, so the store stays exactly resumable)."""
        self.aborted = True
        self._stop()


def write_manifest(store: Path, plan: dict, world_size: int, extra: dict) -> dict:
    """Collect every rank's committed shards into manifest.json (written last: it marks the store complete)."""
    store = Path(store)
    shards: list[dict] = []
    for rank in range(world_size):
        done = store / fmt.SHARD_DIR / f"r{rank}.done.json"
        if not done.exists():
            raise UserError(f"rank {rank} did not finish writing {store}; rerun the same command to complete it")
        committed = fmt.committed_shards(store, rank)
        if sum(s["rows"] for s in committed) != fmt.read_json(done)["rows"]:
            raise UserError(f"{store}: shards of rank {rank} do not add up to its row count; rerun to repair")
        shards += committed
    points = plan["points"]
    stats = {}
    for p in points:
        m = Moments.empty(plan["d_model"])
        for s in shards:
            m = m.merge(Moments.from_json(s["stats"][p]))
        stats[p] = m.summary()
    head = stats[points[0]]
    manifest = {
        "format_version": fmt.FORMAT_VERSION, "model": plan["model"], "checkpoint_hash": plan["checkpoint_hash"],
        "hook_name": points[0], "points": points, "d_model": plan["d_model"], "dtype": "bfloat16",
        "rows": sum(s["rows"] for s in shards),
        "shards": [{"name": s["name"], "rank": s["rank"], "rows": s["rows"]} for s in shards],
        "mean": head["mean"], "var": head["var"], "mean_norm": head["mean_norm"],
        "mean_sq_norm": head["mean_sq_norm"], "stats": stats, "sources": plan["sources"],
        "world_size": world_size, **extra, "config": plan["config"],
    }
    atomic_write_json(store / fmt.MANIFEST, manifest)
    return manifest
