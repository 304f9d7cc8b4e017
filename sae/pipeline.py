"""The whole path in one call: [corpus] -> capture -> train SAE -> evaluate -> top contexts -> [label] -> dashboard
-> [steering check].

Each stage is the library function behind its script, configured with the same flags the script takes, so the
demo is exactly what a user would type stage by stage (the commands are printed as it goes). Two presets:
  tiny  the embedded weights/tiny on its heldout.txt (a quarter of its documents held out), ~1-2 minutes;
  real  any other model (`--model smollm2`): the offline corpus (sae/activations/offline_corpus.py) written to
        OUT/corpus/, its training documents captured in bf16 to OUT/activations, its held-out documents to
        OUT/activations_heldout (every metric is measured there), latents labelled by the model itself (the llama
        interpretation backend, in its chat format) with detection scores, and a measured steering check.
Any flag left at its "preset" value (0, -1, "", "auto") takes the preset's value; the resolved config is saved.
"""
from __future__ import annotations

import json
import os
import shlex
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple

from llama.cli import UserError, config_to_dict, parse_config, save_config

EVAL_DTYPE = "float32"  # evaluation, logit lens, labelling and steering (README "Real model": bf16 vs fp32)
# Presets. real: measured on SmolLM2-135M (README "Real model"; `python bench/demo_sweep.py` reruns the sweep).
TINY = dict(mode="sentences", ctx_len=64, dtype="auto", expansion=8, k=16, steps=1500, batch_size=1024,
            dead_tokens=200_000, lm_seqs=64, label=0, label_tokens=32, steering="off", min_pos=0, lr=0.0)
REAL = dict(mode="windows", ctx_len=128, dtype="bfloat16", point="blocks.14.hook_resid_post", expansion=8, k=32,
            steps=800, batch_size=2048, dead_tokens=400_000, lm_seqs=48, label=32, label_tokens=32, steering="on",
            min_pos=2, lr=3e-3)


@dataclass
class DemoConfig:
    model: str = field(default="weights/tiny", metadata={"help": "model folder (Meta or HF layout), .gguf file, "
                                                                 "or a name: smollm2"})
    text: str = field(default="", metadata={"help": "text to capture and evaluate on (default: <model>/heldout.txt "
                                                    "for the tiny model, else the offline corpus)"})
    out: str = field(default="", metadata={"help": "output folder for every stage (default: runs/demo for the tiny "
                                                   "model, runs/demo-<model name> otherwise)"})
    point: str = field(default="", metadata={"help": "capture point (default: the preset's; tiny: resid_post at ~2/3 "
                                                     "depth)"})
    mode: str = field(default="", metadata={"choices": ["", "sentences", "windows"],
                                            "help": "capture contexts (default: sentences tiny, windows real)"})
    ctx_len: int = field(default=0, metadata={"help": "tokens per context, BOS included (0: 64 tiny, 128 real)"})
    dtype: str = field(default="", metadata={"choices": ["", "auto", "float32", "bfloat16"],
                                             "help": "capture forward dtype (default: auto tiny, bfloat16 real)"})
    min_pos: int = field(default=-1, metadata={"help": "store no position below this in a context (-1: preset: 0 "
                                                       "tiny; 2 real, SmolLM2 makes a delimiter at position 1 a "
                                                       "second attention sink)"})
    max_docs: int = field(default=0, metadata={"help": "capture at most this many documents of each file (0: all)"})
    val_fraction: float = field(default=0.25, metadata={"help": "one text (tiny, --text): documents held out for "
                                                                "validation and the FVU (the tiny text is small: a "
                                                                "quarter gives ~6k tokens)"})
    expansion: int = field(default=0, metadata={"help": "n_latents = expansion * d_model (0: preset)"})
    k: int = field(default=0, metadata={"help": "active latents per token (0: preset)"})
    steps: int = field(default=0, metadata={"help": "SAE optimizer steps (0: preset)"})
    batch_size: int = field(default=0, metadata={"help": "SAE batch in tokens (0: preset)"})
    lr: float = field(default=0.0, metadata={"help": "SAE peak learning rate (0: preset: the trainer's rule tiny, "
                                                    "3e-3 real: at 600 steps 2e-3 / 4e-3 gave held-out FVU 0.161 / "
                                                    "0.145, the trainer's rule (3.8e-4) 0.259)"})
    dead_tokens: int = field(default=0, metadata={"help": "AuxK: a latent is dead after this many tokens unfired "
                                                          "(0: preset)"})
    lm_seqs: int = field(default=0, metadata={"help": "held-out sequences of 128 tokens for CE-loss recovered "
                                                      "(0: preset)"})
    label: int = field(default=-1, metadata={"help": "latents labelled by the model itself, a seeded random sample "
                                                     "of the non-dense ones (-1: preset: 0 tiny, 32 real)"})
    label_tokens: int = field(default=0, metadata={"help": "answer length limit of the labeller (0: preset)"})
    steering: str = field(default="auto", metadata={"choices": ["auto", "on", "off"],
                                                    "help": "measured steering check (auto: on for a real model)"})
    steer_strength: float = field(default=0.0, metadata={"help": "steering strength (0: 4x the latent's max "
                                                                 "activation)"})
    steer_seeds: int = field(default=8, metadata={"help": "steering check: samples per prompt (8 prompts, 24 new "
                                                          "tokens each, steered and unsteered)"})
    seed: int = field(default=0, metadata={"help": "seed of the SAE, the label sample and the steering samples"})
    dashboard: bool = field(default=True, metadata={"help": "also build top contexts and the HTML dashboard"})
    device: str = field(default="cpu", metadata={"help": "cpu or cuda"})
    progress: bool = field(default=True, metadata={"help": "show progress bars"})


