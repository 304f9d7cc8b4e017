"""TensorSource: the activation store's reading interface over an in-memory tensor (synthetic data, tests).

Batching contract shared with `sae.activations.store.ActivationStore.batches` (docs/INTERFACES.md): rows of a split are put
in one seeded order per epoch; GLOBAL batch i is the rows [i*B*W, (i+1)*B*W) of that order (B = per-rank
batch_size, W = world_size) and rank r takes its r-th slice of B rows. So W ranks at batch B see exactly the rows
one rank sees at batch W*B, and `start_batch=i` resumes at global batch i.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import torch
from torch import Tensor

from llama.cli import UserError
from sae.activations.store import open_store


class TensorSource:
    def __init__(self, x: Tensor, val_fraction: float = 0.1, manifest: dict[str, Any] | None = None) -> None:
        if x.ndim != 2:
            raise UserError(f"TensorSource expects a [rows, d_model] tensor, got shape {tuple(x.shape)}")
        self.x = x
        self.n_val = int(round(x.shape[0] * val_fraction))
        self.manifest: dict[str, Any] = {"d_model": x.shape[1], "rows": x.shape[0], **(manifest or {})}

    @property
    def d_model(self) -> int:
        return self.x.shape[1]

    def __len__(self) -> int:
        return self.x.shape[0]

    def num_rows(self, split: str = "train") -> int:
        return self.n_val if split == "val" else len(self) - self.n_val if split == "train" else len(self)

    def _split(self, split: str) -> Tensor:
        if split not in ("train", "val"):
            raise UserError(f"split must be 'train' or 'val', got {split!r}")
        return self.x[len(self) - self.n_val:] if split == "val" else self.x[: len(self) - self.n_val]

    def batches(self, batch_size: int, *, split: str = "train", seed: int = 0, rank: int = 0, world_size: int = 1,
                dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", start_batch: int = 0,
                loop: bool = True, point: str | None = None) -> Iterator[Tensor]:
        data = self._split(split)
        gb = batch_size * world_size
        per_epoch = data.shape[0] // gb
        if per_epoch == 0:
            raise UserError(f"{split} split has {data.shape[0]} rows, fewer than one global batch of {gb}")
        i, order, order_epoch = start_batch, None, -1
        while True:
            epoch, j = divmod(i, per_epoch)
            if not loop and epoch > 0:
                return
            if epoch != order_epoch:
                g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
                order, order_epoch = torch.randperm(data.shape[0], generator=g), epoch
            rows = order[j * gb + rank * batch_size: j * gb + (rank + 1) * batch_size]
            yield data[rows].to(device=device, dtype=dtype)
            i += 1

    def rows(self, i0: int, i1: int, split: str | None = None, point: str | None = None) -> Tensor:
        return (self._split(split) if split else self.x)[i0:i1]


def open_source(path: str) -> Any:
    """--store: an activation store folder (sae.activations.store) or a .pt file holding one [rows, d_model] tensor."""
    if not path:
        raise UserError("--store is required: an activation store folder or a .pt tensor file")
    p = Path(path)
    if p.is_file() and p.suffix == ".pt":
        try:
            x = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001
            raise UserError(f"--store {p}: cannot read as a torch tensor file ({e})") from e
        if not isinstance(x, torch.Tensor):
            raise UserError(f"--store {p}: expected one [rows, d_model] tensor, got {type(x).__name__}")
        return TensorSource(x.float())
    if not p.is_dir():
        raise UserError(f"--store {p}: no such activation store folder or .pt file")
    return open_store(p)
