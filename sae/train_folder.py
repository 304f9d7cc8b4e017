"""The --out folder of an SAE training run: what it holds, and the rule that one folder holds one SAE's results.

A training run writes OUT/train_config.json, OUT/metrics.jsonl, OUT/checkpoint.pt and, when it finishes, OUT/sae/
(the SAE file). Later stages may write results of that SAE into the same folder: OUT/sae/eval.json (evaluate), an
analysis folder (top_contexts, interpret), a dashboard. Starting a new run there would leave those results beside
an SAE they do not describe, so:

    fresh folder (or one without any of the above)  -> train
    a previous run or its results, no flag          -> refused: --resume continues it, --overwrite replaces it
    --overwrite                                     -> the old run and every result of its SAE are deleted first
    --resume                                        -> continue from OUT/checkpoint.pt; an error when there is none

Other files in the folder (the user's own) are left alone.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from llama.cli import UserError

CHECKPOINT = "checkpoint.pt"
TRAIN_FILES = ("train_config.json", "metrics.jsonl", CHECKPOINT)
SAE_DIR = "sae"
EVAL_FILES = ("eval.json", "eval.txt", "eval_config.json")  # scripts/evaluate.py --out OUT
ANALYSIS_FORMAT = "llama-sae-top-contexts/"  # summary.json of scripts/top_contexts.py
DASHBOARD_MARK = "dashboard_config.json"  # written by scripts/dashboard.py into its folder


def _is_results_folder(d: Path) -> bool:
    """An analysis folder (scripts/top_contexts.py, scripts/interpret.py) or a dashboard (scripts/dashboard.py)."""
    if (d / DASHBOARD_MARK).is_file():
        return True
    try:
        summary = json.loads((d / "summary.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(summary, dict) and str(summary.get("format", "")).startswith(ANALYSIS_FORMAT)


def previous_run(out: Path) -> list[Path]:
    """Everything in `out` that an earlier training run or a later stage on its SAE wrote."""
    if not out.is_dir():
        return []
    found = [out / n for n in (*TRAIN_FILES, SAE_DIR, *EVAL_FILES) if (out / n).exists()]
    found += [d for d in sorted(out.iterdir()) if d.is_dir() and d.name != SAE_DIR and _is_results_folder(d)]
    return found


def prepare(out: Path, resume: bool, overwrite: bool, is_main: bool = True) -> bool:
    """Apply the module docstring's rule to `out`; True when the run resumes from OUT/checkpoint.pt."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder")
    if resume and overwrite:
        raise UserError("--resume continues the run in --out and --overwrite deletes it: give one of them")
    if resume:
        if (out / CHECKPOINT).is_file():
            return True
        finished = " (it holds an SAE but no checkpoint)" if (out / SAE_DIR).exists() else ""
        raise UserError(f"--resume: nothing to resume, {out / CHECKPOINT} does not exist{finished}; drop --resume "
                        f"to start a new run")
    old = previous_run(out)
    if old and not overwrite:
        names = ", ".join(p.name + ("/" if p.is_dir() else "") for p in old)
        raise UserError(f"--out {out} already holds a training run or results of its SAE ({names}); pass --resume "
                        f"to continue it, --overwrite to delete all of that and train a new SAE, or choose another "
                        f"--out")
    if old and is_main:
        for p in old:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        print(f"--overwrite: deleted the previous run in {out}: {', '.join(p.name for p in old)}")
    return False
