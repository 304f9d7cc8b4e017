"""A static HTML dashboard for one SAE: an overview page and one page that shows any latent. No server, no CDN:
open `OUT/index.html` from disk (file://) and it works offline.

    index.html           metrics (L0, FVU, CE recovered ..., one named dead / dense figure), latent density
                         histogram, training curves, a table of every latent (search by label, sort by column)
    latent.html#{l}      label + scores, activation histogram, top contexts (max / mean / last) with per-token
                         highlighting, promoted / suppressed tokens, previous / next links
    data/                the per-latent data, compact, one script per 64 latents (sae/analysis/dashboard_data.py):
                         a 65,536-latent dashboard is a few hundred MB, and a page loads one shard

Inputs: the analysis folder of scripts/top_contexts.py (read with `load_top_contexts`), its labels.json (from
scripts/interpret.py, optional), the SAE's cfg.json, an evaluation JSON and the training metrics JSONL (optional).
"""
from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass, field
from html import escape
from pathlib import Path
from typing import Any

import numpy as np

from llama.cli import UserError, atomic_write_bytes, progress_bar, save_config
from sae.analysis.charts import bar_chart, fmt, line_chart
from sae.analysis.dashboard_data import write_data

ASSETS = Path(__file__).with_name("dashboard_assets")
DENSE_FREQ = 0.1  # a latent firing on more than 10% of tokens is "dense" (DESIGN.md)
HEADLINE = {"l0", "fvu", "dead", "dead_fraction", "dense", "dense_fraction", "ce_loss_recovered", "delta_lm_loss"}
AGG_TITLES = {"max": "max token activation", "mean": "mean over the context", "last": "last token"}


@dataclass
class DashboardConfig:
    """Flags of `scripts/dashboard.py`."""
    analysis: str = field(default="runs/analysis", metadata={"help": "folder written by scripts/top_contexts.py"})
    out: str = field(default="runs/dashboard", metadata={"help": "output folder (open OUT/index.html)"})
    labels: str = field(default="", metadata={"help": "labels.json from scripts/interpret.py (default: ANALYSIS/labels.json if present)"})
    sae: str = field(default="", metadata={"help": "SAE folder, for cfg.json (default: the analysis summary's)"})
    eval: str = field(default="", metadata={"help": "evaluation JSON (default: eval.json / evaluate.json beside the SAE)"})
    metrics: str = field(default="", metadata={"help": "training metrics JSONL (default: metrics.jsonl beside the SAE)"})
    contexts: int = field(default=20, metadata={"help": "top contexts shown per aggregation on a latent page"})
    window: int = field(default=24, metadata={"help": "tokens shown per context around the latent's peak (<= 64; "
                                                         "sets the size: ~7 KB per latent at 24)"})
    max_latents: int = field(default=0, metadata={"help": "pages for the first N latents only (0: all)"})
    title: str = field(default="", metadata={"help": "page title (default: from the SAE's cfg)"})
    progress: bool = True

    def __post_init__(self) -> None:
        if not 0 < self.contexts <= 1000 or self.max_latents < 0 or not 0 < self.window <= 64:
            raise UserError(f"--contexts must be in 1..1000, --window in 1..64 and --max-latents >= 0, got "
                            f"{self.contexts}, {self.window}, {self.max_latents}")


# ---- inputs -------------------------------------------------------------------------------------------------
def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{what} {path}: cannot read it as JSON ({e})") from e


def read_labels(path: Path) -> dict[int, dict]:
    """labels.json -> {latent: {"label", "description", "confidence", "detection_score"}}."""
    data = _read_json(path, "--labels")
    if not isinstance(data, dict) or not isinstance(data.get("latents"), dict):
        raise UserError(f"--labels {path}: expected a labels.json from scripts/interpret.py with a 'latents' object")
    return {int(k): v for k, v in data["latents"].items() if isinstance(v, dict)}


def read_metrics(path: Path) -> list[dict]:
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise UserError(f"--metrics {path}: line {n} is not JSON ({e})") from e
    return [r for r in rows if isinstance(r, dict)]


def flat_scalars(d: Any, prefix: str = "") -> dict[str, float]:
    """Nested dict -> {"a.b": number} for every numeric leaf."""
    out: dict[str, float] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(flat_scalars(v, f"{prefix}{k}."))
    elif isinstance(d, (int, float)) and not isinstance(d, bool):
        out[prefix[:-1]] = float(d)
    return out


def _first(path_opt: str, candidates: list[Path]) -> Path | None:
    if path_opt:
        p = Path(path_opt)
        if not p.is_file():
            raise UserError(f"file not found: {p}")
        return p
    return next((c for c in candidates if c.is_file()), None)


