"""Interpretation a small instruct model can do (`scripts/interpret.py --backend llama --prompt simple`), measured on
SmolLM2-135M-Instruct: given the JSON explanation prompt it rambles ("The feature detects the following: 1. ..."),
never JSON. It does answer one short question whose answer has been begun for it, and its next-token logits say
yes or no. So, in the model's chat format:

  explain  the latent's most frequent active tokens and a few highlighted excerpts, then "What do the marked words
           have in common?"; the answer is begun with ANSWER_START and read up to its first line end or full stop.
           label = that phrase (at most 8 words), description = the sentence, confidence = the geometric mean of
           the model's probabilities of its own answer tokens (how sure it was of its words; 0..1).
  detect   the same excerpts as the JSON mode (held-out top contexts + random non-firing contexts), one question
           each: "Is this text about <label>?"; its score is the logit margin of yes over no at the answer's first
           token. The n_pos excerpts with the largest margins are predicted active (a threshold that needs no
           calibration of the model's yes/no bias), and the detection score is the usual balanced accuracy.
  control  after every label exists, the same excerpts judged against the next scored latent's (different) label
           ("control_score", "control_label"): a 135M judge is noisy, so a label is informative only as far as
           its detection score beats this control on average over the same latents.
"""
from __future__ import annotations

import collections
import math
from typing import Any

import torch

from llama.cli import UserError
from sae.analysis.interpret import highlight
from sae.analysis.parsing import Label
from sae.analysis.scoring import DetectionSample, score_detection

ANSWER_START = "They are"
N_WORDS, N_EXAMPLES, EXAMPLE_TOKENS = 8, 6, 12
YES, NO = ("Yes", "yes", " Yes", " yes"), ("No", "no", " No", " no")


def marked_tokens(rec: dict, n_contexts: int, n: int = N_WORDS) -> list[str]:
    """The tokens the latent fires on in its top contexts, most frequent first."""
    counts: collections.Counter = collections.Counter()
    for ctx in rec["max"][:n_contexts]:
        for t, a in zip(ctx["tokens"], ctx["acts"]):
            if a > 0 and t.strip():
                counts[t.strip()] += 1
    return [w for w, _ in counts.most_common(n)]


def explain_user(rec: dict, n_shown: int) -> str:
    examples = "\n".join(f"- {highlight(c, EXAMPLE_TOKENS)}" for c in rec["max"][:min(n_shown, N_EXAMPLES)])
    return (f"Marked words: {', '.join(marked_tokens(rec, n_shown))}\n\nExamples (marked like <<this>>):\n{examples}"
            "\n\nWhat do the marked words have in common? Answer in a few words.")


def _ids(backend: Any, user: str, answer_start: str = "") -> list[int]:
    if backend.chat is not None:
        ids = backend.chat.encode_dialog_prompt([{"role": "user", "content": user}])
    else:
        ids = backend.tok.encode(f"{user}\n\nAnswer:", bos=True, eos=False)
    return ids + (backend.tok.encode(answer_start, bos=False, eos=False) if answer_start else [])


def parse_answer(text: str) -> tuple[str, str]:
    """(label, description) from the continuation of ANSWER_START: its first sentence, the label at most 8 words."""
    sentence = text.strip().split("\n")[0].strip()
    cut = [i for i in (sentence.find(". "), sentence.find(".\t")) if i >= 0]
    sentence = sentence[:min(cut)] if cut else sentence.rstrip(".")
    label = " ".join(sentence.split()[:8]).strip(" ,;:\"'")
    return label, f"{ANSWER_START} {sentence}."


@torch.inference_mode()
def _answer_confidence(backend: Any, prompts: list[list[int]], answers: list[list[int]]) -> list[float]:
    """Geometric mean probability of each answer's tokens given its prompt (teacher-forced, one forward each)."""
    out = []
    dev = next(backend.llm.parameters()).device
    for p, a in zip(prompts, answers):
        if not a:
            out.append(0.0)
            continue
        x = torch.tensor([p + a], device=dev)
        logp = torch.log_softmax(backend.llm(x).logits[0, len(p) - 1:-1].float(), -1)
        out.append(math.exp(float(logp.gather(1, torch.tensor(a, device=dev)[:, None]).mean())))
    return out


def explain(backend: Any, recs: dict[int, dict], n_shown: dict[int, int], max_tokens: int) -> dict[int, Label | str]:
    """latent -> Label, or the reason there is none."""
    from llama.generate import generate
    limit = backend.llm.args.max_seq_len
    all_prompts = {lat: _ids(backend, explain_user(recs[lat], n_shown[lat]), ANSWER_START) for lat in recs}
    out: dict[int, Label | str] = {lat: f"prompt of {len(p)} tokens + {max_tokens} new tokens exceeds the "
                                   f"model's max_seq_len {limit}"
                                   for lat, p in all_prompts.items() if len(p) + max_tokens > limit}
    lats = [lat for lat in recs if lat not in out]
    prompts = [all_prompts[lat] for lat in lats]
    answers: list[list[int]] = []
    for i in range(0, len(prompts), backend.batch_size):
        answers += generate(backend.llm, backend.tok, prompts[i:i + backend.batch_size], max_tokens,
                            temperature=0.0, seed=backend.seed).tokens
    conf = _answer_confidence(backend, prompts, answers)
    for lat, ans, c in zip(lats, answers, conf):
        label, desc = parse_answer(backend.tok.decode(ans))
        out[lat] = Label(label, desc, round(c, 4)) if label else f"empty answer: {backend.tok.decode(ans)[:80]!r}"
    return out


