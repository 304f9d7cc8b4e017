"""Top contexts: the vectorised one-pass scan (sae/analysis/scan.py: sparse (context, latent) scores, one sort +
topk merge per batch for all latents) vs the obvious peer, a per-(context, active latent) Python loop with one heapq
per latent.
Both get the same precomputed SAE codes (the encode is not timed) and keep max / mean / last top-N lists; the
results are checked equal, then A/B timings alternate and the medians and their ratio are printed.

    python bench/top_contexts.py --n-latents 16384 --contexts 2000 --reps 3
"""
from __future__ import annotations

import heapq
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from llama.cli import parse_config, run_main  # noqa: E402
from sae.analysis.scan import Scanner  # noqa: E402
from sae.analysis.sources import Chunk  # noqa: E402


@dataclass
class BenchConfig:
    n_latents: int = 16384
    k: int = 32
    contexts: int = field(default=2000, metadata={"help": "sentences scanned"})
    ctx_len: int = field(default=16, metadata={"help": "tokens per sentence"})
    n: int = field(default=50, metadata={"help": "top-N per latent"})
    batch_rows: int = 4096
    reps: int = 3
    threads: int = 0
    seed: int = 0


class CodeSAE:
    """encode(x) looks the codes up: x holds row indices."""

    def __init__(self, acts: torch.Tensor, idx: torch.Tensor, n_latents: int):
        self.acts, self.idx, self.W_dec = acts, idx, torch.empty(n_latents, 1)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r = x[:, 0].long()
        return self.acts[r], self.idx[r]


def vectorised(cfg: BenchConfig, sae: CodeSAE, rows: int) -> dict[str, np.ndarray]:
    sc = Scanner(sae, cfg.n_latents, cfg.n, n_random=0)
    doc = np.arange(rows) // cfg.ctx_len
    chunks = (Chunk(torch.arange(i, min(i + cfg.batch_rows, rows)).float()[:, None], np.zeros(min(cfg.batch_rows, rows - i), np.int64) + 5,
                    doc[i:i + cfg.batch_rows], np.zeros(min(cfg.batch_rows, rows - i), np.int64),
                    np.arange(i, min(i + cfg.batch_rows, rows))) for i in range(0, rows, cfg.batch_rows))
    res = sc.run(chunks, progress=False)
    return {a: t.values.numpy() for a, t in res.tops.items()}


def heap_loop(cfg: BenchConfig, sae: CodeSAE, rows: int) -> dict[str, np.ndarray]:
    heaps: dict[str, list[list[tuple[float, int]]]] = {a: [[] for _ in range(cfg.n_latents)] for a in ("max", "mean", "last")}
    acts, idx = sae.acts.numpy(), sae.idx.numpy()
    for c in range(rows // cfg.ctx_len):
        a, i = acts[c * cfg.ctx_len:(c + 1) * cfg.ctx_len], idx[c * cfg.ctx_len:(c + 1) * cfg.ctx_len]
        score: dict[int, list[float]] = {}
        for t in range(cfg.ctx_len):
            for v, lat in zip(a[t], i[t]):
                if v > 0:
                    s = score.setdefault(int(lat), [0.0, 0.0, 0.0])
                    s[0], s[1] = max(s[0], v), s[1] + v
                    if t == cfg.ctx_len - 1:
                        s[2] = v
        for lat, (mx, sm, last) in score.items():
            for agg, v in (("max", mx), ("mean", sm / cfg.ctx_len), ("last", last)):
                if v > 0:
                    h = heaps[agg][lat]
                    (heapq.heappush if len(h) < cfg.n else heapq.heappushpop)(h, (float(v), c))
    out = {}
    for agg, hs in heaps.items():
        m = np.full((cfg.n_latents, cfg.n), -np.inf, np.float32)
        for lat, h in enumerate(hs):
            vals = sorted((v for v, _ in h), reverse=True)
            m[lat, :len(vals)] = vals
        out[agg] = m
    return out


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(BenchConfig, argv, description=__doc__)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    g = torch.Generator().manual_seed(cfg.seed)
    rows = cfg.contexts * cfg.ctx_len
    pre = torch.rand(rows, cfg.n_latents, generator=g) ** 4  # skewed: some latents fire far more than others
    acts, idx = pre.topk(cfg.k, dim=1)
    acts = acts * (torch.rand(rows, cfg.k, generator=g) > 0.1)  # a few inactive slots
    sae = CodeSAE(acts, idx, cfg.n_latents)
    v, h = vectorised(cfg, sae, rows), heap_loop(cfg, sae, rows)
    for agg in v:
        np.testing.assert_allclose(v[agg], h[agg], rtol=1e-5, err_msg=agg)
    times: dict[str, list[float]] = {"vectorised": [], "heap loop": []}
    for _ in range(cfg.reps):
        for name, fn in (("vectorised", vectorised), ("heap loop", heap_loop)):
            t0 = time.perf_counter()
            fn(cfg, sae, rows)
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(t) for k, t in times.items()}
    print(f"top contexts, L={cfg.n_latents} k={cfg.k} N={cfg.n}, {cfg.contexts} contexts x {cfg.ctx_len} tokens, "
          f"threads={torch.get_num_threads()} (results equal)")
    for k, t in med.items():
        print(f"  {k:<11} {t * 1e3:9.1f} ms   {rows / t:12,.0f} tokens/s")
    print(f"  speedup (heap loop / vectorised): {med['heap loop'] / med['vectorised']:.1f}x")
    return 0


if __name__ == "__main__":
    run_main(main)
