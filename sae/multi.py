"""Many SAEs from one stream: the flags of store-free training (StreamTrainConfig) and the plan of SAEs it trains.

    cfg = StreamTrainConfig(model="weights/tiny", points=["blocks.1.hook_resid_post", "blocks.2.hook_resid_post"],
                            expansion=[8, 16], k=[16, 32])            # 2 points x 4 shapes = 8 SAEs
    jobs = plan_jobs(cfg, d_model=128, points=cfg.points, world_size=1)

Every SAE is one `Job`: its capture point, a shape name (`topk-x8-k32`, `relu-n4096`), the single-SAE TrainConfig
that sae.train.Trainer trains it with, its output folder OUT/<point>/<shape>/ and (with --distribute-saes) the rank
that owns it. StreamTrainConfig is TrainConfig (every SAE flag) + ContextConfig (capture's model / inputs / context
flags, one definition) with the shape flags turned into lists; `scripts/train_sae.py` parses it.
"""
from __future__ import annotations

import dataclasses
import itertools
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from llama.cli import UserError
from sae.activations.capture import ContextConfig
from sae import train_folder
from sae.config import ARCHITECTURES, TrainConfig


@dataclass
class StreamTrainConfig(TrainConfig, ContextConfig):
    """Flags of `scripts/train_sae.py`: --store trains one SAE from an activation store; without it, SAEs are
    trained straight from the model (--model, --inputs, --points: several points and shapes in one run)."""
    architecture: list[str] = field(default_factory=lambda: ["topk"], metadata={
        "help": "SAE kind(s); one SAE per kind x width x k", "choices": list(ARCHITECTURES)})
    expansion: list[int] = field(default_factory=lambda: [8], metadata={
        "help": "n_latents = expansion * d_model, one or more (unless --n-latents)"})
    n_latents: list[int] = field(default_factory=list, metadata={"help": "numbers of latents (overrides --expansion)"})
    k: list[int] = field(default_factory=lambda: [32], metadata={"help": "active latents per token, one or more"})
    buffer_batches: int = field(default=0, metadata={
        "help": "store-free: shuffle buffer of this many SAE batches of rows per point and data shard (0: enough "
                "for 16 SAE batches and 8 forward batches, see buffer_batches_for; memory per rank: points x "
                "buffer_batches x batch_size / ranks x d_model x dtype bytes)"})
    data_shards: int = field(default=0, metadata={
        "help": "store-free: document streams (document i -> stream i %% N), a multiple of the ranks; the same N gives "
                "the same batches on any number of ranks (0: the number of ranks)"})
    distribute_saes: bool = field(default=False, metadata={
        "help": "torchrun, store-free: each SAE lives on one rank (gathered batches) instead of a copy per rank"})

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("architecture", "expansion", "k"):
            if not getattr(self, name):
                raise UserError(f"--{name.replace('_', '-')} needs at least one value")
        if any(v <= 0 for v in [*self.expansion, *self.n_latents, *self.k]):
            raise UserError(f"--expansion, --n-latents and --k must be positive, got {self.expansion}, "
                            f"{self.n_latents}, {self.k}")
        if self.buffer_batches < 0 or self.data_shards < 0:
            raise UserError(f"--buffer-batches and --data-shards must be >= 0, got {self.buffer_batches}, "
                            f"{self.data_shards}")

    def buffer_batches_for(self, data_shards: int) -> int:
        """--buffer-batches, or by default the SAE batches a round needs to hold 16 of them and the rows of 8
        forward batches (--batch-tokens each): a round then mixes >= 8 length-sorted forward batches. On the tiny
        model at --batch-size 1024 that is 64 (16 left a 0.5% held-out FVU gap to the store path; see README)."""
        if self.buffer_batches:
            return self.buffer_batches
        rows = self.batch_size // data_shards
        return max(16, -(-8 * self.batch_tokens // rows))

    def store_config(self) -> TrainConfig:
        """The single-SAE TrainConfig of the --store path (one value per shape flag)."""
        shape = {"architecture": self.architecture, "expansion": self.expansion, "k": self.k,
                 "n_latents": self.n_latents or [0]}
        many = [f"--{k.replace('_', '-')} {' '.join(map(str, v))}" for k, v in shape.items() if len(v) != 1]
        if many or len(self.points) > 1:
            raise UserError(f"--store trains one SAE per run ({', '.join(many) or f'--points {self.points}'} ask for "
                            f"several): drop --store to train several points and shapes straight from the model")
        own = {f.name for f in dataclasses.fields(TrainConfig)}
        values = {k: getattr(self, k) for k in own}
        return TrainConfig(**{**values, **{k: v[0] for k, v in shape.items()},
                              "point": self.point or (self.points[0] if self.points else "")})


class Job(NamedTuple):
    point: str
    shape: str  # e.g. topk-x8-k32
    cfg: TrainConfig  # the single-SAE config Trainer runs (out = OUT/<point>/<shape>)
    owner: int  # rank holding it with --distribute-saes (else every rank holds a copy)

    @property
    def name(self) -> str:
        return f"{self.point}/{self.shape}"

    @property
    def out(self) -> Path:
        return Path(self.cfg.out)


def plan_jobs(cfg: StreamTrainConfig, d_model: int, points: list[str], world_size: int) -> list[Job]:
    """One Job per point x architecture x width x k (k is not a shape of the relu kind), owners balanced by size."""
    widths = [(n, f"n{n}") for n in cfg.n_latents] or [(e * d_model, f"x{e}") for e in cfg.expansion]
    shapes: dict[str, tuple[str, int, int]] = {}
    for arch, (n, wname), k in itertools.product(cfg.architecture, widths, cfg.k):
        if arch != "relu" and k > n:
            raise UserError(f"--k {k} is larger than the {n} latents of {arch}-{wname}")
        shapes.setdefault(f"{arch}-{wname}" + ("" if arch == "relu" else f"-k{k}"), (arch, n, k))
    own = {f.name for f in dataclasses.fields(TrainConfig)}
    base = {k: getattr(cfg, k) for k in own}
    jobs, load = [], [0] * world_size
    plan = [(p, s, v) for p in points for s, v in shapes.items()]
    order = sorted(range(len(plan)), key=lambda i: -plan[i][2][1])  # biggest first onto the least loaded rank
    owners = [0] * len(plan)
    for i in order:
        owners[i] = min(range(world_size), key=lambda r: (load[r], r))
        load[owners[i]] += plan[i][2][1]
    for i, (point, shape, (arch, n, k)) in enumerate(plan):
        tcfg = TrainConfig(**{**base, "architecture": arch, "n_latents": n, "expansion": max(1, n // d_model), "k": k,
                              "point": point, "out": str(Path(cfg.out) / point / shape)})
        jobs.append(Job(point, shape, tcfg, owners[i]))
    return jobs


RUN_FILES = ("checkpoint.json", "train_config.json", "summary.json", "summary.txt")


def prepare_out(out: Path, jobs: list[Job], resume: bool, overwrite: bool, is_main: bool = True) -> None:
    """sae.train_folder's rule for a store-free OUT: a folder that holds a run (or results of one of its SAEs) is
    refused unless --resume continues it (from OUT/checkpoint.json) or --overwrite deletes that run first."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder")
    if resume and overwrite:
        raise UserError("--resume continues the run in --out and --overwrite deletes it: give one of them")
    if resume:
        if not (out / "checkpoint.json").is_file():
            raise UserError(f"--resume: nothing to resume, {out / 'checkpoint.json'} does not exist; drop --resume "
                            f"to start a new run")
        return
    old = [out / n for n in RUN_FILES if (out / n).exists()]
    for j in jobs:
        old += [*train_folder.previous_run(j.out), *sorted(j.out.glob("checkpoint-*.pt"))]
    if old and not overwrite:
        names = ", ".join(str(p.relative_to(out)) for p in old[:6]) + (", ..." if len(old) > 6 else "")
        raise UserError(f"--out {out} already holds a training run or results of its SAEs ({names}); pass --resume "
                        f"to continue it, --overwrite to delete all of that and train anew, or choose another --out")
    if old and is_main:
        for p in old:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        print(f"--overwrite: deleted the previous run in {out} ({len(old)} files and folders)")


SUMMARY_KEYS = ("fvu", "val_fvu", "l0", "val_l0", "dead", "dense", "auxk")


def summary_table(rows: list[dict[str, Any]]) -> str:
    """One line per SAE: point, shape, latents, k and its final metrics."""
    head = ["point", "sae", "n_latents", "k", *SUMMARY_KEYS]
    body = [[str(r.get("point", "")), str(r.get("sae", "")), str(r.get("n_latents", "")), str(r.get("k", "")),
             *(f"{r[k]:.4g}" if isinstance(r.get(k), float) else "-" for k in SUMMARY_KEYS)] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    fmt = "  ".join(f"{{:{'<' if i < 2 else '>'}{w}}}" for i, w in enumerate(widths))
    return "\n".join([fmt.format(*head), fmt.format(*("-" * w for w in widths))] + [fmt.format(*r) for r in body])
