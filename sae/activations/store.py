"""Reading an activation store (written by scripts/capture.py; layout in sae/activations/store_format.py).

    store = open_store("out/activations/tiny")
    store.d_model, len(store), store.num_rows("val"), store.manifest["mean_norm"]
    for x in store.batches(4096, split="train", seed=0, rank=r, world_size=w, dtype=torch.float32):
        ...                                  # x: [4096, d_model], shuffled across all shards
    store.rows(0, 10)                        # raw bf16 rows in store order
    store.meta(0, 10)                        # {"token_id", "doc_id", "ctx", "pos"} numpy arrays

Split: a document goes to validation when a hash of its id falls below `val_fraction` (by default the store's own,
chosen at capture: `manifest["val_fraction"]`), so no document spans both splits, the split does not depend on the
shard layout or the number of ranks, and training and evaluation agree on it.

Shuffle: every epoch draws one global permutation of the split's rows (seeded by seed, epoch, split); global batch
i is a slice of it and each rank takes its part of that slice, so ranks are disjoint. The trade-off, honestly: this is
a true uniform shuffle across all shards (no correlated runs of one document in a batch), at the cost of 8 bytes
of index per row in memory and random row reads (one d_model*2-byte row each, usually a 4 KiB page for
d_model=2048), which are fast when the store sits in the page cache or on an SSD and slow on a spinning disk.
Within a batch, rows are read in store order (sorted indices) for locality; the batch is still a uniform sample.
`start_batch=b` jumps straight to batch b (epoch b // batches_per_epoch): an exact resume costs one permutation.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from llama.cli import UserError
from sae.activations import store_format as fmt
from sae.activations.packing import prefetch as _prefetch
from sae.activations.store_writer import BackgroundWriter, ShardRows, ShardWriter, write_manifest  # noqa: F401  (re-export)

SPLITS = ("train", "val")


def _doc_hash_unit(doc_id: np.ndarray, salt: int) -> np.ndarray:
    """splitmix64(doc_id + salt) mapped to [0, 1): a fixed, platform-independent hash of each document id."""
    with np.errstate(over="ignore"):
        z = doc_id.astype(np.uint64) + np.uint64(salt) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def is_val_document(doc_id: np.ndarray, val_fraction: float, salt: int = 0) -> np.ndarray:
    """True for the documents of the validation split: the split of every store, and of store-free training."""
    return _doc_hash_unit(np.asarray(doc_id), salt) < val_fraction


class ActivationStore:
    def __init__(self, path: str | Path, val_fraction: float | None = None, split_salt: int = 0) -> None:
        self.path = Path(path)
        self.manifest: dict = fmt.read_json(self.path / fmt.MANIFEST)
        if val_fraction is None:  # the store's own split, chosen at capture (--val-fraction; older stores: 0.05)
            val_fraction = float(self.manifest.get("val_fraction", 0.05))
        if not 0.0 <= val_fraction <= 1.0:  # 1: every document is validation (a store of evaluation text)
            raise UserError(f"val_fraction must be in [0, 1], got {val_fraction}")
        self.val_fraction, self.split_salt = val_fraction, split_salt
        self.points: list[str] = list(self.manifest["points"])
        self.d_model: int = int(self.manifest["d_model"])
        self.shards: list[dict] = list(self.manifest["shards"])
        self.offsets = np.concatenate([[0], np.cumsum([s["rows"] for s in self.shards])]).astype(np.int64)
        for s in self.shards:
            for what in (*self.points, *fmt.META_FIELDS):
                f = fmt.shard_file(self.path, s["name"], what)
                if not f.exists():
                    raise UserError(f"activation store {self.path} is missing {f.name} (listed in its manifest)")
        self._maps: dict[tuple[str, int], np.ndarray] = {}
        self._split_rows: dict[str, np.ndarray] = {}

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __repr__(self) -> str:
        return f"ActivationStore({str(self.path)!r}, rows={len(self)}, d_model={self.d_model}, points={self.points})"

    # --- raw access -------------------------------------------------------------------------------------------
    def _point(self, point: str | None) -> str:
        if point is None:
            if len(self.points) > 1:
                raise UserError(f"store {self.path} holds several capture points; pick one of {self.points}")
            return self.points[0]
        if point not in self.points:
            raise UserError(f"store {self.path} has no capture point {point!r}; it holds {self.points}")
        return point

    def _map(self, what: str, si: int) -> np.ndarray:
        key = (what, si)
        if key not in self._maps:
            self._maps[key] = np.load(fmt.shard_file(self.path, self.shards[si]["name"], what), mmap_mode="r")
        return self._maps[key]

    def _gather(self, what: str, idx: np.ndarray) -> np.ndarray:
        """Rows at global indices `idx` (sorted ascending) from the shards' memory maps."""
        shard_of = np.searchsorted(self.offsets, idx, side="right") - 1
        cuts = np.flatnonzero(np.diff(shard_of)) + 1
        parts = []
        for lo, hi in zip(np.concatenate([[0], cuts]), np.concatenate([cuts, [len(idx)]])):
            si = int(shard_of[lo])
            local = idx[lo:hi] - self.offsets[si]
            mm = self._map(what, si)
            if local[-1] - local[0] + 1 == len(local):  # a contiguous run: one slice, no fancy indexing
                parts.append(np.array(mm[local[0]:local[-1] + 1]))
            else:
                parts.append(mm[local])
        if not parts:
            shape = (0, self.d_model) if what in self.points else (0,)
            return np.empty(shape, np.uint16 if what in self.points else fmt.META_FIELDS[what])
        return np.concatenate(parts) if len(parts) > 1 else parts[0]

    def rows(self, i0: int, i1: int, split: str | None = None, point: str | None = None) -> torch.Tensor:
        """Rows i0..i1 (of the whole store, or of one split) in store order, as a bf16 tensor [i1-i0, d_model]."""
        idx = np.arange(i0, i1, dtype=np.int64) if split is None else self.split_rows(split)[i0:i1]
        return torch.from_numpy(np.ascontiguousarray(self._gather(self._point(point), idx))).view(torch.bfloat16)

    def meta(self, i0: int, i1: int) -> dict[str, np.ndarray]:
        """token_id, doc_id, ctx (context within the document) and pos (position in the context) of rows i0..i1."""
        idx = np.arange(i0, i1, dtype=np.int64)
        return {k: self._gather(k, idx) for k in fmt.META_FIELDS}

    # --- splits -----------------------------------------------------------------------------------------------
    def split_rows(self, split: str) -> np.ndarray:
        """Global row indices of a split, ascending (int64)."""
        if split not in SPLITS:
            raise UserError(f"unknown split {split!r}; expected one of {SPLITS}")
        if split not in self._split_rows:
            docs = np.concatenate([self._map("doc_id", si) for si in range(len(self.shards))]) if self.shards \
                else np.empty(0, np.int64)
            is_val = is_val_document(docs, self.val_fraction, self.split_salt)
            self._split_rows["val"] = np.flatnonzero(is_val).astype(np.int64)
            self._split_rows["train"] = np.flatnonzero(~is_val).astype(np.int64)
        return self._split_rows[split]

    def num_rows(self, split: str = "train") -> int:
        return len(self.split_rows(split))

    def batches_per_epoch(self, batch_size: int, split: str = "train", world_size: int = 1) -> int:
        return self.num_rows(split) // (batch_size * world_size)

    def batches(self, batch_size: int, *, split: str = "train", seed: int = 0, rank: int = 0, world_size: int = 1,
                dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", start_batch: int = 0,
                loop: bool = True, point: str | None = None, prefetch: int = 2) -> Iterator[torch.Tensor]:
        """Shuffled batches [batch_size, d_model] of one split; deterministic given the arguments.

        Same contract as source.TensorSource: each epoch puts the split's rows in one seeded order; global
        batch i is entries [i*B*W, (i+1)*B*W) of it and rank r takes the r-th B of those. So ranks are disjoint,
        W ranks at batch B see exactly what one rank sees at batch W*B, and start_batch=i resumes at global
        batch i. Rows beyond the last full global batch sit out that epoch. loop=False: one epoch, then stop.
        prefetch: batches gathered ahead on a background thread (bf16, from the memory maps), so reading overlaps
        the training step; bf16 -> dtype happens on `device`, after the (half-size) transfer."""
        bits = self._batch_bits(batch_size, split, seed, rank, world_size, start_batch, loop, self._point(point))
        for b in (_prefetch(bits, prefetch) if prefetch > 0 else bits):
            yield b.to(device, non_blocking=True).to(dtype)

    def _batch_bits(self, batch_size: int, split: str, seed: int, rank: int, world_size: int, start_batch: int,
                    loop: bool, point: str) -> Iterator[torch.Tensor]:
        if not 0 <= rank < world_size:
            raise UserError(f"rank {rank} is outside world_size {world_size}")
        if batch_size <= 0:
            raise UserError(f"batch_size must be positive, got {batch_size}")
        rows = self.split_rows(split)
        gb = batch_size * world_size
        per_epoch = len(rows) // gb
        if per_epoch == 0:
            raise UserError(f"store {self.path}: split {split!r} has {len(rows)} rows, fewer than one global batch "
                            f"of {gb} ({batch_size} x {world_size} rank(s))")
        epoch, j = divmod(start_batch, per_epoch)
        split_code = SPLITS.index(split)
        while loop or epoch == 0:
            order = np.random.default_rng([seed, epoch, split_code]).permutation(len(rows))
            for j in range(j, per_epoch):
                lo = j * gb + rank * batch_size
                idx = np.sort(rows[order[lo:lo + batch_size]])
                yield torch.from_numpy(self._gather(point, idx)).view(torch.bfloat16)
            epoch, j = epoch + 1, 0


def open_store(path: str | Path, val_fraction: float | None = None, split_salt: int = 0) -> ActivationStore:
    """Open a complete store; a missing, partial or foreign folder is a UserError saying what to do."""
    p = Path(path)
    if not p.is_dir():
        raise UserError(f"activation store {p} does not exist (expected a folder written by scripts/capture.py)")
    if not (p / fmt.MANIFEST).exists():
        if (p / fmt.PLAN).exists():
            raise UserError(f"activation store {p} is incomplete (the capture was interrupted); rerun the same "
                            f"capture command to finish it")
        raise UserError(f"{p} is not an activation store (no {fmt.MANIFEST}); write one with scripts/capture.py")
    return ActivationStore(p, val_fraction=val_fraction, split_salt=split_salt)

