"""From documents to padded, length-packed token batches: the deterministic row stream of a capture.

    contexts = make_contexts(text, tok, mode="sentences", ctx_len=64, bos=True)     # list of token-id lists
    for batch in plan_batches(docs, tok, spec, rank=0, world_size=1): ...

Document i goes to rank i % world_size. Each rank reads its documents in order, cuts them into contexts
(sentences, or fixed windows of tokens), gathers `pack_contexts` contexts (or `pack_tokens` tokens), sorts them
by length (longest first, ties in reading order) and cuts the sorted list into batches holding at most `batch_tokens` padded tokens, so
contexts of similar length share a batch and little compute goes to padding. Everything here is a pure function
of the inputs and the spec, so a rerun produces the same batches with the same row counts: that is what lets a
resumed capture skip the batches whose rows are already on disk without running the model on them.

Rows of a batch: every position t < len(b) of context b, b-major, except the attention sinks unless `keep_bos`:
position 0 (BOS or not, the first token is where attention parks) and any BOS/EOS token; their residual norms
are ~100x the median (measured on SmolLM2), so they stay out of SAE data. Padding positions are never rows.
`min_pos` > 1 drops the first min_pos positions of every context (SmolLM2 turns a delimiter at position 1 into a
second sink, ~150x the median norm).
"""
from __future__ import annotations

import queue
import threading
from typing import Callable, Iterable, Iterator, NamedTuple, Sequence, TypeVar

import numpy as np
import torch

from sae.activations.sentences import split_sentences

T = TypeVar("T")


class PackSpec(NamedTuple):
    mode: str = "sentences"  # "sentences" | "windows"
    ctx_len: int = 64  # max tokens per context, BOS included
    bos: bool = True
    keep_bos: bool = False  # keep the attention-sink rows (position 0, BOS/EOS tokens)
    batch_tokens: int = 4096  # padded tokens per batch (B * T_max)
    max_batch: int = 256
    pack_contexts: int = 8192  # contexts sorted together by length (more: less padding, more memory)
    pack_tokens: int = 1 << 20  # ... or fewer, once they hold this many tokens (bounds memory for long windows)
    min_pos: int = 0  # also drop positions < this (2: SmolLM2's position-1 sinks)


class Batch(NamedTuple):
    tokens: torch.Tensor  # [B, T] long, right-padded with 0
    mask: torch.Tensor  # [B, T] bool: positions stored as rows
    token_id: np.ndarray  # [n] per row
    doc_id: np.ndarray  # [n]
    ctx: np.ndarray  # [n] context index within its document
    pos: np.ndarray  # [n] position within the context
    row_start: int  # index of this batch's first row in the rank's row stream
    docs_done: float  # this batch's share of its chunk's documents, by rows (for the progress bar)

    @property
    def n_rows(self) -> int:
        return len(self.token_id)


def make_contexts(text: str, tok, mode: str, ctx_len: int, bos: bool) -> list[list[int]]:
    """Cut one document into contexts of at most ctx_len tokens (a long sentence becomes several contexts)."""
    room = ctx_len - int(bos)
    pieces = [tok.encode(s, bos=False, eos=False) for s in split_sentences(text)] if mode == "sentences" \
        else [tok.encode(text, bos=False, eos=False)]
    out = []
    for ids in pieces:
        for i in range(0, len(ids), room):
            out.append(([tok.bos_id] if bos else []) + ids[i:i + room])
    return out


def _pack(items: list[tuple[int, int, list[int]]], spec: PackSpec,
          tie: np.ndarray | None = None) -> list[list[tuple[int, int, list[int]]]]:
    tie = np.arange(len(items)) if tie is None else tie  # among equal lengths: reading order, or a random one
    order = sorted(range(len(items)), key=lambda i: (-len(items[i][2]), tie[i]))
    batches, cur = [], []
    for i in order:
        longest = len(items[cur[0]][2]) if cur else len(items[i][2])
        if cur and ((len(cur) + 1) * longest > spec.batch_tokens or len(cur) >= spec.max_batch):
            batches.append(cur)
            cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    return [[items[i] for i in b] for b in batches]


def _to_batch(group: list[tuple[int, int, list[int]]], skip: int, row_start: int, docs_done: int,
              sinks: np.ndarray | None = None) -> Batch:
    lengths = np.array([len(ids) for _, _, ids in group])
    B, T = len(group), int(lengths.max())
    tokens = np.zeros((B, T), np.int64)
    for b, (_, _, ids) in enumerate(group):
        tokens[b, :len(ids)] = ids
    t = np.arange(T)
    mask = (t[None, :] < lengths[:, None]) & (t[None, :] >= skip)  # row-major, like acts[mask] on [B, T, D]
    if sinks is not None and len(sinks):
        mask &= ~np.isin(tokens, sinks)  # BOS/EOS tokens past position 0 are attention sinks too
    per_ctx = mask.sum(1)
    return Batch(torch.from_numpy(tokens), torch.from_numpy(mask), tokens[mask].astype(np.int32),
                 np.repeat(np.array([d for d, _, _ in group], np.int64), per_ctx),
                 np.repeat(np.array([c for _, c, _ in group], np.int32), per_ctx),
                 np.broadcast_to(t, (B, T))[mask].astype(np.int32), row_start, docs_done)


