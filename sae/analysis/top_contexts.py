"""Top-activating contexts for every latent of an SAE, plus per-latent statistics, written as the files described
in sae/analysis/README.md, and `load_top_contexts` to read them back.

    pass 1 (scan.py):    stream all activations once -> running top-N per latent for max / mean / last,
                         firing counts, histograms, a random sample of contexts
    pass 2 (windows.py): re-read only the kept contexts -> per-token activations of each kept (latent, context)
    logit lens:          decoder rows through the final norm weight and the unembedding
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llama.cli import UserError, atomic_write_bytes, atomic_write_json, config_to_dict
from sae.analysis.latent_stats import logit_lens
from sae.analysis.scan import AGGREGATIONS, Scanner
from sae.analysis.windows import fill_windows

FORMAT = "llama-sae-top-contexts/1"


@dataclass
class TopContextsConfig:
    """Flags of `scripts/top_contexts.py`."""
    sae: str = field(default="", metadata={"help": "SAE folder (cfg.json + sae_weights.safetensors)"})
    store: str = field(default="", metadata={"help": "activation store folder to scan (or use --text)"})
    text: str = field(default="", metadata={"help": "text file, one document per line, run through --model"})
    model: str = field(default="", metadata={"help": "model folder, .gguf file or name such as smollm2 (tokenizer, "
                                                    "logit lens; default: the store's)"})
    out: str = field(default="runs/analysis", metadata={"help": "output folder"})
    n: int = field(default=50, metadata={"help": "contexts kept per latent and aggregation"})
    batch_rows: int = field(default=8192, metadata={"help": "rows (tokens) per SAE encode"})
    window: int = field(default=64, metadata={"help": "max tokens of a context kept with per-token activations"})
    hist_bins: int = field(default=64, metadata={"help": "activation histogram bins (power of two)"})
    n_logit_tokens: int = field(default=20, metadata={"help": "promoted / suppressed tokens per latent"})
    logit_lens: bool = field(default=True, metadata={"help": "compute promoted/suppressed tokens (loads the model)"})
    n_random: int = field(default=500, metadata={"help": "random contexts sampled (detection-score negatives)"})
    skip_bos: bool = field(default=True, metadata={"help": "ignore activations on BOS tokens"})
    max_rows: int = field(default=0, metadata={"help": "scan at most this many rows (0: all)"})
    max_len: int = field(default=256, metadata={"help": "--text: tokens per document"})
    point: str = field(default="", metadata={"help": "capture point to read when the store holds several"})
    seed: int = 0
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda"})
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("n", "batch_rows", "window", "hist_bins", "max_len"):
            if getattr(self, name) <= 0:
                raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.hist_bins & (self.hist_bins - 1):
            raise UserError(f"--hist-bins must be a power of two, got {self.hist_bins}")


def _save_npy(path: Path, a: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(a))
    atomic_write_bytes(path, buf.getvalue())


def token_pieces(tokenizer: Any) -> list[str]:
    """The text of every token id alone (SentencePiece pieces keep their leading space: "▁the" -> " the")."""
    sp = getattr(tokenizer, "sp", None)
    if sp is not None:
        return [sp.id_to_piece(i).replace("\u2581", " ") for i in range(tokenizer.n_words)]
    return [tokenizer.decode([i]) for i in range(tokenizer.n_words)]


def n_latents_of(sae: Any) -> int:
    return int(sae.W_dec.shape[0])


def compute_top_contexts(source: Any, sae: Any, out: str | Path, cfg: TopContextsConfig, tokenizer: Any = None,
                         lm_weights: tuple[torch.Tensor, torch.Tensor] | None = None,
                         summary_extra: dict | None = None) -> Path:
    """Scan `source` with `sae`, write every analysis file to `out`. lm_weights = (norm.weight, output.weight)."""
    out = Path(out)
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    L = n_latents_of(sae)
    bos = tokenizer.bos_id if (tokenizer is not None and cfg.skip_bos) else None
    scan = Scanner(sae, L, cfg.n, cfg.hist_bins, cfg.n_random, bos, cfg.seed, device)
    res = scan.run(source, total_rows=len(source), progress=cfg.progress)
    ref = np.unique(np.concatenate([t.payload["ctx"].cpu().numpy().reshape(-1) for t in res.tops.values()]
                                   + [res.random_ctx]))
    ref = ref[ref >= 0]
    wins, tokens = fill_windows(source, sae, res.tops, ref, res.ctx_row0, res.ctx_len, cfg.window, bos,
                                cfg.batch_rows, device, cfg.progress)
    out.mkdir(parents=True, exist_ok=True)
    for agg, w in wins.items():
        for name in ("acts", "ctx", "pos"):
            _save_npy(out / f"{agg}_{name}.npy", getattr(w, name))
        _save_npy(out / f"{agg}_win_start.npy", w.start)
        _save_npy(out / f"{agg}_win_offsets.npy", w.offsets)
        _save_npy(out / f"{agg}_win_acts.npy", w.win_acts)
    lens = np.array([len(t) for t in tokens], dtype=np.int64)
    _save_npy(out / "contexts_offsets.npy", np.concatenate([[0], np.cumsum(lens)]).astype(np.int64))
    _save_npy(out / "contexts_tokens.npy", np.concatenate(tokens).astype(np.int32) if tokens else np.zeros(0, np.int32))
    _save_npy(out / "contexts_doc_id.npy", res.ctx_doc[ref])
    _save_npy(out / "contexts_ctx.npy", res.ctx_sub[ref])
    _save_npy(out / "contexts_row0.npy", res.ctx_row0[ref] if source.has_rows else np.full(len(ref), -1, np.int64))
    st = res.stats
    for name, a in (("fire_count", st.fire_count), ("freq", st.freq()), ("max_act", st.max_act),
                    ("mean_act", st.mean_act()), ("hist_counts", st.hist), ("hist_hi", st.hist_hi())):
        _save_npy(out / f"{name}.npy", a.cpu().numpy())
    compact = np.searchsorted(ref, res.random_ctx)
    fired = [res.random_fired[int(c)] for c in res.random_ctx]
    _save_npy(out / "random_ctx.npy", compact.astype(np.int64))
    _save_npy(out / "random_fired_offsets.npy", np.concatenate([[0], np.cumsum([len(f[0]) for f in fired])]).astype(np.int64))
    _save_npy(out / "random_fired_latents.npy", np.concatenate([f[0] for f in fired] or [np.zeros(0)]).astype(np.int32))
    _save_npy(out / "random_fired_acts.npy", np.concatenate([f[1] for f in fired] or [np.zeros(0)]).astype(np.float32))
    if lm_weights is not None:
        lens_out = logit_lens(sae.W_dec.detach().to(device), lm_weights[0].to(device), lm_weights[1].to(device),
                              cfg.n_logit_tokens)
        for name, a in lens_out._asdict().items():
            _save_npy(out / f"{name}.npy", a.cpu().numpy())
    if tokenizer is not None:
        atomic_write_json(out / "vocab.json", token_pieces(tokenizer))
    summary = {"format": FORMAT, "n_latents": L, "n": cfg.n, "aggregations": list(AGGREGATIONS),
               "n_tokens": st.n_tokens, "n_contexts_seen": int(len(res.ctx_len)), "n_contexts": int(len(ref)),
               "hist_bins": cfg.hist_bins, "window": cfg.window, "n_logit_tokens": cfg.n_logit_tokens,
               "n_random": int(len(res.random_ctx)), "skip_bos": bos is not None, "sae": cfg.sae,
               "store": cfg.store, "text": cfg.text, "model": cfg.model, "has_vocab": tokenizer is not None,
               "has_logits": lm_weights is not None, **(summary_extra or {})}
    atomic_write_json(out / "config.json", config_to_dict(cfg))
    atomic_write_json(out / "summary.json", summary)  # written last: its presence means the folder is complete
    return out


class TopContexts:
    """Read-only view of an analysis folder (memory-mapped arrays)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        f = self.path / "summary.json"
        if not f.is_file():
            raise UserError(f"{self.path}: not a top-contexts folder (no summary.json); run scripts/top_contexts.py")
        self.summary: dict = json.loads(f.read_text())
        if self.summary.get("format") != FORMAT:
            raise UserError(f"{f}: format {self.summary.get('format')!r}, expected {FORMAT!r}")
        self.n_latents, self.n = int(self.summary["n_latents"]), int(self.summary["n"])
        vocab = self.path / "vocab.json"
        self.vocab: list[str] | None = json.loads(vocab.read_text()) if vocab.is_file() else None
        self._cache: dict[str, np.ndarray] = {}

    def array(self, name: str) -> np.ndarray:
        if name not in self._cache:
            self._cache[name] = np.load(self.path / f"{name}.npy", mmap_mode="r")
        return self._cache[name]

    def has(self, name: str) -> bool:
        return (self.path / f"{name}.npy").is_file()

    def token_str(self, i: int) -> str:
        return self.vocab[i] if self.vocab is not None and 0 <= i < len(self.vocab) else f"<{i}>"

    def context_tokens(self, c: int) -> list[int]:
        off = self.array("contexts_offsets")
        return self.array("contexts_tokens")[off[c]:off[c + 1]].tolist()

    def contexts(self, latent: int, agg: str = "max") -> list[dict]:
        if agg not in AGGREGATIONS:
            raise UserError(f"aggregation must be one of {AGGREGATIONS}, got {agg!r}")
        if not 0 <= latent < self.n_latents:
            raise UserError(f"latent {latent} out of range [0, {self.n_latents})")
        ctx, acts, pos = (self.array(f"{agg}_{n}")[latent] for n in ("ctx", "acts", "pos"))
        start, off, wa = (self.array(f"{agg}_win_{n}") for n in ("start", "offsets", "acts"))
        recs = []
        for j in np.flatnonzero(ctx >= 0):
            s = latent * self.n + j
            toks = self.context_tokens(int(ctx[j]))
            a = wa[off[s]:off[s + 1]].astype(np.float32).tolist()
            st = int(start[latent, j])
            ids = toks[st:st + len(a)]
            recs.append({"ctx": int(ctx[j]), "score": float(acts[j]), "pos": int(pos[j]), "start": st,
                         "token_ids": ids, "tokens": [self.token_str(i) for i in ids], "acts": a})
        return recs

    def latent(self, latent: int) -> dict:
        hi, counts = float(self.array("hist_hi")[latent]), self.array("hist_counts")[latent]
        rec: dict = {"latent": latent, "fire_count": int(self.array("fire_count")[latent]),
                     "freq": float(self.array("freq")[latent]), "max_act": float(self.array("max_act")[latent]),
                     "mean_act": float(self.array("mean_act")[latent]),
                     "hist": {"edges": np.linspace(0, hi, len(counts) + 1).tolist(), "counts": counts.tolist()}}
        for kind in ("promoted", "suppressed"):
            rec[kind] = ([{"token_id": int(i), "token": self.token_str(int(i)), "logit": float(v)}
                          for i, v in zip(self.array(f"{kind}_ids")[latent], self.array(f"{kind}_logits")[latent])]
                         if self.has(f"{kind}_ids") else [])
        for agg in AGGREGATIONS:
            rec[agg] = self.contexts(latent, agg)
        return rec

    def random_contexts(self) -> list[tuple[int, dict[int, float]]]:
        """The random sample: (context index, {latent: max activation in it})."""
        rc, off = self.array("random_ctx"), self.array("random_fired_offsets")
        lat, act = self.array("random_fired_latents"), self.array("random_fired_acts")
        return [(int(c), dict(zip(lat[off[r]:off[r + 1]].tolist(), act[off[r]:off[r + 1]].tolist())))
                for r, c in enumerate(rc)]


def load_top_contexts(path: str | Path) -> TopContexts:
    return TopContexts(path)
