"""The on-disk layout of an activation store, and the exact statistics kept with every shard.

    <store>/manifest.json                 written last (by rank 0): its presence means the store is complete
    <store>/plan.json                     what this store holds (model, checkpoint hash, points, inputs, config)
    <store>/capture_config.json           the resolved capture config
    <store>/shards/r0_000000.json         commit marker of shard 0 of rank 0: rows, row range, per-point stats
    <store>/shards/r0_000000.token_id.npy int32 [rows]   token id of each row
    <store>/shards/r0_000000.doc_id.npy   int64 [rows]   document index in the input stream
    <store>/shards/r0_000000.ctx.npy      int32 [rows]   context index within the document (sentence / window)
    <store>/shards/r0_000000.pos.npy      int32 [rows]   position within the context (0 = BOS if prepended)
    <store>/shards/r0_000000.<point>.npy  uint16 [rows, d_model]: the bf16 bit pattern of each activation row

Every file is written to a temp name, fsynced and renamed; the shard's .json is written last, so a shard exists
exactly when its .json does. Shards of a rank hold fixed runs of `shard_rows` rows of that rank's row stream
(the last one may be shorter). Plain .npy files: `np.load(f, mmap_mode="r")` maps them without reading.

Statistics per shard and capture point are exact float64 moments of the stored (bf16) values: count, mean, M2
(sum of squared deviations), sum of row norms and of squared row norms. Shards merge with Chan et al.'s parallel
update, so the store's mean/variance do not depend on where a run was killed and resumed.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import numpy as np

from llama.cli import atomic_write

META_FIELDS = {"token_id": np.int32, "doc_id": np.int64, "ctx": np.int32, "pos": np.int32}
MANIFEST, PLAN, CONFIG, SHARD_DIR = "manifest.json", "plan.json", "capture_config.json", "shards"
FORMAT_VERSION = 1


def shard_name(rank: int, index: int) -> str:
    return f"r{rank}_{index:06d}"


def shard_file(store: Path, name: str, what: str) -> Path:
    return Path(store) / SHARD_DIR / f"{name}.{what}.npy"


def atomic_save_npy(path: Path, arr: np.ndarray) -> None:
    """np.save through a temp file + fsync + rename: a reader never sees a partial array."""
    atomic_write(path, lambda fh: np.save(fh, arr, allow_pickle=False))


class Moments(NamedTuple):
    count: int
    mean: np.ndarray  # float64 [D]
    m2: np.ndarray  # float64 [D], sum of squared deviations from the mean
    norm_sum: float  # sum over rows of ||x||
    sq_norm_sum: float  # sum over rows of ||x||^2

    @staticmethod
    def empty(d: int) -> "Moments":
        return Moments(0, np.zeros(d), np.zeros(d), 0.0, 0.0)

    def merge(self, other: "Moments") -> "Moments":
        """Chan et al.: combine the moments of two disjoint sets of rows."""
        if other.count == 0:
            return self
        if self.count == 0:
            return other
        n = self.count + other.count
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.count / n)
        m2 = self.m2 + other.m2 + delta * delta * (self.count * other.count / n)
        return Moments(n, mean, m2, self.norm_sum + other.norm_sum, self.sq_norm_sum + other.sq_norm_sum)

    def to_json(self) -> dict:
        return {"count": self.count, "mean": self.mean.tolist(), "m2": self.m2.tolist(),
                "norm_sum": self.norm_sum, "sq_norm_sum": self.sq_norm_sum}

    @staticmethod
    def from_json(d: dict) -> "Moments":
        return Moments(int(d["count"]), np.asarray(d["mean"], np.float64), np.asarray(d["m2"], np.float64),
                       float(d["norm_sum"]), float(d["sq_norm_sum"]))

    def summary(self) -> dict:
        """What the manifest shows: mean, population variance, mean norm, mean squared norm."""
        n = max(self.count, 1)
        return {"count": self.count, "mean": self.mean.tolist(), "var": (self.m2 / n).tolist(),
                "mean_norm": self.norm_sum / n, "mean_sq_norm": self.sq_norm_sum / n}


def bf16_bits_to_f64(bits: np.ndarray) -> np.ndarray:
    """uint16 bf16 bit patterns -> float64 values (bf16 is the top half of a float32)."""
    return (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


def moments_of(bits: np.ndarray, chunk: int = 4096) -> Moments:
    """Exact float64 moments of bf16 rows [n, D], a chunk at a time (bounded memory), merged with Chan."""
    m = Moments.empty(bits.shape[1])
    for i in range(0, bits.shape[0], chunk):
        x = bf16_bits_to_f64(bits[i:i + chunk])
        mean = x.mean(0)
        sq = np.einsum("ij,ij->i", x, x)
        m = m.merge(Moments(x.shape[0], mean, ((x - mean) ** 2).sum(0), float(np.sqrt(sq).sum()), float(sq.sum())))
    return m


def read_json(path: Path) -> dict:
    with open(path) as fh:
        return json.load(fh)


def committed_shards(store: Path, rank: int) -> list[dict]:
    """The committed shards of one rank, in order. Only the contiguous prefix 0..n-1 counts (the writer is
    sequential, so anything after a gap is left over from an interrupted run and will be rewritten)."""
    out: list[dict] = []
    while True:
        marker = Path(store) / SHARD_DIR / f"{shard_name(rank, len(out))}.json"
        if not marker.exists():
            return out
        out.append(read_json(marker))