# ---- the overview page --------------------------------------------------------------------------------------
# metric names as a reader wants them (eval.json / metrics.jsonl keys -> words); unknown keys are shown as they are
NAMES = {"l0": "L0 (active latents per token)", "fvu": "FVU (fraction of variance unexplained)",
         "tokens": "held-out tokens (L0, FVU)", "ce_clean": "CE loss, clean model (nats/token)",
         "ce_sae": "CE loss, SAE spliced in", "ce_zero_ablation": "CE loss, activation zeroed",
         "ce_mean_ablation": "CE loss, activation mean-ablated", "ce_loss_recovered": "CE loss recovered (vs zeroed)",
         "ce_loss_recovered_mean_ablation": "CE loss recovered (vs mean-ablated)",
         "delta_lm_loss": "\u0394 LM loss (SAE \u2212 clean, nats/token)", "lm_tokens": "held-out tokens (CE loss)",
         "n_latents": "latents", "k": "k (active latents per token)"}
CURVES = {"fvu": "FVU (training batch)", "val_fvu": "FVU (validation)", "l0": "L0 (training batch)",
          "val_l0": "L0 (validation)", "loss": "training loss", "auxk": "AuxK loss", "lr": "learning rate",
          "grad_norm": "gradient norm", "tokens_per_s": "tokens / s",
          "dead": "training's dead share (unfired for --dead-tokens tokens; AuxK's)",
          "dense": "training's dense share (last log window)", "unfired_window": "unfired in the last log window"}
HIDDEN = {"dead", "dead_fraction", "dense", "dense_fraction", "density_hist", "sae", "hook_name"}  # one dead figure


def page(title: str, body: str, scripts: tuple[str, ...] = ()) -> str:
    # app.js first: it defines the window.__meta / __index / __vocab receivers the data scripts call
    tags = "".join(f'<script src="{s}"></script>' for s in ("assets/app.js", "data/meta.js", *scripts))
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><title>{escape(title)}</title>'
            f'<link rel="stylesheet" href="assets/style.css"></head><body>'
            f'<header><a href="index.html" class="home">SAE dashboard</a></header><main>{body}</main>{tags}'
            f'</body></html>\n')


def stat(name: str, value: str, note: str = "") -> str:
    title = f' title="{escape(note, quote=True)}"' if note else ""
    return f'<div class="stat"{title}><b>{value}</b><span>{escape(name)}</span></div>'


def overview_page(title: str, cfg_json: dict, evals: dict[str, float], freq: np.ndarray, metrics: list[dict],
                  summary: dict) -> str:
    n, n_tok = len(freq), int(summary.get("n_tokens", 0))
    dead, dense = int((freq == 0).sum()), int((freq > DENSE_FREQ).sum())
    cards = [stat("latents", fmt(n)), stat("tokens analysed (top contexts)", fmt(n_tok)),
             stat("dead latents", f"{dead:,} ({dead / max(n, 1):.1%})",
                  f"never fired on the {n_tok:,} tokens analysed by top_contexts"),
             stat(f"dense latents (fire on >{DENSE_FREQ:.0%} of tokens)", f"{dense:,} ({dense / max(n, 1):.1%})",
                  f"on the {n_tok:,} tokens analysed by top_contexts")]
    if isinstance(cfg_json.get("k"), (int, float)):
        cards.insert(1, stat(NAMES["k"], fmt(cfg_json["k"])))
    for key in ("l0", "fvu", "ce_loss_recovered", "delta_lm_loss"):
        hit = next((k for k in evals if k.split(".")[-1] == key), None)
        if hit is not None:
            cards.append(stat(NAMES[key], fmt(evals[hit]), "from eval.json (scripts/evaluate.py, held-out tokens)"))
    logf = np.log10(freq[freq > 0]) if n else np.zeros(0)
    counts, _ = np.histogram(logf, bins=28, range=(-7.0, 0.0))
    density = ("<h3>latent density: firing frequency on the analysed tokens (dead latents not shown)</h3>"
               + bar_chart(counts.tolist(), -7, 0, "latent density", "log10 firing frequency"))
    curves = ""
    if metrics:
        xkey = "step" if any("step" in m for m in metrics) else None
        keys = sorted({k for m in metrics for k, v in m.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                       and k not in ("step", "tokens", "time", "elapsed", "epoch")})
        for k in keys[:14]:
            pts = [(m.get(xkey, i) if xkey else i, m[k]) for i, m in enumerate(metrics)
                   if isinstance(m.get(k), (int, float)) and math.isfinite(m[k])]
            if len(pts) >= 2 and len({p[1] for p in pts}) > 1:  # constant series say nothing as a curve
                curves += (f'<div class="card"><h3>{escape(CURVES.get(k, k))}</h3>'
                           f'{line_chart([p[0] for p in pts], [p[1] for p in pts], CURVES.get(k, k))}</div>')
    curves = f'<h2>Training curves</h2><div class="row">{curves}</div>' if curves else \
        '<h2>Training curves</h2><p class="muted">no training metrics JSONL found (--metrics)</p>'
    shown = {k: v for k, v in sorted(evals.items()) if not HIDDEN & set(k.split("."))}
    eval_rows = "".join(f"<tr><td>{escape(NAMES.get(k.split('.')[-1], k))}</td><td class=num>{fmt(v)}</td></tr>"
                        for k, v in shown.items())
    eval_html = f'<div class="card"><h3>Evaluation (eval.json)</h3><table>{eval_rows}</table></div>' if shown else ""
    cfg_rows = "".join(f"<tr><td>{escape(str(k))}</td><td>{escape(str(v))}</td></tr>" for k, v in cfg_json.items()
                       if not isinstance(v, (dict, list)))
    table = ('<h2>Latents</h2><input id="search" type="search" placeholder="search labels or latent number" '
             'autocomplete="off"> <span id="count"></span><table id="latents" class="latents"><thead><tr>'
             '<th data-key="latent">latent</th><th data-key="label">label</th><th data-key="freq">freq</th>'
             '<th data-key="max">max act</th><th data-key="det">detection</th><th data-key="conf">confidence</th>'
             '</tr></thead><tbody></tbody></table><button id="more" hidden>show more</button>'
             '<noscript>The latents table and the latent pages need JavaScript.</noscript>')
    body = (f'<h1>{escape(title)}</h1><div class="stats">{"".join(cards)}</div><div class="row"><div class="card">'
            f'{density}</div>{eval_html}<div class="card"><h3>SAE config</h3><table>{cfg_rows}</table></div></div>'
            f'{curves}{table}')
    return page(title, body, ("data/index.js",))


