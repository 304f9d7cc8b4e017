"""The sentence splitter on tricky English: every expected split below was written by hand."""
from __future__ import annotations

import re

import pytest

from sae.activations.sentences import split_sentences

CASES = [
    ("Hello world. How are you? I am fine!", ["Hello world.", "How are you?", "I am fine!"]),
    # abbreviations and titles do not end sentences
    ("Dr. Smith met Mr. Jones at St. Mary's. They talked.",
     ["Dr. Smith met Mr. Jones at St. Mary's.", "They talked."]),
    ("See Fig. 3 and Eq. 2 for details. It works.", ["See Fig. 3 and Eq. 2 for details.", "It works."]),
    ("Bring fruit, e.g. Apples, pears etc. and bread. Then go.",
     ["Bring fruit, e.g. Apples, pears etc. and bread.", "Then go."]),
    # initials and dotted acronyms
    ("J. R. R. Tolkien wrote it. He was English.", ["J. R. R. Tolkien wrote it.", "He was English."]),
    ("The U.S. Army arrived. Nobody cheered.", ["The U.S. Army arrived.", "Nobody cheered."]),
    # decimals, versions, money, times
    ("Pi is 3.14159 roughly. Version 2.0.1 shipped. It cost $4.50 at 10.30 a.m. today.",
     ["Pi is 3.14159 roughly.", "Version 2.0.1 shipped.", "It cost $4.50 at 10.30 a.m. today."]),
    # quotes: the closing quote stays with its sentence
    ('He said, "Stop." Then he left.', ['He said, "Stop."', "Then he left."]),
    ("“Is it over?” she asked. “Yes.” He nodded.", ["“Is it over?” she asked.", "“Yes.”", "He nodded."]),
    ("(This is aside.) Back to the text.", ["(This is aside.)", "Back to the text."]),
    # ellipses: a lower-case continuation stays, an upper-case one starts a sentence
    ("Wait... what happened? I don't know… Nobody does.",
     ["Wait... what happened?", "I don't know…", "Nobody does."]),
    ("Well... Maybe.", ["Well...", "Maybe."]),
    # repeated punctuation, lower-case after a full stop, numbers starting a sentence
    ("Really?! Yes. it is lower case. 42 is the answer.", ["Really?!", "Yes. it is lower case.", "42 is the answer."]),
    # paragraph breaks always split, even without punctuation
    ("A heading\n\nThe body text. More body.", ["A heading", "The body text.", "More body."]),
    ("No terminal punctuation here", ["No terminal punctuation here"]),
    ("   ", []),
]


@pytest.mark.parametrize("text,expected", CASES)
def test_split(text: str, expected: list[str]) -> None:
    assert split_sentences(text) == expected


def test_split_loses_no_characters() -> None:
    text = " ".join(t for t, _ in CASES)
    got = split_sentences(text)
    assert re.sub(r"\s", "", "".join(got)) == re.sub(r"\s", "", text)
    assert all(s == s.strip() and s for s in got)
