"""The small-model labeller (sae/analysis/interpret_small.py) and the demo's label sample, on a stub language model
whose yes/no logits are known exactly: the detection maths (margins, top-n_pos prediction, balanced accuracy,
the shuffled-label control) and the answer parsing are checked against values computed here by hand."""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import llama
from sae.analysis.interpret import sample_latents
from llama.cli import UserError
from sae.analysis.interpret_small import (NO, YES, check_yes_no, control_into, detect, detect_into, explain,
                                         marked_tokens, parse_answer, yes_no_margins)
from sae.analysis.scoring import DetectionSample
from tests.test_gguf import smollm2_file


class CountingLM(torch.nn.Module):
    """Logits that say 'yes' by how often the text holds the label's first token: the prompt ends "... about
    <label>? ...", so the token after the last " about" is the label's, and the count leaves that one occurrence
    out. Every other logit is 0."""

    def __init__(self, tok, vocab: int) -> None:
        super().__init__()
        self.tok, self.vocab, self.p = tok, vocab, torch.nn.Parameter(torch.zeros(1))
        self.about = tok.encode(" about", bos=False, eos=False)[0]

    def forward(self, x: torch.Tensor) -> SimpleNamespace:
        logits = torch.zeros(*x.shape, self.vocab)
        for b, row in enumerate(x.tolist()):
            at = max(i for i, t in enumerate(row) if t == self.about)
            count = sum(t == row[at + 1] for t in row) - 1
            for t in YES:
                ids = self.tok.encode(t, bos=False, eos=False)
                if len(ids) == 1:
                    logits[b, :, ids[0]] = float(count)
        return SimpleNamespace(logits=logits)


@pytest.fixture(scope="module")
def backend() -> SimpleNamespace:
    tok = llama.Tokenizer.from_file(smollm2_file())
    return SimpleNamespace(llm=CountingLM(tok, tok.n_words), tok=tok, chat=None, batch_size=8, seed=0)


def test_margins_and_detection_score(backend) -> None:
    texts = ["I ate an apple and another apple", "the sky is blue", "an apple a day", "cats sleep", "dogs bark",
             "some apple pie"]
    margins = yes_no_margins(backend, "apple", texts)
    single = [[backend.tok.encode(t, bos=False, eos=False) for t in words] for words in (YES, NO)]
    n_yes, n_no = ({ids[0] for ids in enc if len(ids) == 1} for enc in single)
    n_yes, n_no = len(n_yes), len(n_no)
    want = [math.log(n_yes * math.exp(t.count(" apple"))) - math.log(n_no) for t in texts]  # " apple": one token
    assert margins == pytest.approx(want, abs=1e-5)
    sample = DetectionSample(texts, [True, False, True, False, False, True])
    det, _ = detect(backend, "apple", sample)  # the 3 largest margins are exactly the 3 apple texts
    assert (det.tp, det.fp, det.tn, det.fn) == (3, 0, 3, 0) and det.score == 1.0
    # no text has "zebra": all margins tie, the first 3 by index are predicted
    det, _ = detect(backend, "zebra", sample)
    assert (det.tp, det.fp) == (2, 1) and det.score == pytest.approx(0.5 * (2 / 3 + 2 / 3))


def test_control_judges_each_label_against_the_next_different_one(backend, monkeypatch) -> None:
    import sae.analysis.scoring as scoring
    texts = ["an apple here", "nothing", "some apple again", "more nothing"]
    monkeypatch.setattr(scoring, "detection_sample", lambda *a, **k: DetectionSample(texts, [True, False, True, False]))
    table = {"latents": {"3": {"label": "apple"}, "7": {"label": "banana"}, "9": {"label": "apple"},
                         "11": {"label": "cherry"}}, "errors": {}}
    cfg = SimpleNamespace(n_explain=2, n_detect_pos=2, n_detect_neg=2, context_tokens=8, seed=0)
    detect_into(None, backend, table, [3, 7, 9], cfg)  # 11 stays unscored: never a control either
    assert [table["latents"][k]["detection_score"] for k in ("3", "7", "9")] == [1.0, 0.5, 1.0]
    assert table["latents"]["3"]["detection"]["is_pos"] == [True, False, True, False]
    control_into(None, backend, table, cfg)
    # 3 -> 7 (banana: ties, the first two by index predicted: tp 1, fp 1), 7 -> 9 (apple), 9 -> 3 skipped (same
    # label) -> 7
    got = {k: (table["latents"][k]["control_label"], table["latents"][k]["control_score"]) for k in ("3", "7", "9")}
    assert got == {"3": ("banana", 0.5), "7": ("apple", 1.0), "9": ("banana", 0.5)}
    assert "control_score" not in table["latents"]["11"]
    alone = {"latents": {"3": {"label": "apple", "detection_score": 1.0}}, "errors": {}}
    control_into(None, backend, alone, cfg)
    assert alone["latents"]["3"]["control_score"] is None


def test_explain_records_a_prompt_too_long_as_that_latents_error(backend) -> None:
    backend.llm.args = SimpleNamespace(max_seq_len=64)
    recs = {5: {"max": [{"tokens": [" word"] * 40, "acts": [1.0] * 40, "pos": 39, "start": 0}] * 6}}
    out = explain(backend, recs, {5: 6}, 16)
    assert isinstance(out[5], str) and "exceeds the model's max_seq_len 64" in out[5]


def test_vocabulary_without_single_token_yes_no_is_refused() -> None:
    tok = SimpleNamespace(encode=lambda s, bos, eos: [1, 2])  # every word two tokens
    with pytest.raises(UserError, match="no single-token 'Yes'/'No'.*--label 0"):
        check_yes_no(tok)


def test_parse_answer_and_marked_tokens() -> None:
    assert parse_answer(" all pronouns. They refer to nouns.\nMore") == ("all pronouns", "They are all pronouns.")
    assert parse_answer(' words about "licences", in capitals and more words than eight here') == \
        ('words about "licences", in capitals and more words', 'They are words about "licences", in capitals and more '
                                                          'words than eight here.')
    rec = {"max": [{"tokens": [" one", " of", " the"], "acts": [2.0, 0.0, 1.0]},
                   {"tokens": [" one", " \n", " it"], "acts": [1.0, 3.0, 0.5]}]}
    assert marked_tokens(rec, 2) == ["one", "the", "it"]  # most frequent first, whitespace-only tokens left out


def test_sample_latents_is_seeded_and_skips_dense_and_sparse() -> None:
    max_ctx = np.full((10, 4), -1)
    max_ctx[:, :3] = 0  # every latent has 3 contexts ...
    max_ctx[[2, 5], 3] = 0  # ... latents 2 and 5 have 4
    freq = np.array([0.01] * 10)
    freq[5] = 0.5  # dense
    tc = SimpleNamespace(n=4, array=lambda name: {"max_ctx": max_ctx, "freq": freq}[name])
    assert sample_latents(tc, 5, 4) == [2]  # 5 is dense, the rest have too few contexts
    few = sample_latents(tc, 4, 3, seed=1)
    assert few == sorted(few) and len(few) == 4 and 5 not in few and few == sample_latents(tc, 4, 3, seed=1)
    assert sample_latents(tc, 20, 3) == [0, 1, 2, 3, 4, 6, 7, 8, 9]
