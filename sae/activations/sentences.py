"""A small rule-based English sentence splitter (no NLTK): good enough to cut documents into SAE contexts.

    split_sentences('Dr. Smith paid $3.50 for it. "Really?" she asked... then left. Wait... Why?')
    -> ['Dr. Smith paid $3.50 for it.', '"Really?" she asked... then left.', 'Wait...', 'Why?']

A sentence ends at `.`, `!`, `?` or an ellipsis (`...` / `…`), plus any closing quotes or brackets, when what
follows is whitespace and then something that can start a sentence (an upper-case letter, a digit, an opening
quote or bracket). It does not end after
  - a known abbreviation (Mr. Dr. St. e.g. i.e. etc. vs. Fig. No. Jan. ...), or a single initial ("J. R. Smith"),
  - a dotted acronym ("U.S. Army"),
  - a decimal or version number ("3.14", "v1.2.3": no whitespace follows the dot),
  - an ellipsis followed by a lower-case word ("wait... what").
Known limitation: an abbreviation that really ends a sentence ("...in Jan. The Fed") keeps it going.
A blank line (paragraph break) always ends a sentence. Sentences keep their inner whitespace; leading and
trailing whitespace is stripped and empty pieces are dropped.
"""
from __future__ import annotations

import re

ABBREVIATIONS = frozenset("""
mr mrs ms dr prof sr jr st mt ft rev gen col lt sgt capt cmdr gov sen rep pres hon
e.g i.e etc vs cf al approx dept est fig figs no nos vol vols ch sec pp p eq eqs ref refs ed eds
jan feb mar apr jun jul aug sep sept oct nov dec mon tue wed thu fri sat sun
inc ltd co corp bros assn univ ave blvd rd
""".split())

# candidate end: terminal punctuation run, optional closing quotes/brackets, then whitespace
_END = re.compile(r"(?:\.\.\.|…|[.!?])+[\"'”’)\]]*(?=\s)")
_STARTER = re.compile(r"\s+[\"'“‘(\[]*[A-Z0-9À-Ý]")
_PARAGRAPH = re.compile(r"\n\s*\n")
_WORD_BEFORE = re.compile(r"([A-Za-z][A-Za-z.]*)$")


def _is_boundary(text: str, end: re.Match[str]) -> bool:
    punct = end.group(0)
    if not _STARTER.match(text, end.end()):
        return False  # next word is lower case (or punctuation): same sentence
    if punct.startswith(".") and not punct.startswith("..."):
        word = _WORD_BEFORE.search(text, 0, end.start())
        if word:
            w = word.group(1)
            if w.lower() in ABBREVIATIONS or w.lower().rstrip(".") in ABBREVIATIONS:
                return False
            if len(w) == 1 and w.isupper():
                return False  # an initial: "J. Smith"
            if re.fullmatch(r"(?:[A-Za-z]\.)+[A-Za-z]", w):
                return False  # dotted acronym: "U.S", "e.g"
    return True


def split_sentences(text: str) -> list[str]:
    """Split `text` into sentences (see the module docstring for the rules)."""
    out: list[str] = []
    for para in _PARAGRAPH.split(text):
        start = 0
        for m in _END.finditer(para):
            if _is_boundary(para, m):
                piece = para[start:m.end()].strip()
                if piece:
                    out.append(piece)
                start = m.end()
        piece = para[start:].strip()
        if piece:
            out.append(piece)
    return out
