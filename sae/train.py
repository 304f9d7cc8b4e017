"""One readable SAE training loop: single process or torchrun (DDP with explicit gradient all-reduce).

Per step: forward (FVU + aux_coef * AuxK [+ L1]) with global denominators -> backward -> all-reduce SUM of grads
-> remove the decoder-row-parallel gradient -> clip -> Adam step -> LR schedule -> renormalise decoder rows ->
EMA -> dead-latent counters (in tokens, synchronised across ranks). Checkpoints are atomic and hold everything
needed for an exact resume (weights, optimizer, scheduler, step = data position, dead counters, EMA, RNG).
"""
from __future__ import annotations

import io
import json
import math
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple

import torch

from llama.cli import UserError, atomic_write_bytes, progress_bar, save_config
from llama.stop import StopSignals
from sae import dist, train_folder
from sae.config import SAEConfig, TrainConfig
from sae.formats import save as save_sae
from sae.loss import fire_counts, mean_l0, usage
from sae.model import SAE, init_from_sample
from sae.nosync import DeadLatentBound, host_reads_free


class TrainResult(NamedTuple):
    sae: SAE
    step: int
    metrics: dict[str, float]
    out_dir: Path
    stopped: str = ""  # what stopped the run early (SIGINT, SIGTERM, "another rank"); "" when it ran to the end


def lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    warm = min(cfg.warmup_steps, max(cfg.steps // 10, 1))

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if cfg.schedule == "constant":
            return 1.0
        t = (step - warm) / max(cfg.steps - warm, 1)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))
    return f


def clip_grad_norm(params: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """torch's clip_grad_norm_ (same norm, same scale max_norm / (norm + 1e-6)). On CPU the grads are rescaled
    only when the norm is above max_norm: clip_grad_norm_ always multiplies every gradient by the clamped
    factor, an extra full pass over [n, d] twice per step that multiplies by exactly 1.0 in the common case. On
    a GPU that test would be a host sync, so the (cheap there) multiply always runs: same result."""
    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads)
    if max_norm > 0 and (not host_reads_free(norm) or float(norm) > max_norm):
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm


def autocast_enabled(mode: str, device: torch.device) -> bool:
    """--autocast auto: bf16 on CUDA (the encoder GEMM on the tensor cores), off on CPU; bf16: everywhere (on
    CPU only to measure its accuracy cost); off: never."""
    return mode == "bf16" or (mode == "auto" and device.type == "cuda")


def as_floats(stats: dict[str, torch.Tensor]) -> dict[str, float]:
    """A step's 0-d device tensors -> floats, with one device-to-host copy (the logging step's one sync)."""
    keys = list(stats)
    return dict(zip(keys, torch.stack([stats[k].detach().float().reshape(()) for k in keys]).tolist()))


def make_optimizer(sae: SAE, cfg: TrainConfig) -> torch.optim.Optimizer:
    groups = [{"params": [sae.W_enc, sae.W_dec], "weight_decay": cfg.weight_decay},
              {"params": [sae.b_enc, sae.b_dec], "weight_decay": 0.0}]  # never decay biases
    # fused=True: one pass over (param, grad, m, v) per tensor instead of ~10 elementwise passes (foreach) or a
    # Python loop of them (torch's CPU default): same Adam update, ~6x faster at 2 x 32768 x 2048 on CPU.
    fused = all(p.dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16) and
                p.device.type in ("cpu", "cuda") for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=cfg.peak_lr(sae.cfg.n_latents), betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                             fused=fused)


def sae_config_for(cfg: TrainConfig, source: Any) -> SAEConfig:
    d = int(source.d_model)
    man = getattr(source, "manifest", {}) or {}
    points = man.get("points") or man.get("capture_points") or []
    if not cfg.point and len(points) > 1:
        raise UserError(f"the store holds several capture points {points}: pick one with --point")
    hook = cfg.point or man.get("hook_name") or (points or [""])[0]
    return SAEConfig(d_in=d, n_latents=cfg.n_latents or cfg.expansion * d, k=cfg.k, architecture=cfg.architecture,
                     normalize=cfg.normalize, k_aux=cfg.k_aux, aux_coef=cfg.aux_coef, l1_coef=cfg.l1_coef,
                     hook_name=hook, model=str(man.get("model", "")))


