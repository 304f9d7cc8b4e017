"""Text inputs for capture: files, folders and globs of .txt / .jsonl / .parquet, read as a stream of documents.

    files = expand_inputs(["data/", "more/*.jsonl"])          # sorted, de-duplicated, validated
    for text in iter_documents(files, txt_docs="lines", text_field="text", skipped=counts): ...

The document order is deterministic (files in the given order, folders and globs sorted), which is what makes a
capture resumable and splittable across ranks: document i is the i-th non-empty document of this stream.
Bad records never crash the run: undecodable bytes, non-JSON lines and records without the text field are skipped
and counted in `skipped`; a missing input, an unsupported suffix or an input with no documents is a UserError.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
from collections import Counter
from pathlib import Path
from typing import Iterator

from llama.cli import UserError, repo_path

SUFFIXES = (".txt", ".jsonl", ".parquet")


def expand_inputs(inputs: list[str]) -> list[Path]:
    """Each input is a file, a folder (searched recursively for supported files) or a glob pattern."""
    if not inputs:
        raise UserError("no --inputs given: expected .txt/.jsonl/.parquet files, folders or glob patterns")
    files: list[Path] = []
    for item in inputs:
        p = repo_path(item)  # weights/tiny/heldout.txt from any folder
        if p.is_dir():
            found = sorted(q for q in p.rglob("*") if q.is_file() and q.suffix in SUFFIXES)
            if not found:
                raise UserError(f"input folder {item} holds no {'/'.join(SUFFIXES)} files")
            files += found
        elif p.is_file():
            if p.suffix not in SUFFIXES:
                raise UserError(f"input {item}: unsupported file type {p.suffix or '(none)'!r}; "
                                f"expected one of {', '.join(SUFFIXES)}")
            if p.stat().st_size == 0:
                raise UserError(f"input {item} is empty (0 bytes)")
            files.append(p)
        elif glob.has_magic(item):
            found = sorted(Path(q) for q in glob.glob(item, recursive=True) if Path(q).suffix in SUFFIXES
                           and Path(q).is_file())
            if not found:
                raise UserError(f"input pattern {item!r} matches no {'/'.join(SUFFIXES)} files")
            files += found
        else:
            raise UserError(f"input {item} does not exist (expected a file, a folder or a glob pattern)")
    unique: dict[Path, Path] = {}  # the same file named twice (a folder and a glob) is read once
    for f in files:
        unique.setdefault(f.resolve(), f)
    return list(unique.values())


def _txt_documents(path: Path, txt_docs: str, skipped: Counter) -> Iterator[str]:
    if txt_docs == "file":
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            skipped["undecodable"] += 1
            return
        if text.strip():
            yield text.strip()
        return
    with open(path, "rb") as fh:
        for raw in fh:
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError:
                skipped["undecodable"] += 1
                continue
            if line:
                yield line


def _jsonl_documents(path: Path, text_field: str, skipped: Counter) -> Iterator[str]:
    with open(path, "rb") as fh:
        for raw in fh:
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError:
                skipped["undecodable"] += 1
                continue
            except json.JSONDecodeError:
                skipped["bad_json"] += 1
                continue
            text = obj.get(text_field) if isinstance(obj, dict) else None
            if not isinstance(text, str):
                skipped["no_text_field"] += 1
                continue
            if text.strip():
                yield text.strip()


def _parquet_documents(path: Path, text_field: str, skipped: Counter) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise UserError(f"reading {path} needs pyarrow (pip install pyarrow), which is not installed") from e
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a corrupt file
        raise UserError(f"{path}: not a readable parquet file ({e})") from e
    if text_field not in pf.schema_arrow.names:
        raise UserError(f"{path}: no column {text_field!r} (columns: {', '.join(pf.schema_arrow.names)}); "
                        f"pick one with --text-field")
    for batch in pf.iter_batches(columns=[text_field], batch_size=4096):
        for text in batch.column(0).to_pylist():
            if not isinstance(text, str):
                skipped["no_text_field"] += 1
            elif text.strip():
                yield text.strip()


def iter_file(path: Path, txt_docs: str = "lines", text_field: str = "text",
              skipped: Counter | None = None) -> Iterator[str]:
    skipped = Counter() if skipped is None else skipped
    if path.suffix == ".txt":
        yield from _txt_documents(path, txt_docs, skipped)
    elif path.suffix == ".jsonl":
        yield from _jsonl_documents(path, text_field, skipped)
    elif path.suffix == ".parquet":
        yield from _parquet_documents(path, text_field, skipped)
    else:
        raise UserError(f"input {path}: unsupported file type {path.suffix!r}; expected one of {', '.join(SUFFIXES)}")


def iter_documents(files: list[Path], txt_docs: str = "lines", text_field: str = "text",
                   skipped: Counter | None = None) -> Iterator[str]:
    """All non-empty documents of all files, in order. Skipped records are counted in `skipped`."""
    for f in files:
        yield from iter_file(f, txt_docs, text_field, skipped)


def count_documents(files: list[Path], txt_docs: str = "lines", text_field: str = "text") -> tuple[int, Counter]:
    """One cheap pass (no tokenizing): the number of documents, and what was skipped. Errors on no documents."""
    skipped: Counter = Counter()
    n = 0
    for f in files:
        before = n
        for _ in iter_file(f, txt_docs, text_field, skipped):
            n += 1
        if n == before and len(files) == 1:
            raise UserError(f"input {f} holds no documents ({dict(skipped) or 'only blank lines'}); expected UTF-8 "
                            + ("JSON lines with a string field " + repr(text_field) if f.suffix == ".jsonl"
                               else "text"))
    if n == 0:
        raise UserError(f"the inputs ({', '.join(map(str, files))}) hold no documents ({dict(skipped) or 'all blank'})")
    return n, skipped


def file_fingerprint(path: Path, edge: int = 1 << 20) -> dict:
    """Name, size and a hash of the first and last MiB: enough to notice that an input changed between runs."""
    size = path.stat().st_size
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        h.update(fh.read(edge))
        if size > edge:
            fh.seek(max(edge, size - edge))
            h.update(fh.read(edge))
    return {"path": os.path.abspath(path), "bytes": size, "sha256_edges": h.hexdigest()}