SINK_NAMES = ("<|begin_of_text|>", "<|end_of_text|>", "<|endoftext|>", "<s>", "</s>")


def sink_token_ids(tokenizer) -> set[int]:
    """Token ids that are attention sinks wherever they occur: the tokenizer's BOS / EOS ids and its
    end-of-text-like specials (<|endoftext|> is SmolLM2's sink). Never training rows; never spliced (sae.evaluate)."""
    specials = getattr(tokenizer, "special_tokens", None) or {}
    ids = {getattr(tokenizer, "bos_id", -1), getattr(tokenizer, "eos_id", -1)}
    ids |= {specials[name] for name in SINK_NAMES if name in specials}
    return {int(i) for i in ids if i is not None and int(i) >= 0}


def plan_batches(docs: Iterable[str], tok, spec: PackSpec, rank: int = 0, world_size: int = 1,
                 max_docs: int = 0, keep: Callable[[int], bool] | None = None,
                 shuffle: Sequence[int] | None = None) -> Iterator[Batch]:
    """The rank's batches, in order, with the running row offset. `docs` is the full document stream; `keep`
    (doc_id -> bool) leaves documents out (a held-out split) without changing the ids of the others.
    shuffle (seed words): the same batches of each chunk's contexts except that contexts of equal length are
    packed in a seeded random order and the chunk's batches come out in a seeded random order (store-free
    training mixes documents so); None: capture's order (longest first, ties in reading order)."""
    skip = max(0 if spec.keep_bos else 1, spec.min_pos)
    sinks = None if spec.keep_bos else np.array(sorted(sink_token_ids(tok)), np.int64)
    row, items, docs_in_chunk, buffered = 0, [], 0, 0

    chunk = 0

    def flush() -> Iterator[Batch]:
        nonlocal row, items, docs_in_chunk, chunk
        if shuffle is None:
            groups = _pack(items, spec)
        else:
            rng = np.random.default_rng([*shuffle, chunk])
            groups = _pack(items, spec, rng.permutation(len(items)))
            groups = [groups[i] for i in rng.permutation(len(groups))]
        chunk += 1
        total = sum(len(ids) - skip for _, _, ids in items)
        shown = 0.0
        for k, g in enumerate(groups):
            share = docs_in_chunk - shown if k == len(groups) - 1 else \
                docs_in_chunk * sum(len(ids) - skip for _, _, ids in g) / total
            shown += share
            b = _to_batch(g, skip, row, share, sinks)
            row += b.n_rows
            yield b
        items, docs_in_chunk = [], 0

    for doc_id, text in enumerate(docs):
        if max_docs and doc_id >= max_docs:
            break
        if doc_id % world_size != rank or (keep is not None and not keep(doc_id)):
            continue
        docs_in_chunk += 1
        for c, ids in enumerate(make_contexts(text, tok, spec.mode, spec.ctx_len, spec.bos)):
            if len(ids) > skip:
                items.append((doc_id, c, ids))
                buffered += len(ids)
        if len(items) >= spec.pack_contexts or buffered >= spec.pack_tokens:
            buffered = 0
            yield from flush()
    if items or docs_in_chunk:
        if items:
            yield from flush()
        else:  # trailing documents without rows: still report them done
            yield Batch(torch.zeros(0, 0, dtype=torch.long), torch.zeros(0, 0, dtype=torch.bool),
                        *(np.zeros(0, dt) for dt in (np.int32, np.int64, np.int32, np.int32)), row, docs_in_chunk)


def prefetch(it: Iterator[T], depth: int = 4) -> Iterator[T]:
    """Run an iterator on a background thread, `depth` items ahead (tokenizing overlaps the forward)."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    end = object()
    stop = threading.Event()

    def put(x: object) -> bool:
        while not stop.is_set():  # never block forever on a consumer that went away
            try:
                q.put(x, timeout=0.2)
                return True
            except queue.Full:
                pass
        return False

    def work() -> None:
        try:
            for x in it:
                if not put(x):
                    return
            put(end)
        except BaseException as e:  # handed to the consumer
            put(e)

    thread = threading.Thread(target=work, name="batch-loader", daemon=True)
    thread.start()
    try:
        while True:
            x = q.get()
            if x is end:
                return
            if isinstance(x, BaseException):
                raise x
            yield x
    finally:
        stop.set()
