"""Robust reading of the JSON answers language models give: code fences, chatter around the object, trailing
commas, percentages for confidences. Anything that cannot be read is a ParseError naming what was expected."""
from __future__ import annotations

import json
import re
from typing import Any, NamedTuple

MAX_LABEL_CHARS = 120
MAX_DESCRIPTION_CHARS = 1000
_FENCE = re.compile(r"```(?:json|JSON)?\s*(.*?)```", re.S)
_TRAILING_COMMA = re.compile(r",\s*([}\]])")


class ParseError(ValueError):
    pass


class Label(NamedTuple):
    label: str
    description: str
    confidence: float
    detection_score: float | None = None


def _loads(s: str) -> Any:
    try:
        return json.loads(s)
    except json.JSONDecodeError:
        return json.loads(_TRAILING_COMMA.sub(r"\1", s))


def extract_json(text: str | None) -> dict:
    """The first JSON object in `text`: inside a ```json fence, the whole text, or the first {...} that parses."""
    if text is None or not text.strip():
        raise ParseError("empty answer")
    candidates = [m.group(1) for m in _FENCE.finditer(text)] + [text]
    for cand in candidates:
        try:
            obj = _loads(cand.strip())
            if isinstance(obj, dict):
                return obj
        except json.JSONDecodeError:
            pass
    dec = json.JSONDecoder()
    for m in re.finditer(r"\{", text):
        for s in (text[m.start():], _TRAILING_COMMA.sub(r"\1", text[m.start():])):
            try:
                obj, _ = dec.raw_decode(s)
            except json.JSONDecodeError:
                continue
            if isinstance(obj, dict):
                return obj
    raise ParseError(f"no JSON object in the answer: {text[:160]!r}")


def as_int(v: Any) -> int:
    if isinstance(v, bool):
        raise ParseError(f"expected a number, got {v!r}")
    if isinstance(v, int):
        return v
    if isinstance(v, float) and v.is_integer():
        return int(v)
    if isinstance(v, str) and v.strip().isdigit():
        return int(v.strip())
    raise ParseError(f"expected a whole number, got {v!r}")


def as_confidence(v: Any) -> float:
    """A float in [0, 1]; percentages (1 < v <= 100, or "85%") are divided by 100."""
    if isinstance(v, bool) or v is None:
        raise ParseError(f"confidence must be a number in [0, 1], got {v!r}")
    if isinstance(v, str):
        s = v.strip()
        pct = s.endswith("%")
        try:
            f = float(s.rstrip("%").strip())
        except ValueError:
            raise ParseError(f"confidence must be a number in [0, 1], got {v!r}") from None
        if pct:
            f /= 100.0
    elif isinstance(v, (int, float)):
        f = float(v)
    else:
        raise ParseError(f"confidence must be a number in [0, 1], got {v!r}")
    if 1.0 < f <= 100.0:
        f /= 100.0
    if not 0.0 <= f <= 1.0:
        raise ParseError(f"confidence must be in [0, 1], got {v!r}")
    return f


def parse_label(text: str | None) -> Label:
    """{"label": str, "description": str, "confidence": number} -> Label (validated)."""
    obj = {str(k).strip().lower(): v for k, v in extract_json(text).items()}
    label = obj.get("label")
    if not isinstance(label, str) or not label.strip():
        raise ParseError(f'"label" must be a non-empty string, got {label!r}')
    desc = obj.get("description", obj.get("explanation", ""))
    if not isinstance(desc, str):
        raise ParseError(f'"description" must be a string, got {desc!r}')
    if "confidence" not in obj:
        raise ParseError('missing "confidence"')
    label = " ".join(label.split())
    if len(label) > MAX_LABEL_CHARS:
        raise ParseError(f'"label" is too long ({len(label)} > {MAX_LABEL_CHARS} characters)')
    return Label(label, " ".join(desc.split())[:MAX_DESCRIPTION_CHARS], as_confidence(obj["confidence"]))