class DemoResult(NamedTuple):
    store: Path
    sae: Path
    metrics: dict[str, Any]
    dashboard: Path | None
    labels: Path | None = None
    steering: dict | None = None
    timings: list[dict] | None = None  # [{"stage", "seconds", "load_avg"}] in run order


def resolve_demo(cfg: DemoConfig) -> tuple[DemoConfig, bool]:
    """Fill preset values; True when the real-model path runs (no --text and no heldout.txt beside the model)."""
    from llama.checkpoint import resolve_model
    model = resolve_model(cfg.model)
    if not model.exists():
        raise UserError(f"--model {cfg.model} does not exist (a model folder, a .gguf file, or a name: smollm2)")
    tiny = model.is_dir() and (model / "heldout.txt").is_file()
    real = not cfg.text and not tiny
    preset = REAL if not tiny else TINY
    unset = {"label": -1, "dtype": "", "mode": "", "min_pos": -1}  # every other preset field: 0 means "the preset's"
    vals = {k: (preset[k] if getattr(cfg, k) == unset.get(k, 0) else getattr(cfg, k))
            for k in preset if k not in ("point", "steering")}
    vals["point"] = cfg.point or preset.get("point", "")
    vals["steering"] = cfg.steering if cfg.steering != "auto" else preset["steering"]
    name = cfg.model if not Path(cfg.model).exists() else (model.stem if model.is_file() else model.name)
    vals["out"] = cfg.out or ("runs/demo" if tiny else f"runs/demo-{name}")
    vals["text"] = cfg.text if (cfg.text or real) else str(model / "heldout.txt")  # from any folder
    if not real and not 0.0 < cfg.val_fraction < 1.0:
        raise UserError(f"--val-fraction must be in (0, 1) when one text is both trained and evaluated on, got "
                        f"{cfg.val_fraction}")
    if cfg.label < -1 or cfg.steer_seeds < 1:
        raise UserError(f"--label must be -1 (preset), 0 (off) or a count, got {cfg.label}; --steer-seeds must be "
                        f"positive, got {cfg.steer_seeds}")
    return replace(cfg, **vals), real


