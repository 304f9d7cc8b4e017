"""The dashboard's per-latent data, compact: one small JavaScript file per shard of latents, read by one page.

    data/meta.js            window.__meta({...})          sizes, the token-id width, the SAE's title
    data/vocab.js           window.__vocab([...])         the piece of every token id (absent without vocab.json)
    data/index.js           window.__index({...})         freq / max act of every latent, labels (the table)
    data/latents-{s}.js     window.__shard(s, {...})      latents s*SHARD .. (s+1)*SHARD-1, one record each

They are scripts, not JSON, so `latent.html#123` works opened from disk: a page opened from file:// may load a
script from its folder, while fetch() of a local JSON file is refused (Chromium). A latent page loads meta, vocab
and one shard (~0.5 MB for 64 latents), whatever the SAE's width.

A latent record (numbers rounded to 4 significant digits):
    {"n": fire count, "f": firing frequency, "x": max activation, "m": mean activation,
     "h": [hist_hi, first bin, counts from that bin on (trailing zeros dropped)],
     "p" / "s": [token ids, [logits]] promoted / suppressed tokens (absent without a model),
     "w": [[peak offset, token ids, fired], ...]                                     context windows, each once
     "c": {"max" | "mean" | "last": [[scores], window indices]}                      top contexts, best first,
     "lab": [label, description, confidence, detection score]}                        (only when labelled)
Token ids are fixed-width strings in the alphabet ALPHABET (`meta.width` characters each, base 64; window indices
2 characters each). A window holds
at most `window` tokens (<= 64) around the peak of the latent in that context; `fired` lists the tokens where the
latent is active, 3 base-64 digits each: the token's offset in the window, then its activation in permille of the
latent's max activation (1..1000, two digits); tokens not listed did not fire.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from llama.cli import atomic_write_bytes

ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz-_"
SHARD = 64  # latents per data file
AGGS = ("max", "mean", "last")


def r4(v: float) -> float:
    """4 significant digits (what the page shows is 3)."""
    return float(f"{float(v):.4g}")


def id_width(vocab_size: int) -> int:
    w = 1
    while 64 ** w < vocab_size:
        w += 1
    return w


def encode_ids(ids: np.ndarray, width: int) -> str:
    """Token ids -> one string of `width` base-64 digits per id (most significant first)."""
    ids = np.asarray(ids, dtype=np.int64)
    digits = [(ids >> (6 * (width - 1 - i))) & 63 for i in range(width)]
    table = np.frombuffer(ALPHABET.encode(), dtype=np.uint8)
    return table[np.stack(digits, 1).reshape(-1)].tobytes().decode() if len(ids) else ""


def decode_ids(s: str, width: int) -> list[int]:
    vals = [ALPHABET.index(c) for c in s]
    return [sum(v << (6 * (width - 1 - i)) for i, v in enumerate(vals[j:j + width])) for j in range(0, len(vals), width)]


def display_window(start: np.ndarray, length: np.ndarray, pos: np.ndarray, window: int) -> tuple[np.ndarray, ...]:
    """The at most `window` tokens of [start, start + length) shown around the peak `pos` (a quarter of them after
    it), elementwise: (lo, hi)."""
    lo = np.maximum(start, pos - (window - window // 4) + 1)
    hi = np.minimum(start + length, lo + window)
    return np.maximum(start, hi - window), hi


def _strings(values: np.ndarray, width: int, lengths: np.ndarray) -> list[str]:
    """Rows of non-negative ints [R, K] -> R strings of `width` base-64 digits per value, row r cut at lengths[r]."""
    table = np.frombuffer(ALPHABET.encode(), dtype=np.uint8)
    digits = np.stack([(values >> (6 * (width - 1 - i))) & 63 for i in range(width)], -1)  # [R, K, width]
    raw = table[digits.reshape(len(values), -1)]
    return [row[:n * width].tobytes().decode() for row, n in zip(raw, lengths.tolist())]


class LatentEncoder:
    """Reads an analysis folder's arrays (memory maps) and turns latents into compact records, a shard at a time:
    the windows of every shown context of the shard are gathered and encoded with a few numpy operations."""

    def __init__(self, tc: Any, n_ctx: int, window: int, width: int) -> None:
        self.tc, self.k, self.window, self.width = tc, min(n_ctx, tc.n), window, width
        a = tc.array
        self.ctx_off, self.ctx_tok = a("contexts_offsets"), a("contexts_tokens")
        self.stats = {k: a(k) for k in ("fire_count", "freq", "max_act", "mean_act", "hist_counts", "hist_hi")}
        self.tops = {agg: {k: a(f"{agg}_{k}") for k in ("ctx", "acts", "pos", "win_start", "win_offsets", "win_acts")}
                     for agg in AGGS}
        self.lens = {k: (a(f"{k}_ids"), a(f"{k}_logits")) for k in ("promoted", "suppressed") if tc.has(f"{k}_ids")}

    def windows(self, agg: str, l0: int, l1: int, mx: np.ndarray) -> tuple[np.ndarray, ...]:
        """For latents l0..l1-1 and their first k slots: valid [B, k], score, peak offset, ids strings, acts strings."""
        t, n, k, W = self.tops[agg], self.tc.n, self.k, self.window
        ctx = np.asarray(t["ctx"][l0:l1, :k])
        valid = ctx >= 0
        slot = (np.arange(l0, l1)[:, None] * n + np.arange(k)[None, :]).reshape(-1)
        off = np.asarray(t["win_offsets"])
        w0, wlen = off[slot], off[slot + 1] - off[slot]
        start = np.asarray(t["win_start"][l0:l1, :k]).reshape(-1).astype(np.int64)
        pos = np.asarray(t["pos"][l0:l1, :k]).reshape(-1).astype(np.int64)
        lo, hi = display_window(start, wlen, pos, W)
        length = np.where(valid.reshape(-1), hi - lo, 0)
        cols = np.arange(W)[None, :]
        inside = cols < length[:, None]
        c = np.where(valid.reshape(-1), ctx.reshape(-1), 0)
        tok_idx = np.where(inside, np.asarray(self.ctx_off)[c][:, None] + lo[:, None] + cols, 0)
        toks = np.where(inside, np.asarray(self.ctx_tok[tok_idx.reshape(-1)]).reshape(tok_idx.shape), 0)
        act_idx = np.where(inside, (w0 + lo - start)[:, None] + cols, 0)
        acts = np.where(inside, np.asarray(t["win_acts"][act_idx.reshape(-1)], np.float32).reshape(act_idx.shape), 0)
        scale = np.repeat(mx, k)[:, None]
        q = np.where(acts > 0, np.clip(np.rint(1000 * acts / np.where(scale > 0, scale, 1)), 1, 1000), 0).astype(np.int64)
        n_fired = (q > 0).sum(1)
        order = np.argsort(q == 0, axis=1, kind="stable")  # the fired offsets first, in order
        fired_off = np.take_along_axis(np.broadcast_to(cols, q.shape), order, 1)
        fired_q = np.take_along_axis(q, order, 1)
        pairs = np.stack([fired_off, fired_q >> 6, fired_q & 63], -1).reshape(len(q), -1)  # 3 digits per fired token
        return (valid, np.asarray(t["acts"][l0:l1, :k]), (pos - lo).reshape(l1 - l0, k),
                np.array(_strings(toks, self.width, length), dtype=object).reshape(l1 - l0, k),
                np.array(_strings(pairs, 1, 3 * n_fired), dtype=object).reshape(l1 - l0, k))

    def shard(self, l0: int, l1: int, labels: dict[int, dict]) -> list[dict]:
        st = self.stats
        mx = np.asarray(st["max_act"][l0:l1], dtype=np.float64)
        wins = {agg: self.windows(agg, l0, l1, mx) for agg in AGGS}
        recs = []
        for i, lat in enumerate(range(l0, l1)):
            counts = np.asarray(st["hist_counts"][lat])
            nz = np.flatnonzero(counts)
            hist = [r4(st["hist_hi"][lat]), int(nz[0]) if len(nz) else 0,
                    *(counts[nz[0]:nz[-1] + 1].tolist() if len(nz) else [])]
            rec: dict = {"n": int(st["fire_count"][lat]), "f": r4(st["freq"][lat]), "x": r4(mx[i]),
                         "m": r4(st["mean_act"][lat]), "h": hist}
            for key, (ids, logits) in self.lens.items():
                rec[key[0]] = [encode_ids(ids[lat], self.width), [r4(v) for v in logits[lat]]]
            windows: list[list] = []
            seen: dict[tuple, int] = {}  # a window shown under several aggregations (or a repeated text) is kept once
            rec["c"] = {}
            for agg in AGGS:
                valid, score, peak, ids_s, acts_s = (a[i] for a in wins[agg])
                scores, which = [], []
                for j in np.flatnonzero(valid).tolist():
                    win = (int(peak[j]), ids_s[j], acts_s[j])
                    if win not in seen:
                        seen[win] = len(windows)
                        windows.append(list(win))
                    scores.append(r4(score[j]))
                    which.append(seen[win])
                rec["c"][agg] = [scores, encode_ids(np.array(which, dtype=np.int64), 2)]
            rec["w"] = windows
            label = labels.get(lat)
            if label:
                det = label.get("detection_score")
                rec["lab"] = [str(label.get("label", "")), str(label.get("description", "")),
                              r4(label.get("confidence") or 0.0), None if det is None else r4(det)]
            recs.append(rec)
        return recs


def script(fn: str, *args: Any) -> bytes:
    """`window.fn(arg, ...);` with each argument as JSON (no spaces)."""
    body = ",".join(json.dumps(a, separators=(",", ":"), ensure_ascii=False) for a in args)
    return f"window.{fn}({body});\n".encode("utf-8")


def write_data(out: Path, tc: Any, labels: dict[int, dict], n: int, n_ctx: int, window: int, meta: dict,
               progress: Any) -> None:
    """Every data/ file for latents 0..n-1."""
    vocab = tc.vocab
    width = id_width(max(len(vocab) if vocab else 0, int(np.max(tc.array("contexts_tokens"), initial=0)) + 1))
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(data / "meta.js", script("__meta", {**meta, "n_latents": n, "shard": SHARD, "width": width,
                                                        "has_vocab": vocab is not None}))
    if vocab is not None:
        atomic_write_bytes(data / "vocab.js", script("__vocab", vocab))
    freq, mx = tc.array("freq")[:n], tc.array("max_act")[:n]
    index = {"freq": [r4(v) for v in freq], "max": [r4(v) for v in mx],
             "labels": {str(k): [str(v.get("label", "")), str(v.get("description", "")), v.get("detection_score"),
                                 v.get("confidence")] for k, v in labels.items() if 0 <= k < n}}
    atomic_write_bytes(data / "index.js", script("__index", index))
    enc = LatentEncoder(tc, n_ctx, window, width)
    for s in progress(range((n + SHARD - 1) // SHARD)):
        recs = enc.shard(s * SHARD, min(n, (s + 1) * SHARD), labels)
        atomic_write_bytes(data / f"latents-{s}.js", script("__shard", s, recs))
