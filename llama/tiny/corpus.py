"""The embedded tiny model's corpus: English documentation that ships with every CPython, so no download is needed.

    docs = build_corpus()               # CorpusSplit(train, heldout, info), deterministic for a given CPython
    docs.train[0]                       # one document: whitespace-normalised, a single line

Two sources, both part of CPython and under the PSF License:
  1. every docstring (module, class, function) of the standard library's .py files, found with `ast`, files in
     sorted order of their relative path, nodes in `ast.walk` order; test packages and site-packages are left out;
  2. the prose paragraphs of `pydoc_data.topics` (the language-reference text that `help("assignment")` shows),
     topics in sorted order; indented paragraphs (grammar and code blocks) and heading rules are left out.
Each document is normalised (any whitespace run -> one space), kept when it has at least MIN_WORDS words, and
deduplicated (first occurrence wins). A document goes to the held-out split when the first 8 hex digits of its
sha256 are 0 modulo HELDOUT_MODULUS, so the split of a document never depends on the rest of the corpus.

Another Python version ships other docstrings, hence another corpus: `info["sha256"]` identifies it exactly.
"""
from __future__ import annotations

import ast
import hashlib
import re
import sys
import sysconfig
from pathlib import Path
from typing import Iterator, NamedTuple

from llama.cli import UserError

EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})
MIN_WORDS = 3
HELDOUT_MODULUS = 20  # ~5% of documents are held out
SOURCE = ("CPython standard library docstrings (Lib/**/*.py via ast, tests excluded) + pydoc_data.topics prose "
          "paragraphs; Python Software Foundation License")


class CorpusSplit(NamedTuple):
    train: list[str]
    heldout: list[str]
    info: dict  # source, python version, counts, sha256 of each split


def normalise(text: str) -> str:
    return " ".join(text.split())


def stdlib_files(stdlib: Path) -> list[Path]:
    """The standard library's .py files in sorted order of their relative posix path, test packages excluded."""
    files = [p for p in stdlib.rglob("*.py") if not EXCLUDED_DIRS.intersection(p.relative_to(stdlib).parts)]
    return sorted(files, key=lambda p: p.relative_to(stdlib).as_posix())


def docstrings(source: bytes) -> Iterator[str]:
    """Docstrings of the module and of every class and function in it, in ast.walk order (cleaned as by inspect)."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                yield doc


def topic_paragraphs(topics: dict[str, str]) -> Iterator[str]:
    """Prose paragraphs of pydoc's topic texts: skip indented blocks (code, grammar) and heading underlines."""
    for name in sorted(topics):
        for para in re.split(r"\n[ \t]*\n", topics[name]):
            lines = [ln for ln in para.split("\n") if ln.strip()]
            if not lines or lines[0][:1].isspace():
                continue
            lines = [ln for ln in lines if not re.fullmatch(r"\s*([*=\-^~])\1{2,}\s*", ln)]
            if lines:
                yield "\n".join(lines)


def is_heldout(doc: str, modulus: int = HELDOUT_MODULUS) -> bool:
    """Held out when the first 8 hex digits of the document's sha256 are 0 modulo `modulus`."""
    return int(hashlib.sha256(doc.encode("utf-8")).hexdigest()[:8], 16) % modulus == 0


def sha256_lines(docs: list[str]) -> str:
    """The hash recorded for a split: sha256 of its documents, one per line, UTF-8, each line ending in \\n."""
    return hashlib.sha256("".join(d + "\n" for d in docs).encode("utf-8")).hexdigest()


