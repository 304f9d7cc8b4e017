"""An offline text corpus for a real model's SAE: what ships with Python and the OS, written as jsonl inputs.

    corpus = build_offline_corpus()                     # OfflineCorpus(train, heldout, info), deterministic
    files = write_corpus(corpus, "runs/smollm2/corpus")  # train.jsonl, heldout.jsonl, corpus.json

Sources, in this order (a document seen in an earlier source wins the deduplication):
  cpython-docs   the embedded tiny model's corpus (llama/tiny/corpus.py): every stdlib docstring + pydoc topics
                 prose (required: every CPython has them)
  cpython-code   stdlib source code: each top-level function and class (its docstrings cut out, so no text of
                 cpython-docs comes back inside code) of the files whose path hash falls in 1/CODE_FILE_MODULUS
  python-texts   text files CPython installs beside its stdlib: LICENSE.txt, IDLE's NEWS / HISTORY / README ...
                 and IDLE's help.html as text, plus the Zen of Python (`this`); a python.org, pyenv or Docker
                 `python` build has them, Debian's system python3 keeps them in other packages (idle, python3-doc)
  licenses       /usr/share/common-licenses (Debian's base-files: every Debian and Ubuntu has it; absent on
                 Alpine, Fedora, macOS)
An optional source that is missing (or unreadable) is skipped and recorded in `info["sources"][name]["status"]`;
the corpus is then smaller, never an error. Text files are cut into paragraphs at blank lines. Prose is
whitespace-normalised as the tiny corpus is; code keeps its lines and indentation. Documents under MIN_WORDS words
are dropped, duplicates too (first wins). A document is held out when the first 8 hex digits of its sha256 are 0
modulo HELDOUT_MODULUS (10%; the tiny corpus's held-out 5%, modulo 20, is a subset), so its split never depends on
the rest of the corpus. The corpus depends on the Python version and the OS files: `info` hashes every split.
"""
from __future__ import annotations

import ast
import codecs
import hashlib
import html.parser
import json
import re
import sysconfig
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

from llama.cli import UserError, atomic_write, atomic_write_json
from llama.tiny.corpus import MIN_WORDS, build_corpus, is_heldout, normalise, sha256_lines, stdlib_files

HELDOUT_MODULUS = 10
CODE_FILE_MODULUS = 12  # ~1/12 of the stdlib's files give code documents (~150k SmolLM2 tokens on CPython 3.11)
MAX_CODE_CHARS = 4000  # a longer function or class is cut at a line boundary below this
LICENSES_DIR = Path("/usr/share/common-licenses")
PYTHON_TEXT_FILES = ("LICENSE.txt", "idlelib/NEWS.txt", "idlelib/NEWS2x.txt", "idlelib/HISTORY.txt",
                     "idlelib/README.txt", "idlelib/CREDITS.txt", "idlelib/TODO.txt", "idlelib/extend.txt")
SOURCES = ("cpython-docs", "cpython-code", "python-texts", "licenses")


class Doc(NamedTuple):
    text: str
    source: str


class OfflineCorpus(NamedTuple):
    train: list[Doc]
    heldout: list[Doc]
    info: dict  # per source: status, documents, chars; totals and sha256 of each split


class SourceMissing(Exception):
    """An optional source is not on this machine (the message says what was looked for)."""


def paragraphs(text: str) -> Iterator[str]:
    """Blank-line-separated paragraphs, whitespace-normalised."""
    for para in re.split(r"\n[ \t]*\n", text.replace("\r\n", "\n")):
        if para.strip():
            yield normalise(para)


class _HTMLText(html.parser.HTMLParser):
    """Visible text of an HTML page, a paragraph break at every block element; <script>/<style> dropped."""
    BLOCKS = frozenset("p div li dt dd h1 h2 h3 h4 h5 h6 pre table tr br section blockquote".split())

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skip = 0

    def handle_starttag(self, tag: str, attrs: object) -> None:
        self.skip += tag in ("script", "style")
        if tag in self.BLOCKS:
            self.parts.append("\n\n")

    def handle_endtag(self, tag: str) -> None:
        self.skip -= tag in ("script", "style") and self.skip > 0
        if tag in self.BLOCKS:
            self.parts.append("\n\n")

    def handle_data(self, data: str) -> None:
        if not self.skip:
            self.parts.append(data)


def html_text(source: str) -> str:
    p = _HTMLText()
    p.feed(source)
    p.close()
    return "".join(p.parts)


# --- the sources: each returns raw documents or raises SourceMissing ------------------------------------------

def cpython_docs(stdlib: Path) -> list[str]:
    split = build_corpus(stdlib)
    return split.train + split.heldout


