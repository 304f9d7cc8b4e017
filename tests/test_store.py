"""The store reader against the arrays that were written: rows, meta, stats, splits, shuffling, ranks, resume."""
from __future__ import annotations

import errno
from pathlib import Path

import numpy as np
import pytest
import torch

from llama.cli import UserError
from sae.activations import store_format as fmt
from sae.activations.store import ActivationStore, open_store
from sae.activations.store_writer import BackgroundWriter, ShardRows, ShardWriter, write_manifest

D, POINT = 16, "blocks.0.hook_resid_post"


def synthetic(n: int, seed: int = 0) -> tuple[torch.Tensor, dict[str, np.ndarray]]:
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, D, generator=g) * 3 + 1).to(torch.bfloat16)
    doc = np.repeat(np.arange(n // 7 + 1), 7)[:n].astype(np.int64)  # runs of 7 rows per document
    meta = {"token_id": np.arange(n, dtype=np.int32) % 97, "doc_id": doc, "ctx": np.zeros(n, np.int32),
            "pos": (np.arange(n) % 7).astype(np.int32)}
    return x, meta


def write_store(path: Path, x: torch.Tensor, meta: dict[str, np.ndarray], shard_rows: int, pieces: int = 5) -> None:
    plan = {"model": "synthetic", "checkpoint_hash": "0", "points": [POINT], "d_model": D, "sources": [],
            "config": {}}
    w = BackgroundWriter(ShardWriter(path, 0, [POINT], D, shard_rows), max_queue=2)
    bits = x.view(torch.int16).numpy().view(np.uint16)
    for idx in np.array_split(np.arange(len(x)), pieces):  # uneven pieces that straddle shard boundaries
        w.put(ShardRows({POINT: bits[idx]}, *(meta[k][idx] for k in ("token_id", "doc_id", "ctx", "pos"))))
    w.close()
    write_manifest(path, plan, 1, {})


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[ActivationStore, torch.Tensor, dict[str, np.ndarray]]:
    path = tmp_path_factory.mktemp("store")
    x, meta = synthetic(1000)
    write_store(path, x, meta, shard_rows=128)
    return open_store(path, val_fraction=0.2), x, meta


def test_rows_meta_and_stats_round_trip(data) -> None:
    store, x, meta = data
    assert len(store) == 1000 and store.d_model == D and len(store.shards) == 8  # 7 x 128 + 104
    assert [s["rows"] for s in store.shards] == [128] * 7 + [104]
    assert torch.equal(store.rows(0, 1000).view(torch.int16), x.view(torch.int16))
    assert torch.equal(store.rows(120, 300).view(torch.int16), x[120:300].view(torch.int16))  # across shards
    got = store.meta(100, 900)
    for k in meta:
        np.testing.assert_array_equal(got[k], meta[k][100:900])
    ref = x.double().numpy()
    st = store.manifest["stats"][POINT]
    np.testing.assert_allclose(st["mean"], ref.mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(st["var"], ref.var(0), rtol=1e-10)
    np.testing.assert_allclose(store.manifest["mean_norm"], np.linalg.norm(ref, axis=1).mean(), rtol=1e-12)
    assert store.manifest["mean"] == st["mean"] and store.manifest["rows"] == 1000


def test_split_by_document(data) -> None:
    store, x, meta = data
    tr, va = store.split_rows("train"), store.split_rows("val")
    assert len(tr) + len(va) == 1000 and not set(tr) & set(va)
    assert not set(meta["doc_id"][tr]) & set(meta["doc_id"][va])  # no document on both sides
    assert 0.08 < len(va) / 1000 < 0.35  # about val_fraction=0.2 of ~143 documents
    assert torch.equal(store.rows(0, len(va), split="val").view(torch.int16), x[va].view(torch.int16))
    again = open_store(store.path, val_fraction=0.2)
    np.testing.assert_array_equal(again.split_rows("val"), va)


def as_keys(batch: torch.Tensor, x: torch.Tensor) -> list[int]:
    """Which rows of x a batch holds (rows of x are distinct with overwhelming probability)."""
    lookup = {tuple(r): i for i, r in enumerate(x.view(torch.int16).tolist())}
    return [lookup[tuple(r)] for r in batch.to(torch.bfloat16).view(torch.int16).tolist()]


def test_batches_shuffle_across_shards_deterministically(data) -> None:
    store, x, _ = data
    it = store.batches(64, seed=3, dtype=torch.float32)
    b = [next(it) for _ in range(12)]
    assert b[0].dtype == torch.float32 and b[0].shape == (64, D)
    assert torch.equal(b[0], x[as_keys(b[0], x)].float())  # bf16 -> fp32 is exact
    train = set(store.split_rows("train").tolist())
    epoch = [k for bb in b[:store.batches_per_epoch(64)] for k in as_keys(bb, x)]
    assert len(set(epoch)) == len(epoch) and set(epoch) <= train  # one epoch: no repeats, train rows only
    shards = {k // 128 for k in as_keys(b[0], x)}
    assert len(shards) >= 5  # one batch draws from many shards, not one
    again = list(zip(range(12), store.batches(64, seed=3)))
    assert all(torch.equal(u, v) for u, (_, v) in zip(b, again))
    other = next(store.batches(64, seed=4))
    assert set(as_keys(other, x)) != set(as_keys(b[0], x))
    resumed = store.batches(64, seed=3, start_batch=9)  # crosses into the second epoch
    assert all(torch.equal(next(resumed), b[i]) for i in range(9, 12))
    assert torch.equal(next(store.batches(64, seed=3, dtype=torch.bfloat16)), b[0].to(torch.bfloat16))


def test_ranks_are_disjoint_and_match_one_big_batch(data) -> None:
    store, x, _ = data
    parts = [list(store.batches(32, seed=1, rank=r, world_size=3, loop=False)) for r in range(3)]
    assert len({len(p) for p in parts}) == 1  # every rank the same number of steps
    keys = [set(k for b in p for k in as_keys(b, x)) for p in parts]
    assert not (keys[0] & keys[1]) and not (keys[0] & keys[2]) and not (keys[1] & keys[2])
    single = list(store.batches(96, seed=1, loop=False))
    assert len(single) == len(parts[0])
    for i, big in enumerate(single):
        assert set(as_keys(big, x)) == set().union(*(as_keys(p[i], x) for p in parts))
    val = [k for b in store.batches(8, split="val", loop=False) for k in as_keys(b, x)]
    assert set(val) <= set(store.split_rows("val").tolist()) and len(val) == len(set(val))


def test_bad_reads(data, tmp_path: Path) -> None:
    store, _, _ = data
    with pytest.raises(UserError, match="no capture point"):
        store.rows(0, 1, point="blocks.9.hook_mlp_out")
    with pytest.raises(UserError, match="fewer than one global batch"):
        next(store.batches(10_000))
    with pytest.raises(UserError, match="unknown split"):
        store.num_rows("test")
    with pytest.raises(UserError, match="does not exist"):
        open_store(tmp_path / "nope")
    with pytest.raises(UserError, match="not an activation store"):
        open_store(tmp_path)
    (tmp_path / fmt.PLAN).write_text("{}")
    with pytest.raises(UserError, match="incomplete"):
        open_store(tmp_path)


def test_disk_full_is_a_clear_error_and_commits_nothing_partial(tmp_path: Path, monkeypatch) -> None:
    x, meta = synthetic(300)
    calls = {"n": 0}
    real = fmt.atomic_save_npy

    def flaky(path: Path, arr: np.ndarray) -> None:
        calls["n"] += 1
        if calls["n"] == 8:  # the 3rd file of the 2nd shard
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, arr)

    monkeypatch.setattr(fmt, "atomic_save_npy", flaky)
    with pytest.raises(UserError, match="disk is full.*resumable"):
        write_store(tmp_path, x, meta, shard_rows=100)
    assert [s["name"] for s in fmt.committed_shards(tmp_path, 0)] == ["r0_000000"]
    assert not list(tmp_path.rglob("*.tmp"))
