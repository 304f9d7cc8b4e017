"""The real-model demo's offline corpus (sae/activations/offline_corpus.py): deterministic, held-out documents
disjoint from training ones and chosen by their own hash, optional sources skipped when missing, code documents
without the docstrings that the docs source already holds."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from llama.cli import UserError
from sae.activations.inputs import expand_inputs, iter_documents
from sae.activations.offline_corpus import (
    HELDOUT_MODULUS, build_offline_corpus, default_sources, html_text, write_corpus,
)

MODULE = '''"""Module doc: a small module for the corpus test."""


def add(a, b):
    """Add two numbers and return the sum of them."""
    total = a + b
    return total


class Box:
    """A box that holds one value for later."""

    def get(self):
        """Return the value held in the box."""
        return self.value
'''


def fake_stdlib(root: Path, texts: bool = True) -> Path:
    lib = root / "lib"
    for i in range(40):  # enough files that some fall in the code sample (1 in CODE_FILE_MODULUS by path hash)
        (lib / f"pkg{i % 4}").mkdir(parents=True, exist_ok=True)
        (lib / f"pkg{i % 4}" / f"mod{i}.py").write_text(MODULE.replace("two numbers", f"two numbers ({i})"))
    (lib / "test").mkdir()
    (lib / "test" / "test_x.py").write_text('"""A test module that must not be read at all."""\n')
    if texts:
        (lib / "idlelib").mkdir()
        (lib / "LICENSE.txt").write_text("A license paragraph with several words.\n\nAnother paragraph of the text.\n")
        (lib / "idlelib" / "help.html").write_text("<html><body><p>Help text in a paragraph here.</p><script>x = 1"
                                                   "</script><p>Second help paragraph &amp; more.</p></body></html>")
    return lib


def fake_licenses(root: Path) -> Path:
    d = root / "licenses"
    d.mkdir()
    (d / "GPL-3").write_text("The GNU General Public License is free.\n\nEveryone is permitted to copy it.\n")
    (d / "GPL").symlink_to(d / "GPL-3")  # Debian's aliases: the text is read once
    return d


def test_corpus_is_deterministic_and_split_by_each_documents_own_hash(tmp_path: Path) -> None:
    lib, lic = fake_stdlib(tmp_path), fake_licenses(tmp_path)
    a = build_offline_corpus(default_sources(lib, lic))
    b = build_offline_corpus(default_sources(lib, lic))
    assert a == b
    fa, fb = write_corpus(a, tmp_path / "a"), write_corpus(b, tmp_path / "b")
    for x, y in zip(fa, fb):
        assert x.read_bytes() == y.read_bytes()
    train = {d.text for d in a.train}
    held = {d.text for d in a.heldout}
    assert train and held and not train & held
    assert len(train) == len(a.train) and len(held) == len(a.heldout)  # deduplicated
    for doc in train | held:  # the split rule, recomputed independently
        h = int(hashlib.sha256(doc.encode()).hexdigest()[:8], 16)
        assert (doc in held) == (h % HELDOUT_MODULUS == 0)
    # what capture reads back is exactly the documents, one per line, in order
    assert list(iter_documents(expand_inputs([str(fa.train)]))) == [d.text for d in a.train]
    info = json.loads(fa.info.read_text())
    assert info["train_documents"] == len(a.train) and info["heldout_documents"] == len(a.heldout)
    assert {k: v["status"] for k, v in info["sources"].items()} == dict.fromkeys(
        ["cpython-docs", "cpython-code", "python-texts", "licenses"], "ok")
    assert sum(v["documents"] for v in info["sources"].values()) == info["documents"]


def test_sources_are_what_they_say(tmp_path: Path) -> None:
    lib, lic = fake_stdlib(tmp_path), fake_licenses(tmp_path)
    c = build_offline_corpus(default_sources(lib, lic))
    docs = c.train + c.heldout
    by = {s: [d.text for d in docs if d.source == s] for s in {d.source for d in docs}}
    assert "Add two numbers (3) and return the sum of them." in by["cpython-docs"]
    assert not any("must not be read" in d for d in by["cpython-docs"])  # test packages are left out
    code = by["cpython-code"]
    assert code and all("\n" in d for d in code)  # code keeps its lines ...
    assert any(d.startswith("def add(a, b):\n    total = a + b") for d in code)
    assert not any('"""' in d for d in code)  # ... but not its docstrings (they are cpython-docs documents)
    assert any(d.startswith("class Box:\n") and "    def get(self):\n        return self.value" in d for d in code)
    assert "Help text in a paragraph here." in by["python-texts"] and "x = 1" not in " ".join(by["python-texts"])
    assert "Second help paragraph & more." in by["python-texts"]
    assert by["licenses"].count("The GNU General Public License is free.") == 1  # symlinked alias read once


def test_missing_optional_sources_are_recorded_not_fatal(tmp_path: Path) -> None:
    lib = fake_stdlib(tmp_path, texts=False)
    c = build_offline_corpus(default_sources(lib, tmp_path / "no-such-licenses"))
    status = {k: v["status"] for k, v in c.info["sources"].items()}
    assert status["cpython-docs"] == "ok" and status["cpython-code"] == "ok"
    assert status["python-texts"].startswith("missing: ") and "LICENSE.txt" in status["python-texts"]
    assert status["licenses"] == f"missing: {tmp_path / 'no-such-licenses'} does not exist"
    assert {d.source for d in c.train + c.heldout} == {"cpython-docs", "cpython-code"}


def test_missing_required_source_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not a folder; expected the Python standard library"):
        build_offline_corpus(default_sources(tmp_path / "nowhere", tmp_path))


def test_html_text_keeps_paragraphs_and_drops_scripts() -> None:
    text = html_text("<h1>Title</h1><p>One <b>bold</b> word.</p><style>p {}</style><ul><li>item &lt;1&gt;</li></ul>")
    assert [p.strip() for p in text.split("\n\n") if p.strip()] == ["Title", "One bold word.", "item <1>"]


def test_real_corpus_holds_the_tiny_corpus_and_its_heldout_split() -> None:
    """On this machine's CPython: the tiny model's documents are all in, its held-out ones held out here too."""
    from llama.tiny.corpus import build_corpus
    tiny = build_corpus()
    c = build_offline_corpus()
    train, held = {d.text for d in c.train}, {d.text for d in c.heldout}
    assert set(tiny.heldout) <= held and set(tiny.train) <= train | held
    assert c.info["sources"]["cpython-docs"]["documents"] == len(tiny.train) + len(tiny.heldout)
    assert c.info["sources"]["cpython-code"]["documents"] > 100


def test_zen_alone_is_a_python_text_and_long_code_lines_are_cut(tmp_path: Path, monkeypatch) -> None:
    import codecs

    import sae.activations.offline_corpus as oc
    zen = "Beautiful is better than ugly.\n\nExplicit is better than implicit."
    (tmp_path / "this.py").write_text(f"s = {codecs.encode(zen, 'rot13')!r}\nprint(s)\n")
    assert list(oc.python_texts(tmp_path)) == ["Beautiful is better than ugly.", "Explicit is better than implicit."]
    long = tmp_path / "long.py"  # one function of a single line longer than MAX_CODE_CHARS
    long.write_text("def f(): return '" + "x" * oc.MAX_CODE_CHARS + "'\n")  # no line end to cut at
    monkeypatch.setattr(oc, "code_files", lambda stdlib: [long])
    (code,) = oc.cpython_code(tmp_path)
    assert len(code) <= oc.MAX_CODE_CHARS and code.startswith("def f():")
