"""Dashboard size and build time at the scale of a real SAE: a synthetic analysis folder (the files of
sae/analysis/README.md) with 65,536 latents, Llama 3's vocabulary (128,256 tokens), 50 contexts per aggregation, every
context a full 64-token window, every latent labelled; then scripts/dashboard.py's build on it.

    python bench/dashboard_size.py                           # 65,536 latents (needs ~3 GB of disk under --out)
    python bench/dashboard_size.py --n-latents 4096 --keep   # smaller; keep the folders to open in a browser

Prints the dashboard's total size (and per latent, against the ~500 MB budget for 65k latents), its file count,
the build time, and what one page loads: the overview (index.html + its data) and a latent page (latent.html +
the vocabulary + one shard of 64 latents). The analysis is a worst case for size: contexts never repeat within a
latent (real max / mean lists share many), and windows are always full.
"""
from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llama.cli import parse_config, run_main  # noqa: E402

BUDGET = 500e6 / 65536  # bytes per latent for a 65k-latent dashboard of ~500 MB


@dataclass
class DashboardSizeConfig:
    n_latents: int = 65536
    n: int = field(default=50, metadata={"help": "contexts kept per latent and aggregation in the analysis"})
    window: int = field(default=64, metadata={"help": "tokens per context (all full windows)"})
    vocab: int = 128256
    contexts_pool: int = field(default=200_000, metadata={"help": "distinct contexts the slots draw from"})
    fired: int = field(default=6, metadata={"help": "tokens of a window where the latent fires"})
    out: str = field(default="runs/bench_dashboard", metadata={"help": "folder for the analysis and the dashboard"})
    keep: bool = field(default=False, metadata={"help": "keep the folders afterwards"})
    seed: int = 0


def synthetic_analysis(out: Path, n_latents: int, n: int = 50, window: int = 64, vocab: int = 128256,
                       contexts_pool: int = 200_000, fired: int = 6, seed: int = 0, labels: bool = True) -> Path:
    """Write an analysis folder of the documented layout, filled with random but well-formed data."""
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    L, T = n_latents, window

    def save(name: str, a: np.ndarray) -> None:
        np.save(out / f"{name}.npy", np.ascontiguousarray(a))

    C = min(contexts_pool, max(1, L * n))
    save("contexts_offsets", np.arange(C + 1, dtype=np.int64) * T)
    save("contexts_tokens", rng.integers(0, vocab, C * T, dtype=np.int32))
    for name in ("contexts_doc_id", "contexts_ctx"):
        save(name, np.arange(C, dtype=np.int64))
    save("contexts_row0", np.arange(C, dtype=np.int64) * T)
    max_act = rng.gamma(2.0, 2.0, L).astype(np.float32) + 0.1
    fire = rng.integers(1, 200_000, L).astype(np.int64)
    n_tokens = 50_000_000
    save("fire_count", fire)
    save("freq", fire / n_tokens)
    save("max_act", max_act)
    save("mean_act", (max_act * rng.uniform(0.2, 0.6, L)).astype(np.float32))
    bins = 64
    save("hist_counts", rng.integers(0, 1000, (L, bins)).astype(np.int64))
    save("hist_hi", 2.0 ** np.ceil(np.log2(max_act)).astype(np.float32))
    P = 20
    save("promoted_ids", rng.integers(0, vocab, (L, P)).astype(np.int64))
    save("promoted_logits", -np.sort(-rng.normal(1, 0.3, (L, P)), axis=1).astype(np.float32))
    save("suppressed_ids", rng.integers(0, vocab, (L, P)).astype(np.int64))
    save("suppressed_logits", np.sort(rng.normal(-1, 0.3, (L, P)), axis=1).astype(np.float32))
    for agg in ("max", "mean", "last"):
        scores = -np.sort(-rng.uniform(0.05, 1.0, (L, n)), axis=1) * max_act[:, None]
        save(f"{agg}_acts", scores.astype(np.float32))
        save(f"{agg}_ctx", rng.integers(0, C, (L, n)).astype(np.int64))
        pos = np.full((L, n), T - 1, np.int32) if agg == "last" else rng.integers(0, T, (L, n)).astype(np.int32)
        save(f"{agg}_pos", pos)
        save(f"{agg}_win_start", np.zeros((L, n), np.int32))
        save(f"{agg}_win_offsets", np.arange(L * n + 1, dtype=np.int64) * T)
        acts = np.zeros((L * n, T), np.float16)
        rows = np.repeat(np.arange(L * n), fired)
        acts[rows, rng.integers(0, T, L * n * fired)] = rng.uniform(0.05, 1.0, L * n * fired) * np.repeat(
            scores.reshape(-1), fired)
        acts[np.arange(L * n), pos.reshape(-1)] = scores.reshape(-1)
        save(f"{agg}_win_acts", acts.reshape(-1))
        del acts
    save("random_ctx", np.arange(min(500, C), dtype=np.int64))
    save("random_fired_offsets", np.zeros(min(500, C) + 1, np.int64))
    save("random_fired_latents", np.zeros(0, np.int32))
    save("random_fired_acts", np.zeros(0, np.float32))
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    pieces = ["".join(rng.choice(letters, rng.integers(1, 9))) for _ in range(vocab)]
    (out / "vocab.json").write_text(json.dumps([(" " if i % 2 else "") + p for i, p in enumerate(pieces)]))
    if labels:
        lab = {str(lat): {"label": f"words about topic {lat} and its kin", "confidence": 0.8, "detection_score": 0.7,
                          "description": f"Fires on tokens about topic {lat}, mostly in technical prose, "
                                         "strongest at the start of a clause.", "detection": None}
               for lat in range(L)}
        (out / "labels.json").write_text(json.dumps({"format": "llama-sae-labels/1", "backend": "synthetic",
                                                     "model": "none", "latents": lab, "errors": {}}))
    summary = {"format": "llama-sae-top-contexts/1", "n_latents": L, "n": n, "aggregations": ["max", "mean", "last"],
               "n_tokens": n_tokens, "n_contexts_seen": C, "n_contexts": C, "hist_bins": bins, "window": T,
               "n_logit_tokens": P, "n_random": min(500, C), "skip_bos": True, "sae": "", "store": "synthetic",
               "text": "", "model": "synthetic", "hook_name": "blocks.10.hook_resid_post", "has_vocab": True,
               "has_logits": True}
    (out / "summary.json").write_text(json.dumps(summary))
    return out