class Trainer:
    def __init__(self, cfg: TrainConfig, source: Any, info: dist.DistInfo | None = None) -> None:
        self.cfg, self.source = cfg, source
        if hasattr(source, "num_rows") and source.num_rows("train") == 0:  # (store-free training has no rows here)
            raise UserError(f"--store {cfg.store or '(tensor)'} holds no training rows (a store captured with "
                            "--val-fraction 1 is evaluation data only)")
        self.info = info or dist.DistInfo(0, 1, 0, dist.pick_device(cfg.device))
        if cfg.batch_size % self.info.world_size:
            raise UserError(f"--batch-size {cfg.batch_size} must be divisible by the {self.info.world_size} ranks")
        self.per_rank = cfg.batch_size // self.info.world_size
        self.out = Path(cfg.out)
        self.ckpt_path = self.out / "checkpoint.pt"
        torch.manual_seed(cfg.seed)
        self.sae = SAE(sae_config_for(cfg, source), device=self.info.device, seed=cfg.seed)
        self.opt = make_optimizer(self.sae, cfg)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_lambda(cfg))
        n = self.sae.cfg.n_latents
        self.tokens_since_fired = torch.zeros(n, dtype=torch.long, device=self.info.device)
        self.window_counts = torch.zeros(n, dtype=torch.long, device=self.info.device)
        self.window_tokens = 0
        self.ema = {k: p.detach().clone() for k, p in self.sae.named_parameters()} if cfg.ema_decay > 0 else None
        self.step = 0
        self.dead_bound = DeadLatentBound(cfg.dead_tokens, self.tokens_since_fired)  # sizes AuxK without a sync
        if self.info.device.type == "cuda":  # fp32 matmuls (autocast off, or outside it) on TF32 tensor cores
            torch.backends.cuda.matmul.allow_tf32 = cfg.tf32

    # ---- init / checkpoint ---------------------------------------------------------------------------
    def init_weights(self, sample: torch.Tensor | None = None) -> None:
        """Scale and b_dec from one sample (default: drawn from the source), identical on every rank (same rows),
        then broadcast for safety."""
        if sample is None:
            rows = min(self.cfg.init_rows, self.source.num_rows("train"))
            sample = next(iter(self.source.batches(rows, split="train", seed=self.cfg.seed + 1, loop=False,
                                                  point=self.cfg.point or None)))
        init_from_sample(self.sae, sample, self.cfg.b_dec_init)
        dist.broadcast_module(self.sae)
        if self.ema is not None:
            self.ema = {k: p.detach().clone() for k, p in self.sae.named_parameters()}

    def state(self) -> dict[str, Any]:
        return {"sae": self.sae.state_dict(), "sae_cfg": dict(self.sae.cfg.__dict__), "optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict(), "step": self.step, "data_position": self.step,
                "tokens_since_fired": self.tokens_since_fired.cpu(), "window_counts": self.window_counts.cpu(),
                "window_tokens": self.window_tokens, "ema": self.ema, "rng": torch.get_rng_state()}

    def save_checkpoint(self, path: Path | None = None) -> None:
        if self.info.is_main:
            buf = io.BytesIO()
            torch.save(self.state(), buf)
            atomic_write_bytes(path or self.ckpt_path, buf.getvalue())
        dist.barrier()

    def load_checkpoint(self, path: Path | None = None) -> bool:
        path = path or self.ckpt_path
        if not path.is_file():
            return False
        try:
            st = torch.load(path, map_location=self.info.device, weights_only=True)
        except Exception as e:  # noqa: BLE001
            raise UserError(f"{path}: unreadable checkpoint ({e})") from e
        if SAEConfig.from_dict(st["sae_cfg"]) != self.sae.cfg:
            raise UserError(f"{path}: checkpoint SAE config {st['sae_cfg']} differs from the flags given")
        self.sae.load_state_dict(st["sae"])
        self.opt.load_state_dict(st["optimizer"])
        self.sched.load_state_dict(st["scheduler"])
        self.step = int(st["step"])
        self.tokens_since_fired.copy_(st["tokens_since_fired"])
        self.window_counts.copy_(st["window_counts"])
        self.window_tokens = int(st["window_tokens"])
        self.ema = st["ema"]
        torch.set_rng_state(st["rng"].cpu())
        self.dead_bound.refresh(self.tokens_since_fired)
        return True

    # ---- one step --------------------------------------------------------------------------------------
    def train_step(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """One optimizer step. Returns its statistics as 0-d device tensors (`as_floats` converts them): with the
        topk architecture the step never waits for the device (sae/nosync.py; tests/test_nosync.py)."""
        cfg, sae = self.cfg, self.sae
        dead_mask = self.tokens_since_fired >= cfg.dead_tokens
        dev = self.info.device
        # AuxK's width: the exact dead count where reading it is free (CPU), else the host-side bound (GPU: no sync;
        # it stays tight while log_every * batch_size << dead_tokens, e.g. 50 * 4096 vs 10M by default)
        n_dead = int(dead_mask.sum()) if host_reads_free(dead_mask) else self.dead_bound.bound()
        with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=autocast_enabled(cfg.autocast, dev)):
            out = sae(x, dead_mask, reduce=dist.all_reduce_sum, gather=dist.all_gather, n_dead_bound=n_dead)
        loss = out.fvu + sae.cfg.aux_coef * out.auxk_loss + out.l1_loss
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        dist.all_reduce_grads(sae.parameters())
        sae.remove_parallel_grads()
        gnorm = clip_grad_norm(list(sae.parameters()), cfg.grad_clip)
        self.opt.step()
        self.sched.step()
        sae.normalize_decoder()
        if self.ema is not None:
            with torch.no_grad():
                for k, p in sae.named_parameters():
                    self.ema[k].lerp_(p.detach(), 1 - cfg.ema_decay)
        counts = dist.all_reduce_sum(fire_counts(out.top_acts.detach(), out.top_indices, sae.cfg.n_latents))
        self.tokens_since_fired += cfg.batch_size
        self.tokens_since_fired.masked_fill_(counts > 0, 0)
        self.dead_bound.advance(cfg.batch_size)
        self.window_counts += counts
        self.window_tokens += cfg.batch_size
        stats = dist.all_reduce_sum(torch.stack([out.fvu.detach().float(), out.auxk_loss.detach().float(),
                                                 out.l1_loss.detach().float(), loss.detach().float(),
                                                 mean_l0(out.top_acts.detach())]))
        w = self.info.world_size
        return {"loss": stats[3], "fvu": stats[0], "auxk": stats[1], "l1": stats[2], "l0": stats[4] / w,
                "grad_norm": gnorm, "dead": dead_mask.float().mean()}

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Mean over up to val_batches global batches of the batch FVU, and L0 over all their tokens. Each
        rank's out.fvu is (its numerator) / (global denominator), so their SUM is the global FVU: the per-batch
        values and the nonzero / token counts are summed across ranks in one all-reduce, on the device."""
        self.sae.eval()
        dev = self.info.device
        fvu_sum, fired, tokens = (torch.zeros((), dtype=torch.float64, device=dev) for _ in range(3))
        n = 0
        try:
            it = self.source.batches(self.per_rank, split="val", seed=0, rank=self.info.rank,
                                     world_size=self.info.world_size, device=dev, loop=False,
                                     point=self.cfg.point or None)
            for _, x in zip(range(self.cfg.val_batches), it):
                out = self.sae(x, reduce=dist.all_reduce_sum)
                fvu_sum += out.fvu.double()
                fired += (out.top_acts > 0).sum()
                tokens += out.top_acts.shape[0]
                n += 1
        except UserError:
            pass  # validation split smaller than one batch
        self.sae.train()
        if not n:
            return {}
        tot = dist.all_reduce_sum(torch.stack([fvu_sum, fired, tokens])).tolist()
        return {"val_fvu": tot[0] / n, "val_l0": tot[1] / tot[2]}

    # ---- the loop --------------------------------------------------------------------------------------
    def run(self, callback: Callable[[int, SAE], None] | None = None) -> TrainResult:
        """Train to cfg.steps; SIGINT / SIGTERM end it early after the current step, with a checkpoint."""
        with StopSignals() as self.stop:
            return self._run(callback)

    def _run(self, callback: Callable[[int, SAE], None] | None = None) -> TrainResult:
        cfg, main = self.cfg, self.info.is_main
        resumed = train_folder.prepare(self.out, cfg.resume, cfg.overwrite, main) and self.load_checkpoint()
        if not resumed:
            self.init_weights()
        if main:
            self.out.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.out / "train_config.json")
        log = _MetricsLog(self.out / "metrics.jsonl", self.step, main, cfg.wandb_project, cfg)
        it = self.source.batches(self.per_rank, split="train", seed=cfg.seed, rank=self.info.rank,
                                 world_size=self.info.world_size, device=self.info.device, start_batch=self.step,
                                 point=cfg.point or None)
        bar = progress_bar(total=cfg.steps, initial=self.step, disable=not (main and cfg.progress), desc="sae", unit="step")
        metrics: dict[str, float] = {}
        t0, tok0 = time.perf_counter(), self.step
        halt = dist.StopVote()
        while self.step < cfg.steps:
            step_stats = self.train_step(next(it))
            self.step += 1
            bar.update(1)
            log_now = self.step % cfg.log_every == 0 or self.step == cfg.steps
            val_now = cfg.val_every and (self.step % cfg.val_every == 0 or self.step == cfg.steps)
            if log_now:  # (with validation) the only steps that sync
                metrics = as_floats(step_stats)
                self.dead_bound.refresh(self.tokens_since_fired)
                dt = time.perf_counter() - t0
                metrics.update(self.end_window(), tokens_per_s=(self.step - tok0) * cfg.batch_size / max(dt, 1e-9))
            if val_now:  # on its own schedule, not only on steps that are also logging steps
                if not log_now:
                    metrics = as_floats(step_stats)
                metrics.update(self.validate(), step=self.step)
            if log_now or val_now:
                log.write(metrics)
            if log_now:
                bar.set_postfix(fvu=f"{metrics['fvu']:.4f}", l0=f"{metrics['l0']:.1f}", dead=f"{metrics['dead']:.3f}")
            if (cfg.ckpt_every and self.step % cfg.ckpt_every == 0) or self.step == cfg.steps:
                self.save_checkpoint()
            if callback is not None:
                callback(self.step, self.sae)
            if halt(bool(self.stop)):
                break
        halt.close()
        bar.close()
        log.close()
        if halt.stopped and self.step < cfg.steps:
            return self._stopped(metrics)
        final = self.final_sae()
        if main:
            save_sae(final, self.out / "sae", extra={"train_steps": self.step, "train_tokens": self.step * cfg.batch_size})
        dist.barrier()
        return TrainResult(final, self.step, metrics, self.out)

    def end_window(self) -> dict[str, float]:
        """step, lr and the dense / never-fired fractions of the logging window, which then starts afresh."""
        use = usage(self.window_counts, self.window_tokens)
        self.window_counts.zero_()
        self.window_tokens = 0
        return {"step": self.step, "lr": self.sched.get_last_lr()[0], "dense": use.dense_fraction,
                "unfired_window": use.dead_fraction}

    def _stopped(self, metrics: dict[str, float]) -> TrainResult:
        """After a signal: checkpoint (unless this step just wrote one) and say where the run stands."""
        if not (self.cfg.ckpt_every and self.step % self.cfg.ckpt_every == 0):
            self.save_checkpoint()
        why = self.stop.name or "a signal on another rank"
        if self.info.is_main:
            print(f"stopped by {why} after step {self.step} of {self.cfg.steps}; checkpoint written to "
                  f"{self.ckpt_path} ({self.out / 'sae'} is written when the run finishes)", flush=True)
        return TrainResult(self.sae, self.step, metrics, self.out, stopped=self.stop.name or "another rank")

    def final_sae(self) -> SAE:
        """The trained SAE, or with --ema-decay the EMA of its weights. An average of unit-norm decoder rows is
        shorter than 1, so the EMA SAE's rows are put back on the unit sphere (the projection every training
        step applies), as every reader of the file assumes (steering strengths, AuxK, format folding)."""
        if self.ema is None:
            return self.sae
        sae = SAE(self.sae.cfg, device=self.info.device)
        sae.load_state_dict({**self.sae.state_dict(), **self.ema})
        sae.normalize_decoder()
        return sae


class _MetricsLog:
    """metrics.jsonl (lines past the resumed step are dropped first) and, when asked and installed, W&B."""

    def __init__(self, path: Path, step: int, main: bool, wandb_project: str, cfg: TrainConfig) -> None:
        self.main, self.wandb = main, None
        if not main:
            return
        if path.exists():
            keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= step]
            path.write_text("".join(ln + "\n" for ln in keep))
        self.fh = open(path, "a")
        if wandb_project:
            try:
                import wandb  # type: ignore[import-not-found]
                self.wandb = wandb.init(project=wandb_project, config=cfg.__dict__, resume="allow")
            except ImportError:
                print("warning: --wandb-project given but wandb is not installed; logging to metrics.jsonl only")

    def write(self, metrics: dict[str, float]) -> None:
        if self.main:
            self.fh.write(json.dumps(metrics) + "\n")
            self.fh.flush()
            if self.wandb is not None:
                self.wandb.log(metrics, step=int(metrics["step"]))

    def close(self) -> None:
        if self.main:
            self.fh.close()
            if self.wandb is not None:
                self.wandb.finish()


def train(cfg: TrainConfig, source: Any, info: dist.DistInfo | None = None,
          callback: Callable[[int, SAE], None] | None = None) -> TrainResult:
    return Trainer(cfg, source, info).run(callback)
