"""Store-free training of many SAEs at once: one forward per step feeds every SAE of every point.

    res = train_many(StreamTrainConfig(model="weights/tiny", points=[...], expansion=[8, 16], steps=2000))
    res.summary                               # one dict per SAE: point, shape, final and held-out metrics

Per step: the stream (sae/activations/stream.py) hands this rank's rows of every point; each SAE takes one
`sae.train.Trainer.train_step` on its point's rows (the single-SAE step, unchanged). Data parallel (default under
torchrun): every rank holds every SAE, runs the model on its own documents, and train_step all-reduces the
gradients exactly as the store path does. --distribute-saes: each SAE lives on one rank (balanced by size); the
ranks all-gather each point's rows so its owner sees the global batch, and steps it alone (sae.dist.solo).

Output: OUT/<point>/<shape>/{sae/, metrics.jsonl, train_config.json, checkpoint-<step>.pt}, OUT/checkpoint.json
(the step every SAE checkpoint is at: written last, so a kill never leaves a half-written step), OUT/summary.json
and OUT/summary.txt. No activation is ever written: --resume rebuilds the stream's buffer from the step.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, NamedTuple

import torch
import torch.distributed as tdist

from llama.cli import UserError, atomic_write_bytes, atomic_write_json, progress_bar, save_config
from llama.stop import StopSignals
from sae import dist
from sae.activations.capture import (DEFAULTS_OF_OLDER_STORES, ROW_SETTINGS, checkpoint_hash,
                                     load_model_and_tokenizer, resolve_context, resolve_points)
from sae.activations.inputs import count_documents, expand_inputs, file_fingerprint
from sae.activations.source import TensorSource
from sae.activations.stream import held_out, open_stream
from sae.evaluate import activation_metrics
from sae.formats import save as save_sae
from sae.multi import SUMMARY_KEYS, Job, StreamTrainConfig, plan_jobs, prepare_out, summary_table
from sae.train import Trainer, _MetricsLog


class ManyResult(NamedTuple):
    step: int
    summary: list[dict[str, Any]]  # one row per SAE (every rank gets all of them); empty when stopped early
    out_dir: Path
    stopped: str = ""  # what stopped the run early (SIGINT, SIGTERM, "another rank"); "" when it ran to the end


class StreamTrainer:
    def __init__(self, cfg: StreamTrainConfig, info: dist.DistInfo | None = None, model=None, tok=None) -> None:
        self.info = info or dist.DistInfo(0, 1, 0, dist.pick_device(cfg.device))
        W, r = self.info.world_size, self.info.rank
        self.cfg = cfg = resolve_context(dataclasses.replace(cfg, points=list(cfg.points) or
                                                             ([cfg.point] if cfg.point else [])))
        if cfg.val_fraction >= 1.0:
            raise UserError(f"--val-fraction {cfg.val_fraction} leaves no documents to train on (must be < 1)")
        self.S = cfg.data_shards or W
        if self.S % W or cfg.batch_size % self.S:
            raise UserError(f"--data-shards {self.S} must be a multiple of the {W} rank(s) and divide --batch-size "
                            f"{cfg.batch_size}")
        self.files = expand_inputs(cfg.inputs)
        count_documents(self.files, cfg.txt_docs, cfg.text_field)  # a clear error on inputs without documents
        self.model, self.tok = load_model_and_tokenizer(cfg, self.info.device, model, tok)
        self.points = resolve_points(cfg.points, self.model)
        self.jobs = plan_jobs(cfg, self.model.args.dim, self.points, W)
        self.distributed = cfg.distribute_saes and W > 1
        mine = [j for j in self.jobs if j.owner == r or not self.distributed]
        solo_info = dist.DistInfo(0, 1, self.info.local_rank, self.info.device)  # an SAE only this rank holds
        model_path = str(Path(cfg.model).resolve())
        self.trainers: dict[str, Trainer] = {}
        for j in mine:
            src = SimpleNamespace(d_model=self.model.args.dim, manifest={"hook_name": j.point, "model": model_path})
            self.trainers[j.name] = Trainer(j.cfg, src, solo_info if self.distributed else self.info)
        self.mine = mine
        self.shards = list(range(r * self.S // W, (r + 1) * self.S // W))
        self.out = Path(cfg.out)
        self.plan = {"model": model_path, "checkpoint_hash": checkpoint_hash(Path(cfg.model)), "points": self.points,
                     "sources": [file_fingerprint(f) for f in self.files], "data_shards": self.S,
                     "saes": {j.name: [j.cfg.architecture, j.cfg.n_latents, j.cfg.k] for j in self.jobs},
                     "context": {k: getattr(cfg, k) for k in ROW_SETTINGS if hasattr(cfg, k)},
                     "data": {"buffer_batches": cfg.buffer_batches_for(self.S),
                              **{k: getattr(cfg, k) for k in ("val_fraction", "batch_size", "seed")}}}
        self.step = 0

    def writes(self, job: Job) -> bool:
        """Whether this rank writes the job's files (its owner; rank 0 when every rank holds a copy)."""
        return job.owner == self.info.rank if self.distributed else self.info.is_main

    def _solo(self):
        return dist.solo() if self.distributed else contextlib.nullcontext()

    # ---- checkpoints: one file per SAE and step, committed by OUT/checkpoint.json --------------------------------
    def save_checkpoint(self, step: int) -> None:
        with self._solo():
            for j in self.mine:
                if self.writes(j):
                    buf = io.BytesIO()
                    torch.save(self.trainers[j.name].state(), buf)
                    atomic_write_bytes(j.out / f"checkpoint-{step}.pt", buf.getvalue())
        dist.barrier()
        if self.info.is_main:
            atomic_write_json(self.out / "checkpoint.json", {"step": step, "plan": self.plan})
        dist.barrier()
        for j in self.mine:
            if self.writes(j):
                for old in j.out.glob("checkpoint-*.pt"):
                    if old.name != f"checkpoint-{step}.pt":
                        old.unlink(missing_ok=True)

    def load_checkpoint(self) -> int:
        meta_path = self.out / "checkpoint.json"
        if not meta_path.is_file():
            return 0
        meta = json.loads(meta_path.read_text())
        plan = json.loads(json.dumps(self.plan))  # as it reads back from JSON
        if isinstance(meta.get("plan", {}).get("context"), dict):  # settings added since: what older runs implicitly had
            meta["plan"]["context"] = {**DEFAULTS_OF_OLDER_STORES, **meta["plan"]["context"]}
        if meta.get("plan") != plan:
            old = meta.get("plan", {})
            diff = [k for k in sorted(set(old) | set(plan)) if old.get(k) != plan.get(k)]
            raise UserError(f"{meta_path}: the checkpoint was written with other settings ({', '.join(diff)} differ); "
                            f"rerun with the same flags to resume, or without --resume to start over")
        step = int(meta["step"])
        with self._solo():
            for j in self.mine:
                if not self.trainers[j.name].load_checkpoint(j.out / f"checkpoint-{step}.pt"):
                    raise UserError(f"{j.out}/checkpoint-{step}.pt is missing (listed by {meta_path})")
                self.trainers[j.name].step = step
        return step

    # ---- validation --------------------------------------------------------------------------------------------
    def validate(self, tr: Trainer, x: torch.Tensor | None) -> dict[str, float]:
        if x is None:
            return {}
        m = activation_metrics(tr.sae, TensorSource(x.float(), val_fraction=1.0), tr.cfg.batch_size, max_tokens=len(x))
        tr.sae.train()
        return {"val_fvu": m["fvu"], "val_l0": m["l0"], "val_dead": m["dead_fraction"]}

    # ---- the loop ----------------------------------------------------------------------------------------------
    def run(self, callback: Callable[[int, "StreamTrainer"], None] | None = None) -> ManyResult:
        """Train to cfg.steps; SIGINT / SIGTERM end it early after the current step, with a checkpoint."""
        cfg, info = self.cfg, self.info
        prepare_out(self.out, self.jobs, cfg.resume, cfg.overwrite, info.is_main)
        dist.barrier()
        self.step = self.load_checkpoint() if cfg.resume else 0
        per_shard = cfg.batch_size // self.S
        stream = open_stream(cfg, self.model, self.tok, self.files, self.points, self.shards, self.S, per_shard,
                             cfg.buffer_batches_for(self.S), cfg.seed, self.step, cfg.val_fraction, info.device)
        try:
            with StopSignals() as self.stop:
                return self._run(stream, callback)
        finally:
            stream.close()

    def _run(self, stream, callback) -> ManyResult:
        cfg, info = self.cfg, self.info
        val = held_out(cfg, self.model, self.tok, self.files, self.points, cfg.val_batches * cfg.batch_size,
                       cfg.val_fraction, info.device) if cfg.val_every and cfg.val_fraction > 0 else {}
        t0, step0, sae_s, fwd0 = time.perf_counter(), self.step, 0.0, stream.timer.seconds
        if self.step == 0:  # scale and b_dec of every SAE from one sample of the first round, the same on all ranks
            sample = {p: dist.all_gather(x.float()) for p, x in stream.sample(-(-cfg.init_rows // self.S)).items()}
            with self._solo():
                for j in self.mine:
                    self.trainers[j.name].init_weights(sample[j.point])
            del sample
        if info.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.out / "train_config.json")
        logs = {}
        for j in self.mine:
            if self.writes(j):
                j.out.mkdir(parents=True, exist_ok=True)
                save_config(j.cfg, j.out / "train_config.json")
            logs[j.name] = _MetricsLog(j.out / "metrics.jsonl", self.step, self.writes(j), "", j.cfg)
        bar = progress_bar(total=cfg.steps, initial=self.step, disable=not (info.is_main and cfg.progress),
                           desc=f"{len(self.jobs)} SAE(s) on {len(self.points)} point(s)", unit="step")
        last: dict[str, dict[str, float]] = {j.name: {} for j in self.mine}
        cuda = info.device.type == "cuda"
        halt = dist.StopVote()
        try:
            while self.step < cfg.steps:
                batch = stream.next()
                ts = time.perf_counter()
                xs = {p: a.float() for p, a in batch.acts.items()}
                if self.distributed:
                    xs = {p: dist.all_gather(x) for p, x in xs.items()}
                out: dict[str, dict[str, Any]] = {}
                with self._solo():
                    for j in self.mine:
                        out[j.name] = self.trainers[j.name].train_step(xs[j.point])
                if cuda:
                    torch.cuda.synchronize()
                sae_s += time.perf_counter() - ts
                self.step += 1
                for tr in self.trainers.values():
                    tr.step = self.step
                wall = time.perf_counter() - t0
                tokens = (self.step - step0) * cfg.batch_size
                rates = {"tokens_per_s": tokens / max(wall, 1e-9),
                         "forward_tokens_per_s": stream.timer.rows * info.world_size / max(stream.timer.seconds, 1e-9),
                         "sae_tokens_per_s": tokens / max(sae_s, 1e-9),
                         "forward_fraction": (stream.timer.seconds - fwd0) / max(wall, 1e-9)}
                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    val_now = cfg.val_every and (self.step % cfg.val_every == 0 or self.step == cfg.steps)
                    with self._solo():
                        for j in self.mine:
                            tr = self.trainers[j.name]
                            m = {k: float(v) for k, v in out[j.name].items()}
                            m.update(tr.end_window(), **rates)
                            if val_now and self.writes(j):
                                m.update(self.validate(tr, val.get(j.point)))
                            logs[j.name].write(m)
                            last[j.name] = m
                if (cfg.ckpt_every and self.step % cfg.ckpt_every == 0) or self.step == cfg.steps:
                    self.save_checkpoint(self.step)
                bar.update(1)
                bar.set_postfix_str(f"fwd {rates['forward_tokens_per_s']:,.0f} tok/s | sae "
                                    f"{rates['sae_tokens_per_s']:,.0f} tok/s | {rates['forward_fraction']:.0%} in "
                                    f"forward", refresh=False)
                if callback is not None:
                    callback(self.step, self)
                if halt(bool(self.stop)):
                    break
            halt.close()
        finally:
            bar.close()
            for log in logs.values():
                log.close()
        if halt.stopped and self.step < cfg.steps:  # a signal: checkpoint this step (unless it just was), say so
            if not (cfg.ckpt_every and self.step % cfg.ckpt_every == 0):
                self.save_checkpoint(self.step)
            if info.is_main:
                print(f"stopped by {self.stop.name or 'a signal on another rank'} after step {self.step} of "
                      f"{cfg.steps}; checkpoint written to {self.out / 'checkpoint.json'}", flush=True)
            return ManyResult(self.step, [], self.out, stopped=self.stop.name or "another rank")
        return self._finish(last)

    def _finish(self, last: dict[str, dict[str, float]]) -> ManyResult:
        rows = []
        with self._solo():
            for j in self.mine:
                tr = self.trainers[j.name]
                if self.writes(j):
                    save_sae(tr.final_sae(), j.out / "sae", extra={"train_steps": self.step, "train_tokens":
                                                                   self.step * self.cfg.batch_size, "store_free": True})
                    rows.append({"point": j.point, "sae": j.shape, "n_latents": tr.sae.cfg.n_latents,
                                 "k": tr.sae.cfg.k, **{k: last[j.name][k] for k in SUMMARY_KEYS if k in last[j.name]}})
        if dist.active():
            parts: list[Any] = [None] * self.info.world_size
            tdist.all_gather_object(parts, rows)
            rows = [r for part in parts for r in part]
        order = {j.name: i for i, j in enumerate(self.jobs)}
        rows.sort(key=lambda r: order[f"{r['point']}/{r['sae']}"])
        if self.info.is_main:
            atomic_write_json(self.out / "summary.json", rows)
            atomic_write_bytes(self.out / "summary.txt", (summary_table(rows) + "\n").encode())
        dist.barrier()
        return ManyResult(self.step, rows, self.out)


def train_many(cfg: StreamTrainConfig, info: dist.DistInfo | None = None, model=None, tok=None,
               callback: Callable[[int, StreamTrainer], None] | None = None) -> ManyResult:
    return StreamTrainer(cfg, info, model, tok).run(callback)