def _strip_docstrings(node: ast.AST, lines: list[str]) -> str:
    """The source lines of a top-level def/class with the docstring lines of it and its members removed."""
    drop: set[int] = set()
    for sub in ast.walk(node):
        if isinstance(sub, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and sub.body:
            first = sub.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and \
                    isinstance(first.value.value, str):
                drop.update(range(first.lineno, (first.end_lineno or first.lineno) + 1))
    start = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
    kept = [lines[i - 1] for i in range(start, (node.end_lineno or node.lineno) + 1) if i not in drop]
    return "\n".join(kept)


def code_files(stdlib: Path) -> list[Path]:
    """The sampled stdlib files (path hash in 1/CODE_FILE_MODULUS), in tiny-corpus order."""
    return [p for p in stdlib_files(stdlib) if int(hashlib.sha256(p.relative_to(stdlib).as_posix().encode())
                                                   .hexdigest()[:8], 16) % CODE_FILE_MODULUS == 0]


def cpython_code(stdlib: Path) -> list[str]:
    out = []
    for path in code_files(stdlib):
        try:
            text = path.read_text(encoding="utf-8")
            tree = ast.parse(text)
        except (SyntaxError, ValueError, UnicodeDecodeError, OSError):
            continue
        lines = text.splitlines()
        for node in tree.body:
            if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                code = _strip_docstrings(node, lines).rstrip()
                if len(code) > MAX_CODE_CHARS:
                    cut = code.rfind("\n", 0, MAX_CODE_CHARS)
                    code = code[:cut if cut > 0 else MAX_CODE_CHARS]
                out.append(code)
    return out


def python_texts(stdlib: Path) -> list[str]:
    docs: list[str] = []
    found = []
    for name in PYTHON_TEXT_FILES:
        p = stdlib / name
        if p.is_file():
            docs += paragraphs(p.read_text(encoding="utf-8", errors="replace"))
            found.append(name)
    help_html = stdlib / "idlelib" / "help.html"
    if help_html.is_file():
        docs += paragraphs(html_text(help_html.read_text(encoding="utf-8", errors="replace")))
        found.append("idlelib/help.html")
    zen = stdlib / "this.py"  # the Zen of Python, rot13 in `this.s` (read, not imported: import prints it)
    if zen.is_file():
        for node in ast.parse(zen.read_bytes()).body:
            if isinstance(node, ast.Assign) and [getattr(t, "id", "") for t in node.targets] == ["s"] \
                    and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
                docs += paragraphs(codecs.decode(node.value.value, "rot13"))
                found.append("this.py")
    if not found:
        raise SourceMissing(f"none of {', '.join(PYTHON_TEXT_FILES)}, idlelib/help.html or this.py under {stdlib}")
    return docs


def licenses(folder: Path = LICENSES_DIR) -> list[str]:
    if not folder.is_dir():
        raise SourceMissing(f"{folder} does not exist")
    files: dict[Path, None] = {}
    for p in sorted(folder.iterdir()):  # GPL -> GPL-3 etc. are symlinks: each text once
        if p.resolve().is_file():
            files.setdefault(p.resolve(), None)
    if not files:
        raise SourceMissing(f"{folder} holds no files")
    return [para for p in files for para in paragraphs(p.read_text(encoding="utf-8", errors="replace"))]


def default_sources(stdlib: Path | None = None, licenses_dir: Path = LICENSES_DIR) -> dict[str, Callable[[], list[str]]]:
    lib = Path(stdlib or sysconfig.get_paths()["stdlib"])
    return {"cpython-docs": lambda: cpython_docs(lib), "cpython-code": lambda: cpython_code(lib),
            "python-texts": lambda: python_texts(lib), "licenses": lambda: licenses(licenses_dir)}


def build_offline_corpus(sources: dict[str, Callable[[], list[str]]] | None = None,
                         required: tuple[str, ...] = ("cpython-docs",)) -> OfflineCorpus:
    """Read every source (an optional one that is missing is recorded and skipped), deduplicate, split by hash."""
    sources = default_sources() if sources is None else sources
    seen: dict[str, str] = {}
    info: dict = {"sources": {}}
    for name, read in sources.items():
        try:
            raw = read()
        except (SourceMissing, OSError) as e:
            if name in required:
                raise UserError(f"corpus source {name} is required but missing: {e}") from None
            info["sources"][name] = {"status": f"missing: {e}", "documents": 0, "chars": 0}
            continue
        n = chars = 0
        for doc in raw:
            doc = doc.strip("\n") if name == "cpython-code" else normalise(doc)
            if len(doc.split()) >= MIN_WORDS and doc not in seen:
                seen[doc] = name
                n += 1
                chars += len(doc)
        info["sources"][name] = {"status": "ok", "documents": n, "chars": chars}
    docs = [Doc(t, s) for t, s in seen.items()]
    held = [is_heldout(d.text, HELDOUT_MODULUS) for d in docs]
    train = [d for d, h in zip(docs, held) if not h]
    heldout = [d for d, h in zip(docs, held) if h]
    if not train or not heldout:
        raise UserError(f"the offline corpus has {len(train)} training and {len(heldout)} held-out documents; "
                        "expected some of each")
    info.update(documents=len(docs), train_documents=len(train), heldout_documents=len(heldout),
                train_chars=sum(len(d.text) for d in train), heldout_chars=sum(len(d.text) for d in heldout),
                train_sha256=sha256_lines([json.dumps(d.text) for d in train]),
                heldout_sha256=sha256_lines([json.dumps(d.text) for d in heldout]))
    return OfflineCorpus(train, heldout, info)


class CorpusFiles(NamedTuple):
    train: Path
    heldout: Path
    info: Path


def _write_jsonl(path: Path, docs: list[Doc]) -> None:
    atomic_write(path, lambda fh: fh.write("".join(json.dumps({"text": d.text, "source": d.source},
                                                              ensure_ascii=False) + "\n" for d in docs).encode()))


def write_corpus(corpus: OfflineCorpus, folder: str | Path) -> CorpusFiles:
    """FOLDER/train.jsonl and FOLDER/heldout.jsonl ({"text", "source"} per line) and FOLDER/corpus.json (info)."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    files = CorpusFiles(out / "train.jsonl", out / "heldout.jsonl", out / "corpus.json")
    _write_jsonl(files.train, corpus.train)
    _write_jsonl(files.heldout, corpus.heldout)
    atomic_write_json(files.info, corpus.info)
    return files