def _token_ids(tok: Any, words: tuple[str, ...]) -> list[int]:
    ids = [tok.encode(w, bos=False, eos=False) for w in words]
    return sorted({i[0] for i in ids if len(i) == 1})


@torch.inference_mode()
def yes_no_margins(backend: Any, label: str, texts: list[str]) -> list[float]:
    """logsumexp(yes logits) - logsumexp(no logits) at the first answer token, per text (batched, right-padded)."""
    prompts = [_ids(backend, f"Text: {t}\n\nIs this text about {label}? Answer yes or no.") for t in texts]
    dev = next(backend.llm.parameters()).device
    T = max(map(len, prompts))
    x = torch.zeros(len(prompts), T, dtype=torch.long, device=dev)
    for i, p in enumerate(prompts):
        x[i, :len(p)] = torch.tensor(p)
    logits = backend.llm(x).logits.float()  # causal: right padding never reaches a row's last real position
    last = logits[torch.arange(len(prompts)), torch.tensor([len(p) - 1 for p in prompts])]
    yes, no = _token_ids(backend.tok, YES), _token_ids(backend.tok, NO)
    return (last[:, yes].logsumexp(-1) - last[:, no].logsumexp(-1)).tolist()


def detect(backend: Any, label: str, sample: DetectionSample) -> tuple[Any, list[float]]:
    """Detection by yes/no margins: the n_pos largest margins are the predicted-active excerpts."""
    margins = yes_no_margins(backend, label, sample.texts)
    n_pos = sum(sample.is_pos)
    predicted = set(sorted(range(len(margins)), key=lambda i: (-margins[i], i))[:n_pos])
    return score_detection(sample, predicted), margins


def explain_into(tc: Any, backend: Any, table: dict, todo: list[int], cfg: Any) -> None:
    """Label `todo` into the labels table (interpret.run_interpret's explain step for --prompt simple)."""
    from sae.analysis.scoring import split_counts
    recs = {lat: tc.latent(lat) for lat in todo}
    shown = {lat: split_counts(len(recs[lat]["max"]), cfg.n_explain, cfg.n_detect_pos if cfg.score else 0)[0]
             for lat in todo}
    for lat, lab in explain(backend, recs, shown, cfg.max_tokens).items():
        if isinstance(lab, str):
            table["errors"][str(lat)] = lab
            continue
        table["latents"][str(lat)] = {"label": lab.label, "description": lab.description,
                                      "confidence": lab.confidence, "detection_score": None, "detection": None}
        table["errors"].pop(str(lat), None)


def detect_into(tc: Any, backend: Any, table: dict, todo: list[int], cfg: Any) -> None:
    """Detection-score `todo` (labelled already) into the table, by yes/no margins."""
    from sae.analysis.scoring import detection_sample
    for lat in todo:
        sample = detection_sample(tc, lat, cfg.n_explain, cfg.n_detect_pos, cfg.n_detect_neg, cfg.context_tokens,
                                  cfg.seed)
        if not any(sample.is_pos) or all(sample.is_pos):
            continue
        det, margins = detect(backend, table["latents"][str(lat)]["label"], sample)
        table["latents"][str(lat)].update(detection_score=det.score, detection={
            **det.as_dict(), "method": "yes/no logit margin, top n_pos predicted active",
            "margins": [round(m, 3) for m in margins], "is_pos": list(sample.is_pos)})


def control_into(tc: Any, backend: Any, table: dict, cfg: Any) -> None:
    """control_score of every scored latent: its detection excerpts judged against the label of the next scored
    latent (by index, cyclically) whose label differs from its own; None when there is no such latent."""
    from sae.analysis.scoring import detection_sample
    scored = sorted(int(k) for k, v in table["latents"].items() if v.get("detection_score") is not None)
    for i, lat in enumerate(scored):
        rec = table["latents"][str(lat)]
        others = [scored[(i + j) % len(scored)] for j in range(1, len(scored))]
        other = next((o for o in others if table["latents"][str(o)]["label"] != rec["label"]), None)
        if other is None:
            rec.update(control_score=None, control_label=None)
            continue
        sample = detection_sample(tc, lat, cfg.n_explain, cfg.n_detect_pos, cfg.n_detect_neg, cfg.context_tokens,
                                  cfg.seed)
        label = table["latents"][str(other)]["label"]
        rec.update(control_score=detect(backend, label, sample)[0].score, control_label=label)


def check_yes_no(tok: Any) -> None:
    """The detection reads single-token yes/no logits: a vocabulary without them cannot be scored this way."""
    if not _token_ids(tok, YES) or not _token_ids(tok, NO):
        raise UserError("this tokenizer has no single-token 'Yes'/'No', which the small-model labeller's detection "
                        "reads (scripts/interpret.py: use --prompt json or --score false; scripts/demo.py: --label 0)")