class _Stages:
    """Numbers and prints each stage (with its command), times it, records the 1-minute load average at its end."""

    def __init__(self, total: int) -> None:
        self.total, self.i, self.timings = total, 0, []

    def header(self, title: str, script: str = "", cls: type | None = None, argv: list[str] = ()) -> Any:
        self.i += 1
        cmd = f"\n$ python scripts/{script} {shlex.join(argv)}" if script else ""
        print(f"\n=== {self.i}/{self.total} {title}{cmd}", flush=True)
        self.t0 = time.perf_counter()
        return parse_config(cls, list(argv)) if cls is not None else None

    def done(self, name: str) -> None:
        self.timings.append({"stage": name, "seconds": round(time.perf_counter() - self.t0, 1),
                             "load_avg": round(os.getloadavg()[0], 2)})


class Models:
    """The demo's model, loaded once per dtype and handed to every stage (a GGUF load dequantizes every tensor:
    seconds each time), with its tokenizer."""

    def __init__(self, name: str, device: str) -> None:
        self.name, self.device, self._models, self._tok = name, device, {}, None

    def get(self, dtype: str = "float32") -> Any:
        import torch

        import llama
        if dtype == "auto":  # capture's rule
            dtype = "bfloat16" if self.device.startswith("cuda") else "float32"
        if dtype not in self._models:
            self._models[dtype] = llama.load_model(self.name, device=self.device, dtype=getattr(torch, dtype)).eval()
        return self._models[dtype]

    @property
    def tokenizer(self) -> Any:
        import llama
        if self._tok is None:
            self._tok = llama.Tokenizer.from_file(llama.resolve_model(self.name))
        return self._tok


def flags(cls: type, **values: Any) -> list[str]:
    """`--name value` for each value that differs from `cls`'s default: the command a user would type."""
    defaults = config_to_dict(cls())
    argv: list[str] = []
    for name, v in values.items():
        if v == defaults.get(name):
            continue
        flag = "--" + name.replace("_", "-")
        if isinstance(v, bool):
            argv += [flag] if v else [flag, "false"]
        elif isinstance(v, (list, tuple)):
            argv += [flag, *map(str, v)]
        else:
            argv += [flag, str(v)]
    return argv