def build_corpus(stdlib: str | Path | None = None) -> CorpusSplit:
    """Extract, normalise, deduplicate and split the corpus of the running (or the given) CPython's stdlib."""
    root = Path(stdlib or sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise UserError(f"{root}: not a folder; expected the Python standard library (Lib/)")
    raw: list[str] = []
    n_files = n_unparsable = 0
    for path in stdlib_files(root):
        n_files += 1
        try:
            raw.extend(docstrings(path.read_bytes()))
        except (SyntaxError, ValueError, UnicodeDecodeError, OSError):
            n_unparsable += 1  # e.g. a deliberately broken file; it contributes nothing
    n_docstrings = len(raw)
    try:
        from pydoc_data.topics import topics
    except ImportError:  # pragma: no cover - every CPython ships it
        topics = {}
    raw.extend(topic_paragraphs(topics))
    info = {
        "source": SOURCE,
        "python_version": sys.version.split()[0],
        "stdlib_files": n_files,
        "unparsable_files": n_unparsable,
        "docstrings": n_docstrings,
        "topic_paragraphs": len(raw) - n_docstrings,
    }
    return split_documents(raw, info, where=str(root))


def corpus_from_file(path: str | Path) -> CorpusSplit:
    """Your own corpus instead of the stdlib's: a UTF-8 text file, one document per line, split the same way."""
    return split_documents(read_documents(path), {"source": f"text file {Path(path).name}"}, where=str(path))


def split_documents(raw: list[str], info: dict, where: str) -> CorpusSplit:
    """Normalise, drop documents under MIN_WORDS words, deduplicate (first wins), split by hash; count and hash."""
    seen: dict[str, None] = {}
    for doc in map(normalise, raw):
        if len(doc.split()) >= MIN_WORDS:
            seen.setdefault(doc, None)
    docs = list(seen)
    train = [d for d in docs if not is_heldout(d)]
    heldout = [d for d in docs if is_heldout(d)]
    if not train or not heldout:
        raise UserError(f"{where}: {len(docs)} documents of >= {MIN_WORDS} words give {len(train)} train and "
                        f"{len(heldout)} held-out documents; expected some of each (use a larger corpus)")
    info = {
        **info,
        "documents": len(docs),
        "train_documents": len(train),
        "heldout_documents": len(heldout),
        "train_chars": sum(map(len, train)),
        "heldout_chars": sum(map(len, heldout)),
        "sha256": sha256_lines(docs),
        "train_sha256": sha256_lines(train),
        "heldout_sha256": sha256_lines(heldout),
    }
    return CorpusSplit(train, heldout, info)


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer and token stream


CHAT_CONTROL_SYMBOLS = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>")


def train_sentencepiece(docs: list[str], vocab_size: int, where: str = "corpus") -> bytes:
    """A Llama-2-style SentencePiece BPE (byte fallback, digits split, no normalisation) trained on `docs`;
    returns the serialised model. One thread and no sampling: the same documents give the same bytes.
    The chat headers are control symbols (never produced from text) so `llama.ChatFormat` accepts the tokenizer."""
    import io

    import sentencepiece as spm

    buf = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(docs), model_writer=buf, model_type="bpe", vocab_size=vocab_size,
            byte_fallback=True, split_digits=True, character_coverage=0.9995, normalization_rule_name="identity",
            remove_extra_whitespaces=False, max_sentence_length=1 << 16, input_sentence_size=0,
            shuffle_input_sentence=False, num_threads=1, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
            control_symbols=list(CHAT_CONTROL_SYMBOLS), minloglevel=2)
    except RuntimeError as e:  # e.g. a vocabulary larger than the corpus can fill
        raise UserError(f"{where}: sentencepiece training failed with vocab_size={vocab_size} on {len(docs)} "
                        f"documents (use a larger corpus or a smaller --vocab-size): {e}") from None
    return buf.getvalue()


def token_stream(sp: "object", docs: list[str]) -> list[int]:
    """Documents as one token stream, each as BOS, its tokens, EOS (how the model sees text in training)."""
    bos, eos = sp.bos_id(), sp.eos_id()  # type: ignore[attr-defined]
    out: list[int] = []
    for ids in sp.encode(docs):  # type: ignore[attr-defined]
        out.append(bos)
        out.extend(ids)
        out.append(eos)
    return out


def read_documents(path: str | Path) -> list[str]:
    """A text file, one document per line (blank lines skipped), as normalised documents."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{p}: cannot read corpus file (expected UTF-8 text, one document per line): {e}") from None
    docs = [normalise(line) for line in text.splitlines()]
    docs = [d for d in docs if d]
    if not docs:
        raise UserError(f"{p}: no documents (expected UTF-8 text, one document per line)")
    return docs
