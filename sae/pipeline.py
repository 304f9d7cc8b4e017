"""The whole path in one call: capture -> train SAE -> evaluate -> top contexts -> dashboard.

Each stage is the library function behind its script, configured with the same flags the script takes, so the
demo is exactly what a user would type stage by stage (the commands are printed as it goes).
"""
from __future__ import annotations

import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from llama.cli import parse_config, save_config


@dataclass
class DemoConfig:
    model: str = field(default="weights/tiny", metadata={"help": "model folder (Meta or HF layout), .gguf file, "
                                                                 "or a name: smollm2"})
    text: str = field(default="", metadata={"help": "text to capture and evaluate on (default: <model>/heldout.txt)"})
    out: str = field(default="runs/demo", metadata={"help": "output folder for every stage"})
    point: str = field(default="", metadata={"help": "capture point (default: resid_post at ~2/3 depth)"})
    val_fraction: float = field(default=0.25, metadata={"help": "documents held out for validation and the FVU (the "
                                                                "tiny text is small: a quarter gives ~6k tokens)"})
    expansion: int = field(default=8, metadata={"help": "n_latents = expansion * d_model"})
    k: int = field(default=16, metadata={"help": "active latents per token"})
    steps: int = field(default=1500, metadata={"help": "SAE optimizer steps"})
    batch_size: int = field(default=1024, metadata={"help": "SAE batch (tokens)"})
    dead_tokens: int = field(default=200_000, metadata={"help": "AuxK: a latent is dead after this many tokens unfired"})
    dashboard: bool = field(default=True, metadata={"help": "also build top contexts and the HTML dashboard"})
    device: str = field(default="cpu", metadata={"help": "cpu or cuda"})
    progress: bool = field(default=True, metadata={"help": "show progress bars"})


class DemoResult(NamedTuple):
    store: Path
    sae: Path
    metrics: dict[str, Any]
    dashboard: Path | None


def _stage(title: str, script: str, cls: type, argv: list[str]) -> Any:
    print(f"\n=== {title}\n$ python scripts/{script} {shlex.join(argv)}", flush=True)
    return parse_config(cls, argv)


def run_demo(cfg: DemoConfig) -> DemoResult:
    from sae import dist
    from sae.analysis.dashboard import DashboardConfig, build_dashboard
    from sae.analysis.run import run_top_contexts
    from sae.analysis.top_contexts import TopContextsConfig
    from sae.activations.capture import CaptureConfig, run_capture
    from sae.config import TrainConfig
    from sae.evaluate import EvalConfig, format_table, run_evaluation
    from sae.activations.source import open_source
    from sae.train import train

    t0 = time.time()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "demo_config.json")
    from llama.checkpoint import resolve_model
    from llama.cli import UserError
    if not cfg.text and resolve_model(cfg.model).is_file():
        raise UserError(f"--text: give the text to capture and evaluate on (--model {cfg.model} is a file, with no "
                        "heldout.txt beside it)")
    text = cfg.text or str(resolve_model(cfg.model) / "heldout.txt")  # every stage finds weights/tiny from any folder
    store, train_dir = out / "activations", out / "sae"
    progress = ["--progress", str(cfg.progress)]

    argv = ["--model", cfg.model, "--inputs", text, "--out", str(store), "--val-fraction", str(cfg.val_fraction),
            "--overwrite", "--device", cfg.device, *progress]  # --overwrite: a store of other settings is replaced
    run_capture(_stage("1/5 capture the residual stream", "capture.py", CaptureConfig,
                       argv + (["--points", cfg.point] if cfg.point else [])))

    argv = ["--store", str(store), "--out", str(train_dir), "--expansion", str(cfg.expansion), "--k", str(cfg.k),
            "--steps", str(cfg.steps), "--batch-size", str(cfg.batch_size), "--dead-tokens", str(cfg.dead_tokens),
            "--device", cfg.device, "--overwrite", *progress]  # a rerun of the demo retrains its SAE
    tcfg = _stage("2/5 train a TopK SAE", "train_sae.py", TrainConfig, argv)
    info = dist.init(tcfg.device)
    try:
        stopped = train(tcfg, open_source(tcfg.store), info).stopped
    finally:
        dist.cleanup()
    if stopped:  # Ctrl-C: the trainer wrote its checkpoint and said so; the demo ends here
        raise KeyboardInterrupt
    sae_dir = train_dir / "sae"

    argv = ["--sae", str(sae_dir), "--store", str(store), "--model", cfg.model, "--text", text, "--device", cfg.device]
    metrics = run_evaluation(_stage("3/5 evaluate (L0, FVU, dead/dense, CE-loss recovered)", "evaluate.py",
                                    EvalConfig, argv))
    dash = None
    if cfg.dashboard:
        analysis = out / "analysis"
        argv = ["--sae", str(sae_dir), "--store", str(store), "--model", cfg.model, "--out", str(analysis),
                "--device", cfg.device, *progress]
        run_top_contexts(_stage("4/5 top-activating contexts for every latent", "top_contexts.py",
                                TopContextsConfig, argv))
        argv = ["--analysis", str(analysis), "--sae", str(sae_dir), "--out", str(out / "dashboard"), *progress]
        dash = build_dashboard(_stage("5/5 static HTML dashboard", "dashboard.py", DashboardConfig, argv))

    print("\n=== SAE metrics (held-out)\n" + format_table(metrics))
    if dash is not None:
        print(f"dashboard: open {dash}")
    print(f"demo finished in {time.time() - t0:.0f} s; everything is under {out}/")
    return DemoResult(store, sae_dir, metrics, dash)