def latent_shell(title: str, has_vocab: bool) -> str:
    """latent.html: one page for every latent (latent.html#123), filled in by assets/app.js from data/."""
    body = ('<nav class="pager"><a id="prev" href="#">&larr;</a><a href="index.html">all latents</a>'
            '<a id="next" href="#">&rarr;</a></nav><div id="latent"><p class="muted">loading...</p></div>'
            '<noscript>Latent pages need JavaScript.</noscript>')
    return page(title, body, ("data/vocab.js",) if has_vocab else ())


# ---- build --------------------------------------------------------------------------------------------------
def build_dashboard(cfg: DashboardConfig) -> Path:
    from sae.analysis.top_contexts import load_top_contexts
    tc = load_top_contexts(cfg.analysis)
    analysis, out = Path(cfg.analysis), Path(cfg.out)
    labels_path = _first(cfg.labels, [analysis / "labels.json"])
    labels = read_labels(labels_path) if labels_path else {}
    sae_dir = Path(cfg.sae or tc.summary.get("sae") or "")
    cfg_json = _read_json(sae_dir / "cfg.json", "--sae") if (sae_dir / "cfg.json").is_file() else {}
    if cfg.sae and not cfg_json:
        raise UserError(f"--sae {cfg.sae}: no cfg.json there (expected an SAE folder)")
    near = [sae_dir, sae_dir.parent] if str(sae_dir) else []
    eval_path = _first(cfg.eval, [d / n for d in near for n in ("eval.json", "evaluate.json", "evaluation.json")])
    evals = flat_scalars(_read_json(eval_path, "--eval")) if eval_path else {}
    metrics_path = _first(cfg.metrics, [d / "metrics.jsonl" for d in near])
    metrics = read_metrics(metrics_path) if metrics_path else []

    if (out / "dashboard_config.json").is_file():  # an earlier dashboard here: none of its files may linger
        for old in ("data", "latents", "assets"):
            shutil.rmtree(out / old, ignore_errors=True)
    (out / "assets").mkdir(parents=True, exist_ok=True)
    for f in ASSETS.iterdir():
        shutil.copyfile(f, out / "assets" / f.name)
    n = tc.n_latents if cfg.max_latents == 0 else min(cfg.max_latents, tc.n_latents)
    title = cfg.title or f"SAE {cfg_json.get('hook_name', tc.summary.get('hook_name', ''))} " \
                         f"{cfg_json.get('model', cfg_json.get('model_name', ''))}".strip()
    bar = lambda it: progress_bar(it, desc="dashboard data", unit="shard", disable=not cfg.progress)  # noqa: E731
    meta = {"title": title, "aggs": AGG_TITLES, "bins": int(tc.summary.get("hist_bins", 64))}
    write_data(out, tc, labels, n, cfg.contexts, cfg.window, meta, bar)
    freq = np.asarray(tc.array("freq"), dtype=np.float64)
    atomic_write_bytes(out / "latent.html", latent_shell(title, tc.vocab is not None).encode())
    atomic_write_bytes(out / "index.html", overview_page(title, cfg_json, evals, freq, metrics, tc.summary).encode())
    save_config(cfg, out / "dashboard_config.json")
    return out / "index.html"