def folder_bytes(path: Path) -> tuple[int, int]:
    files = [f for f in path.rglob("*") if f.is_file()]
    return sum(f.stat().st_size for f in files), len(files)


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(DashboardSizeConfig, argv, description=__doc__)
    from sae.analysis.dashboard import DashboardConfig, build_dashboard
    root = Path(cfg.out)
    analysis, site = root / "analysis", root / "dashboard"
    shutil.rmtree(root, ignore_errors=True)
    t0 = time.perf_counter()
    synthetic_analysis(analysis, cfg.n_latents, cfg.n, cfg.window, cfg.vocab, cfg.contexts_pool, cfg.fired, cfg.seed)
    t_make = time.perf_counter() - t0
    t0 = time.perf_counter()
    build_dashboard(DashboardConfig(analysis=str(analysis), out=str(site), progress=False))
    t_build = time.perf_counter() - t0
    total, files = folder_bytes(site)
    shards = sorted((site / "data").glob("latents-*.js"), key=lambda f: f.stat().st_size)
    common = sum((site / f).stat().st_size for f in ("assets/app.js", "assets/style.css", "data/meta.js"))
    latent_page = common + sum((site / f).stat().st_size for f in ("latent.html", "data/vocab.js")) + \
        shards[-1].stat().st_size
    index_page = common + sum((site / f).stat().st_size for f in ("index.html", "data/index.js"))
    a_bytes, _ = folder_bytes(analysis)
    per = total / cfg.n_latents
    print(f"synthetic analysis: {cfg.n_latents:,} latents, {a_bytes / 1e9:.2f} GB, made in {t_make:.0f} s")
    print(f"dashboard: {total / 1e6:,.1f} MB in {files:,} files, built in {t_build:.0f} s "
          f"({t_build / cfg.n_latents * 1e3:.2f} ms per latent)")
    print(f"per latent: {per / 1e3:.2f} KB = {per / BUDGET:.2f} x the budget (500 MB / 65,536 latents = "
          f"{BUDGET / 1e3:.2f} KB); at 65,536 latents: {per * 65536 / 1e6:,.0f} MB")
    print(f"a latent page loads {latent_page / 1e6:.2f} MB (largest shard {shards[-1].stat().st_size / 1e6:.2f} MB "
          f"+ vocabulary {(site / 'data/vocab.js').stat().st_size / 1e6:.2f} MB); the overview loads "
          f"{index_page / 1e6:.2f} MB")
    if not cfg.keep:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    run_main(main)
