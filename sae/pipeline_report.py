"""The real-model demo's extra stages (labelling by the model itself, the measured steering check) and its closing
report (labelled latents, steering effect, stage timings with the load average), for sae/pipeline.py."""
from __future__ import annotations

import itertools
import json
import os
from pathlib import Path
from typing import Any

from llama.cli import atomic_write_json, progress_bar

N_EXPLAIN = 12  # top contexts shown to the labeller: a 135M model follows a short prompt better (README)
CONTEXT_TOKENS = 24
STEER_PROMPTS = 8  # prompts of the steering check: the first tokens of the first held-out documents
STEER_MULTIPLE = 4.0  # default strength: this many times the target latent's largest activation seen


def label_stage(st: Any, cfg: Any, analysis: Path, models: Any) -> Path:
    """scripts/interpret.py --backend llama on a seeded random sample of cfg.label non-dense latents."""
    from llama.cli import save_config
    from sae.analysis.backends import LlamaBackend
    from sae.analysis.interpret import InterpretConfig, run_interpret
    from sae.analysis.top_contexts import load_top_contexts
    from sae.pipeline import EVAL_DTYPE, flags
    argv = flags(InterpretConfig, analysis=str(analysis), backend="llama", model=cfg.model, sample=cfg.label,
                 seed=cfg.seed, n_explain=N_EXPLAIN, context_tokens=CONTEXT_TOKENS, max_tokens=cfg.label_tokens,
                 prompt="simple", device=cfg.device, progress=cfg.progress)
    icfg = st.header("label latents offline with the model itself (detection-scored)", "interpret.py",
                     InterpretConfig, argv)
    (analysis / "labels.json").unlink(missing_ok=True)  # labels of a previous SAE: this one was just retrained
    save_config(icfg, analysis / "interpret_config.json")
    backend = LlamaBackend(icfg.model, icfg.device, icfg.max_tokens, icfg.temperature, icfg.batch_size, icfg.seed,
                           model=models.get(EVAL_DTYPE), tokenizer=models.tokenizer)  # make_backend, model loaded
    table = run_interpret(icfg, load_top_contexts(analysis), backend, analysis)
    print(f"{len(table['latents'])} latents labelled, {len(table['errors'])} failed: {analysis / 'labels.json'}")
    st.done("label")
    return analysis / "labels.json"


def steering_stage(st: Any, cfg: Any, sae_dir: Path, analysis: Path, text: str, out: Path, models: Any) -> dict:
    """sae.steering.check: the latent most specifically promoting one token, steered at STEER_MULTIPLE x its peak."""
    import sae as sae_pkg
    from sae.activations.inputs import expand_inputs, iter_documents
    from sae.steering.check import pick_target, special_ids, steering_check
    st.header("measured steering check (sae.steering.check.steering_check)")
    from sae.pipeline import EVAL_DTYPE
    model, tok = models.get(EVAL_DTYPE), models.tokenizer
    sae = sae_pkg.load(sae_dir, device=cfg.device)
    target = pick_target(model, sae, exclude=special_ids(tok))
    peak = _max_act(analysis, target.latent)
    strength = cfg.steer_strength or STEER_MULTIPLE * peak
    docs = list(itertools.islice(iter_documents(expand_inputs([text])), STEER_PROMPTS))
    seeds = cfg.steer_seeds
    with progress_bar(total=seeds, desc="steering", unit="seed", disable=not cfg.progress) as bar:
        res = steering_check(model, tok, sae, docs, strength, target=target, n_prompts=STEER_PROMPTS, seeds=seeds,
                             progress=bar)
    res["max_act"] = peak
    atomic_write_json(out / "steering.json", res)
    st.done("steering")
    return res


def _max_act(analysis: Path, latent: int) -> float:
    """The latent's largest activation in the top-contexts scan just run (the steering strength's unit)."""
    from sae.analysis.top_contexts import load_top_contexts
    return float(load_top_contexts(analysis).array("max_act")[latent])


def label_rows(labels_path: Path, analysis: Path, top: int = 10) -> list[dict]:
    """The labelled latents, best detection score first (unscored last): latent, freq, detection, label."""
    import numpy as np
    table = json.loads(labels_path.read_text())
    freq = np.load(analysis / "freq.npy")
    rows = [{"latent": int(k), "freq": float(freq[int(k)]), "detection": v.get("detection_score"),
             "label": v["label"]} for k, v in table["latents"].items()]
    rows.sort(key=lambda r: (r["detection"] is None, -(r["detection"] or 0.0), r["latent"]))
    return rows[:top]


def print_report(out: Path, labels: Path | None, steering: dict | None, timings: list[dict], total_s: float,
                 cfg: dict) -> None:
    if labels is not None and labels.is_file():
        table = json.loads(labels.read_text())
        scores = [v["detection_score"] for v in table["latents"].values() if v.get("detection_score") is not None]
        pairs = [(v["detection_score"], v["control_score"]) for v in table["latents"].values()
                 if v.get("detection_score") is not None and v.get("control_score") is not None]
        mean = f"mean detection score {sum(scores) / len(scores):.3f} over {len(scores)} scored" if scores else \
            "no detection scores"
        if pairs:
            mean += (f"; on {len(pairs)} with a control: {sum(d for d, _ in pairs) / len(pairs):.3f} vs "
                     f"{sum(c for _, c in pairs) / len(pairs):.3f} judged against another latent's label")
        print(f"\n=== labels by the model itself ({len(table['latents'])} labelled, {len(table['errors'])} failed; "
              f"{mean}; best 10)")
        print(f"{'latent':>6}  {'freq':>8}  {'detect':>6}  label")
        for r in label_rows(labels, labels.parent):
            det = f"{r['detection']:.2f}" if r["detection"] is not None else "-"
            print(f"{r['latent']:>6}  {r['freq']:>8.5f}  {det:>6}  {r['label']}")
    if steering is not None:
        t = steering["target"]
        print(f"\n=== steering check: latent {t['latent']} -> token {t['token_text']!r} (z {t['zscore']:.1f}), "
              f"strength {steering['strength']:.3g} (= {steering['strength'] / max(steering['max_act'], 1e-9):.1f}x "
              f"its peak activation)\n"
              f"target-token rate {steering['rate_clean']:.4f} unsteered -> {steering['rate_steered']:.4f} steered over "
              f"{steering['n_pairs']} paired completions; Cohen's d {steering['cohens_d']:.2f}, "
              f"wins/losses {steering['wins']}/{steering['losses']}, sign-test p {steering['sign_p']:.2g}")
    load = os.getloadavg()
    print(f"\n=== stage timings ({os.cpu_count()} CPUs; load average now {load[0]:.2f} {load[1]:.2f} {load[2]:.2f})")
    print(f"{'stage':<14} {'seconds':>8}  load avg (1 min) at its end")
    for t in timings:
        print(f"{t['stage']:<14} {t['seconds']:>8.1f}  {t['load_avg']:.2f}")
    print(f"{'total':<14} {total_s:>8.1f}")
    atomic_write_json(out / "timings.json", {"stages": timings, "total_seconds": round(total_s, 1),
                                             "cpus": os.cpu_count(), "load_avg_end": list(load), "config": cfg})
