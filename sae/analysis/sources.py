"""Where top-contexts analysis reads activations from: an activation store, or text run through the model.

Both give chunks of consecutive rows in order (activations + token id + doc id + row index) and can re-read one
context (a run of rows of one doc) for the second, windows-only pass.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, NamedTuple

import numpy as np
import torch
from torch import Tensor

from llama.cli import UserError


class Chunk(NamedTuple):
    x: Tensor  # [T, d] float32 activations
    token_id: np.ndarray  # [T] int64
    doc_id: np.ndarray  # [T] int64
    ctx: np.ndarray  # [T] int64 context index within the document (sentence / window; 0 for --text)
    row: np.ndarray  # [T] int64 row index (store row, or a running index over the text's tokens)


class StoreSource:
    """Reads a store in order, `batch_rows` rows at a time (`store.rows`, `store.meta`)."""

    def __init__(self, store: Any, batch_rows: int = 8192, point: str | None = None, max_rows: int = 0,
                 device: str | torch.device = "cpu"):
        self.store, self.batch_rows, self.point, self.device = store, batch_rows, point, device
        self.n_rows = len(store) if max_rows <= 0 else min(len(store), max_rows)
        self.has_rows = True

    def __len__(self) -> int:
        return self.n_rows

    def _rows(self, i0: int, i1: int) -> Tensor:
        x = self.store.rows(i0, i1, point=self.point) if self.point else self.store.rows(i0, i1)
        return x.to(self.device, torch.float32)

    def __iter__(self) -> Iterator[Chunk]:
        for i0 in range(0, self.n_rows, self.batch_rows):
            i1 = min(i0 + self.batch_rows, self.n_rows)
            meta = self.store.meta(i0, i1)
            ctx = meta["ctx"] if "ctx" in meta else np.zeros(i1 - i0)
            yield Chunk(self._rows(i0, i1), np.asarray(meta["token_id"], dtype=np.int64),
                        np.asarray(meta["doc_id"], dtype=np.int64), np.asarray(ctx, dtype=np.int64),
                        np.arange(i0, i1, dtype=np.int64))

    def read_context(self, row0: int, length: int) -> tuple[Tensor, np.ndarray]:
        meta = self.store.meta(row0, row0 + length)
        return self._rows(row0, row0 + length), np.asarray(meta["token_id"], dtype=np.int64)


class TextSource:
    """One document per non-empty line of a text file, tokenized with BOS and run through the model (capture)."""

    def __init__(self, model: Any, tokenizer: Any, hook_name: str, path: str | Path, max_len: int = 256,
                 batch_docs: int = 16, max_rows: int = 0, device: str | torch.device = "cpu"):
        p = Path(path)
        if not p.is_file():
            raise UserError(f"--text {path}: file not found (expected a UTF-8 text file, one document per line)")
        if hook_name not in model.valid_points():
            raise UserError(f"the SAE's hook_name {hook_name!r} is not a capture point of the model; "
                            f"valid: {model.valid_points()[:6]}...")
        lines = [ln.strip() for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]
        if not lines:
            raise UserError(f"--text {path}: no non-empty lines")
        self.docs = [tokenizer.encode(ln, bos=True, eos=False)[:max_len] for ln in lines]
        if max_rows > 0:  # keep whole documents up to max_rows tokens
            keep = np.searchsorted(np.cumsum([len(d) for d in self.docs]), max_rows, side="right")
            self.docs = self.docs[:max(1, int(keep))]
        self.starts = np.concatenate([[0], np.cumsum([len(d) for d in self.docs])]).astype(np.int64)
        self.model, self.hook, self.batch_docs, self.device = model, hook_name, batch_docs, device
        self.n_rows = int(self.starts[-1])
        self.has_rows = False

    def __len__(self) -> int:
        return self.n_rows

    @torch.no_grad()
    def _acts(self, docs: list[list[int]]) -> list[Tensor]:
        t = max(len(d) for d in docs)
        tokens = torch.zeros(len(docs), t, dtype=torch.long)
        for i, d in enumerate(docs):
            tokens[i, :len(d)] = torch.tensor(d)
        out = self.model(tokens.to(self.device), capture=[self.hook], stop_early=True).activations[self.hook]
        return [out[i, :len(d)].float() for i, d in enumerate(docs)]  # right padding never affects causal rows

    def __iter__(self) -> Iterator[Chunk]:
        for b in range(0, len(self.docs), self.batch_docs):
            docs = self.docs[b:b + self.batch_docs]
            x = torch.cat(self._acts(docs))
            ids = np.concatenate([np.asarray(d, dtype=np.int64) for d in docs])
            doc = np.concatenate([np.full(len(d), b + i, dtype=np.int64) for i, d in enumerate(docs)])
            yield Chunk(x, ids, doc, np.zeros_like(doc), np.arange(self.starts[b], self.starts[b] + len(ids), dtype=np.int64))

    def read_context(self, row0: int, length: int) -> tuple[Tensor, np.ndarray]:
        i = int(np.searchsorted(self.starts, row0, side="right")) - 1
        off = row0 - int(self.starts[i])
        d = self.docs[i][off:off + length]
        return self._acts([d])[0], np.asarray(d, dtype=np.int64)