def run_demo(cfg: DemoConfig) -> DemoResult:
    from sae import dist
    from sae.activations.capture import CaptureConfig, run_capture
    from sae.activations.source import open_source
    from sae.analysis.dashboard import DashboardConfig, build_dashboard
    from sae.analysis.run import run_top_contexts
    from sae.analysis.top_contexts import TopContextsConfig
    from sae.config import TrainConfig
    from sae.evaluate import EvalConfig, format_table, run_evaluation
    from sae.pipeline_report import label_stage, print_report, steering_stage
    from sae.train import train

    t_start = time.time()
    cfg, real = resolve_demo(cfg)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "demo_config.json")
    analyse = cfg.dashboard or cfg.label > 0 or cfg.steering == "on"  # labels and steering read the top contexts
    models = Models(cfg.model, cfg.device)
    if cfg.label > 0:  # before any stage runs: the labeller's detection needs single-token yes/no
        from sae.analysis.interpret_small import check_yes_no
        check_yes_no(models.tokenizer)
    st = _Stages(3 + 2 * real + analyse + (cfg.label > 0) + cfg.dashboard + (cfg.steering == "on"))
    store, train_dir, analysis = out / "activations", out / "sae", out / "analysis"
    capture = dict(model=cfg.model, mode=cfg.mode, ctx_len=cfg.ctx_len, min_pos=cfg.min_pos, dtype=cfg.dtype,
                   max_docs=cfg.max_docs,
                   points=[cfg.point] if cfg.point else [], overwrite=True,  # a store of other settings is replaced
                   device=cfg.device, progress=cfg.progress)
    if real:
        from sae.activations.offline_corpus import build_offline_corpus, write_corpus
        st.header("build the offline corpus (Python's docs, code and texts; the OS's licenses)")
        files = write_corpus(build_offline_corpus(), out / "corpus")
        info = json.loads(files.info.read_text())
        print(", ".join(f"{k}: {v['documents']} docs" if v["status"] == "ok" else f"{k}: {v['status']}"
                        for k, v in info["sources"].items()))
        print(f"{info['train_documents']} training documents -> {files.train}; {info['heldout_documents']} held out "
              f"-> {files.heldout}")
        st.done("corpus")
        eval_text, eval_store = str(files.heldout), out / "activations_heldout"
        run_capture(st.header("capture the residual stream (training documents)", "capture.py", CaptureConfig,
                              flags(CaptureConfig, inputs=[str(files.train)], out=str(store), val_fraction=0.0,
                                    **capture)), models.get(cfg.dtype), models.tokenizer)
        st.done("capture")
        run_capture(st.header("capture the held-out documents (every row is evaluation data)", "capture.py",
                              CaptureConfig, flags(CaptureConfig, inputs=[eval_text], out=str(eval_store),
                                                   val_fraction=1.0, **capture)), models.get(cfg.dtype),
                    models.tokenizer)
        st.done("capture held-out")
    else:
        eval_text, eval_store = cfg.text, store
        run_capture(st.header("capture the residual stream", "capture.py", CaptureConfig,
                              flags(CaptureConfig, inputs=[cfg.text], out=str(store), val_fraction=cfg.val_fraction,
                                    **capture)), models.get(cfg.dtype), models.tokenizer)
        st.done("capture")

    tcfg = st.header("train a TopK SAE", "train_sae.py", TrainConfig, flags(
        TrainConfig, store=str(store), out=str(train_dir), expansion=cfg.expansion, k=cfg.k, steps=cfg.steps, lr=cfg.lr,
        batch_size=cfg.batch_size, dead_tokens=cfg.dead_tokens, seed=cfg.seed, device=cfg.device,
        overwrite=True, progress=cfg.progress))  # --overwrite: a rerun of the demo retrains its SAE
    info_d = dist.init(tcfg.device)
    try:
        stopped = train(tcfg, open_source(tcfg.store), info_d).stopped
    finally:
        dist.cleanup()
    if stopped:  # Ctrl-C: the trainer wrote its checkpoint and said so; the demo ends here
        raise KeyboardInterrupt
    st.done("train")
    sae_dir = train_dir / "sae"

    metrics = run_evaluation(st.header("evaluate on held-out text (L0, FVU, dead/dense, CE-loss recovered)",
                                       "evaluate.py", EvalConfig, flags(
        EvalConfig, sae=str(sae_dir), store=str(eval_store), model=cfg.model, text=[eval_text],
        max_seqs=cfg.lm_seqs, device=cfg.device, progress=cfg.progress)), models.get(EVAL_DTYPE), models.tokenizer)
    st.done("evaluate")
    dash = labels = steering = None
    if analyse:
        run_top_contexts(st.header("top-activating contexts for every latent", "top_contexts.py", TopContextsConfig,
                                   flags(TopContextsConfig, sae=str(sae_dir), store=str(store), model=cfg.model,
                                         out=str(analysis), device=cfg.device, progress=cfg.progress)),
                         models.get(EVAL_DTYPE), models.tokenizer)
        st.done("top contexts")
    if cfg.label > 0:
        labels = label_stage(st, cfg, analysis, models)
    if cfg.dashboard:
        dash = build_dashboard(st.header("static HTML dashboard", "dashboard.py", DashboardConfig, flags(
            DashboardConfig, analysis=str(analysis), sae=str(sae_dir), out=str(out / "dashboard"),
            progress=cfg.progress)))
        st.done("dashboard")
    if cfg.steering == "on":
        steering = steering_stage(st, cfg, sae_dir, analysis, eval_text, out, models)

    print("\n=== SAE metrics (held-out)\n" + format_table(metrics))
    print_report(out, labels, steering, st.timings, time.time() - t_start, config_to_dict(cfg))
    if dash is not None:
        print(f"dashboard: open {dash}")
    print(f"demo finished in {time.time() - t_start:.0f} s; everything is under {out}/")
    return DemoResult(store, sae_dir, metrics, dash, labels, steering, st.timings)
