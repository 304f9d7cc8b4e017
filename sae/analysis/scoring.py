"""Detection score: how well a label predicts where its latent fires.

Given a latent's label and description, the backend sees a shuffled, numbered mix of
  - positives: held-out activating contexts (top contexts that were NOT shown when the label was written), and
  - negatives: random contexts on which the latent never fired (the random sample of top_contexts),
without any highlighting, and answers which ones the latent fires on. The score is the balanced accuracy
(TPR + TNR) / 2: 0.5 is chance, 1.0 is perfect, whatever the positive/negative mix.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from sae.analysis.parsing import ParseError, as_int, extract_json

DETECT_SYSTEM = ("You are evaluating an explanation of a neuron-like feature of a language model. Given the "
                 "feature's explanation and a numbered list of text excerpts, say which excerpts the feature is "
                 "active on. Answer with JSON only.")


class DetectionSample(NamedTuple):
    texts: list[str]  # shown in this order, numbered from 1
    is_pos: list[bool]


class Detection(NamedTuple):
    tp: int
    fp: int
    tn: int
    fn: int

    @property
    def score(self) -> float:
        return balanced_accuracy(self.tp, self.fp, self.tn, self.fn)

    def as_dict(self) -> dict[str, int]:
        return {"n_pos": self.tp + self.fn, "n_neg": self.tn + self.fp, "tp": self.tp, "fp": self.fp,
                "tn": self.tn, "fn": self.fn}


def balanced_accuracy(tp: int, fp: int, tn: int, fn: int) -> float:
    tpr = tp / (tp + fn) if tp + fn else 0.0
    tnr = tn / (tn + fp) if tn + fp else 0.0
    if tp + fn == 0 or tn + fp == 0:
        return tpr if tn + fp == 0 else tnr
    return (tpr + tnr) / 2


def split_counts(n_contexts: int, n_explain: int, n_pos: int) -> tuple[int, int]:
    """(contexts shown for explanation, held out for detection) for a latent with n_contexts top contexts."""
    held = min(n_pos, n_contexts // 2)
    return min(n_explain, n_contexts - held), held


def plain_text(tokens: list[str], max_tokens: int, center: int | None, rng: np.random.Generator) -> str:
    """A window of max_tokens pieces: around `center`, or at a random place (negatives)."""
    if len(tokens) > max_tokens:
        if center is None:
            s = int(rng.integers(0, len(tokens) - max_tokens + 1))
        else:
            s = min(max(0, center - (max_tokens * 3) // 4), len(tokens) - max_tokens)
        tokens = tokens[s:s + max_tokens]
    return "".join(tokens).strip()


def detection_sample(tc: Any, latent: int, n_explain: int, n_pos: int, n_neg: int, max_tokens: int,
                     seed: int = 0) -> DetectionSample:
    rng = np.random.default_rng([seed, latent])
    recs = tc.contexts(latent, "max")
    shown, held = split_counts(len(recs), n_explain, n_pos)
    pos_recs = [recs[i] for i in sorted(rng.choice(np.arange(shown, len(recs)), held, replace=False))] if held else []
    pos = [plain_text(r["tokens"], max_tokens, r["pos"] - r["start"], rng) for r in pos_recs]
    negatives = [c for c, fired in tc.random_contexts() if latent not in fired]
    take = rng.choice(len(negatives), min(n_neg, len(negatives)), replace=False) if negatives else []
    neg = [plain_text([tc.token_str(i) for i in tc.context_tokens(negatives[int(j)])], max_tokens, None, rng)
           for j in take]
    items = [(t, True) for t in pos] + [(t, False) for t in neg]
    order = rng.permutation(len(items))
    return DetectionSample([items[i][0] for i in order], [items[i][1] for i in order])


def detection_prompt(label: str, description: str, sample: DetectionSample) -> str:
    lines = [f"Feature explanation: {label}. {description}".strip(), "",
             "Excerpts:"]
    lines += [f"{i + 1}. {t!r}" for i, t in enumerate(sample.texts)]
    lines += ["", "On which excerpts is this feature active? Answer with JSON only, in this form:",
              '{"active": [numbers of the excerpts where the feature is active]}']
    return "\n".join(lines)


def parse_detection(text: str | None, n: int) -> set[int]:
    """The 1-based excerpt numbers the answer says are active, as 0-based indices."""
    obj = extract_json(text)
    active = obj.get("active")
    if not isinstance(active, list):
        raise ParseError(f'expected {{"active": [numbers]}}, got {str(obj)[:120]}')
    out = set()
    for a in active:
        i = as_int(a)
        if not 1 <= i <= n:
            raise ParseError(f"excerpt number {i} out of range 1..{n}")
        out.add(i - 1)
    return out


def score_detection(sample: DetectionSample, predicted: set[int]) -> Detection:
    tp = sum(1 for i, p in enumerate(sample.is_pos) if p and i in predicted)
    fp = sum(1 for i, p in enumerate(sample.is_pos) if not p and i in predicted)
    n_pos = sum(sample.is_pos)
    return Detection(tp, fp, len(sample.is_pos) - n_pos - fp, n_pos - tp)
