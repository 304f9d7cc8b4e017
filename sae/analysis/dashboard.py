"""A static HTML dashboard for one SAE: an overview page and one page per latent. No server, no CDN: open
`OUT/index.html` from disk (file://) and it works offline.

    index.html           metrics (L0, FVU, dead/dense, CE recovered ...), latent density histogram, training curves,
                         a table of every latent with search by label (assets/app.js)
    latents/{l}.html     label + scores, activation histogram, top contexts (max / mean / last) with per-token
                         highlighting, promoted / suppressed tokens, previous / next links

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
    max_latents: int = field(default=0, metadata={"help": "pages for the first N latents only (0: all)"})
    title: str = field(default="", metadata={"help": "page title (default: from the SAE's cfg)"})
    progress: bool = True

    def __post_init__(self) -> None:
        if self.contexts <= 0 or self.max_latents < 0:
            raise UserError(f"--contexts must be positive and --max-latents >= 0, got {self.contexts}, {self.max_latents}")


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


# ---- page pieces --------------------------------------------------------------------------------------------
def page(title: str, body: str, depth: int = 0) -> str:
    up = "../" * depth
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><title>{escape(title)}</title>'
            f'<link rel="stylesheet" href="{up}assets/style.css"></head><body>'
            f'<header><a href="{up}index.html" class="home">SAE dashboard</a></header><main>{body}</main>'
            f'<script src="{up}assets/app.js"></script></body></html>\n')


def token_html(tok: str) -> str:
    return escape(tok.replace("\n", "\u21b5").replace("\t", "\u21e5")) or "&nbsp;"


def context_html(ctx: dict, scale: float) -> str:
    """One context with each token shaded by this latent's activation (scale = the latent's max activation)."""
    spans = []
    for j, (tok, a) in enumerate(zip(ctx["tokens"], ctx["acts"])):
        alpha = 0.0 if scale <= 0 else min(1.0, max(0.0, a / scale))
        cls = "t pk" if ctx["start"] + j == ctx["pos"] else "t"
        style = f' style="background:rgba(255,120,0,{alpha:.2f})"' if alpha > 0 else ""
        spans.append(f'<span class="{cls}"{style} title="{fmt(a)}" data-act="{a:.4g}">{token_html(tok)}</span>')
    return f'<div class="ctx"><span class="score">{fmt(ctx["score"])}</span><span class="toks">{"".join(spans)}</span></div>'


def tokens_table(rows: list[dict], title: str) -> str:
    body = "".join(f"<tr><td class=tok>{token_html(r['token'])}</td><td class=num>{fmt(r['logit'])}</td></tr>" for r in rows)
    return (f'<div class="card"><h3>{escape(title)}</h3>'
            + (f"<table>{body}</table>" if rows else "<p class=muted>no model was given to top_contexts</p>") + "</div>")


def latent_page(rec: dict, lab: dict | None, n_latents: int, n_ctx: int) -> str:
    l = rec["latent"]
    name = lab.get("label", "") if lab else ""
    head = f"<h1>Latent {l}{': ' + escape(name) if name else ''}</h1>"
    nav = (f'<nav class="pager">' + (f'<a href="{l - 1}.html" id="prev">&larr; {l - 1}</a>' if l > 0 else "")
           + '<a href="../index.html">all latents</a>'
           + (f'<a href="{l + 1}.html" id="next">{l + 1} &rarr;</a>' if l + 1 < n_latents else "") + "</nav>")
    info = ""
    if lab:
        det = lab.get("detection_score")
        info = (f'<p class="desc">{escape(str(lab.get("description", "")))}</p><p class="muted">confidence '
                f'{fmt(lab.get("confidence"))} &middot; detection score {fmt(det) if det is not None else "not scored"}</p>')
    stats = "".join(f'<div class="stat"><b>{v}</b><span>{k}</span></div>' for k, v in (
        ("firing frequency", fmt(rec["freq"])), ("tokens fired", fmt(rec["fire_count"])),
        ("max activation", fmt(rec["max_act"])), ("mean activation", fmt(rec["mean_act"]))))
    edges, counts = rec["hist"]["edges"], rec["hist"]["counts"]
    hist = "<h3>activation histogram (non-zero)</h3>" + bar_chart(counts, edges[0], edges[-1], "activation histogram",
                                                                  "activation", log_y=True)
    ctx_html = ""
    for agg, title in AGG_TITLES.items():
        ctxs = rec.get(agg, [])[:n_ctx]
        inner = "".join(context_html(c, rec["max_act"]) for c in ctxs) or "<p class=muted>never fired</p>"
        ctx_html += f'<section class="contexts" id="{agg}"><h2>Top contexts by {title}</h2>{inner}</section>'
    tokens = f'<div class="row">{tokens_table(rec["promoted"], "promoted tokens")}{tokens_table(rec["suppressed"], "suppressed tokens")}</div>'
    body = (f'{nav}{head}{info}<div class="stats">{stats}</div><div class="row"><div class="card">{hist}</div></div>'
            f'{tokens}{ctx_html}')
    return page(f"Latent {l} {name}".strip(), body, depth=1)


def overview_page(title: str, cfg_json: dict, evals: dict[str, float], freq: np.ndarray, metrics: list[dict],
                  rows: list[str], summary: dict) -> str:
    n = len(freq)
    dead, dense = float((freq == 0).mean()) if n else 0.0, float((freq > DENSE_FREQ).mean()) if n else 0.0
    cards = [("latents", fmt(n)), ("k", fmt(cfg_json.get("k", "-")) if isinstance(cfg_json.get("k"), (int, float)) else "-"),
             ("dead (analysed tokens)", f"{dead:.1%}"), ("dense >10% (analysed tokens)", f"{dense:.1%}"),
             ("tokens analysed", fmt(summary.get("n_tokens", 0)))]
    for key in sorted(evals):
        if key.split(".")[-1].lower() in HEADLINE:
            cards.append((key, fmt(evals[key])))
    cards_html = "".join(f'<div class="stat"><b>{v}</b><span>{escape(k)}</span></div>' for k, v in cards)
    logf = np.log10(freq[freq > 0]) if n else np.zeros(0)
    counts, _ = np.histogram(logf, bins=28, range=(-7.0, 0.0))
    density = (f"<h3>latent density ({int((freq == 0).sum())} never fired)</h3>"
               + bar_chart(counts.tolist(), -7, 0, "latent density", "log10 firing frequency"))
    curves = ""
    if metrics:
        xkey = "step" if any("step" in m for m in metrics) else None
        keys = sorted({k for m in metrics for k, v in m.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                       and k not in ("step", "tokens", "time", "elapsed", "epoch")})
        for k in keys[:12]:
            pts = [(m.get(xkey, i) if xkey else i, m[k]) for i, m in enumerate(metrics)
                   if isinstance(m.get(k), (int, float)) and math.isfinite(m[k])]
            if len(pts) >= 2 and len({p[1] for p in pts}) > 1:  # constant series say nothing as a curve
                curves += f'<div class="card"><h3>{escape(k)}</h3>{line_chart([p[0] for p in pts], [p[1] for p in pts], k)}</div>'
    curves = f'<h2>Training curves</h2><div class="row">{curves}</div>' if curves else \
        '<h2>Training curves</h2><p class="muted">no training metrics JSONL found (--metrics)</p>'
    eval_rows = "".join(f"<tr><td>{escape(k)}</td><td class=num>{fmt(v)}</td></tr>" for k, v in sorted(evals.items()))
    eval_html = f'<div class="card"><h3>Evaluation</h3><table>{eval_rows}</table></div>' if evals else ""
    cfg_rows = "".join(f"<tr><td>{escape(str(k))}</td><td>{escape(str(v))}</td></tr>" for k, v in cfg_json.items()
                       if not isinstance(v, (dict, list)))
    table = ('<h2>Latents</h2><input id="search" type="search" placeholder="search labels or latent number" '
             'autocomplete="off"> <span id="count"></span><table id="latents" class="latents"><thead><tr><th>latent</th>'
             '<th>label</th><th>freq</th><th>max act</th><th>detection</th><th>confidence</th></tr></thead><tbody>'
             + "".join(rows) + "</tbody></table>")
    body = (f'<h1>{escape(title)}</h1><div class="stats">{cards_html}</div><div class="row"><div class="card">{density}'
            f'</div>{eval_html}<div class="card"><h3>SAE config</h3><table>{cfg_rows}</table></div></div>{curves}{table}')
    return page(title, body)


def index_row(rec: dict, lab: dict | None) -> str:
    l, label = rec["latent"], (lab or {}).get("label", "")
    det, conf = (lab or {}).get("detection_score"), (lab or {}).get("confidence")
    text = escape(f"{l} {label} {(lab or {}).get('description', '')}".lower(), quote=True)
    return (f'<tr data-search="{text}"><td><a href="latents/{l}.html">{l}</a></td><td>{escape(str(label))}</td>'
            f'<td class=num>{fmt(rec["freq"])}</td><td class=num>{fmt(rec["max_act"])}</td>'
            f'<td class=num>{fmt(det) if det is not None else ""}</td><td class=num>{fmt(conf) if conf is not None else ""}</td></tr>')


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

    (out / "latents").mkdir(parents=True, exist_ok=True)
    (out / "assets").mkdir(exist_ok=True)
    for f in ASSETS.iterdir():
        shutil.copyfile(f, out / "assets" / f.name)
    n = tc.n_latents if cfg.max_latents == 0 else min(cfg.max_latents, tc.n_latents)
    rows = []
    for l in progress_bar(range(n), desc="dashboard pages", disable=not cfg.progress):
        rec = tc.latent(l)
        atomic_write_bytes(out / "latents" / f"{l}.html", latent_page(rec, labels.get(l), n, cfg.contexts).encode())
        rows.append(index_row(rec, labels.get(l)))
    title = cfg.title or f"SAE {cfg_json.get('hook_name', tc.summary.get('hook_name', ''))} " \
                         f"{cfg_json.get('model', cfg_json.get('model_name', ''))}".strip()
    freq = np.asarray(tc.array("freq"), dtype=np.float64)
    atomic_write_bytes(out / "index.html", overview_page(title, cfg_json, evals, freq, metrics, rows, tc.summary).encode())
    save_config(cfg, out / "dashboard_config.json")
    return out / "index.html"
