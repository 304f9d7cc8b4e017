"""DDP correctness on CPU (2 gloo processes via sae.dist.init, as torchrun would start them) against 1 process:

- every architecture (topk, batchtopk, relu) trains the same SAE, and validation logs the same val_fvu / val_l0
  at the same steps (batchtopk selects over the global batch and keeps one synced threshold);
- every collective's tensor is on the process group's device: the whole loop (training, validation,
  checkpoints) runs with torch's default device set to `meta`, so a tensor built without `device=` (the CPU
  tensor NCCL rejects on a GPU) cannot reach a collective unnoticed.
"""
from __future__ import annotations

import json
import os
import socket
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import sae.dist
from sae import TensorSource, TrainConfig, load
from sae.synthetic import SyntheticConfig, generate
from sae.train import Trainer

DATA = SyntheticConfig(d=16, n_features=40, rows=3000, avg_active=3, scale=1.0, bias_norm=2.0, seed=7)
ARCHS = ("topk", "batchtopk", "relu")

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def cfg_for(out: Path, arch: str, **kw) -> TrainConfig:
    # eps 1e-8 (torch's default), not our 6.25e-10: at the tied init (W_enc = W_dec^T, b_enc = 0) a token with a
    # single batchtopk latent has an encoder gradient that is exactly 0 in exact arithmetic (the residual is
    # orthogonal to that decoder row), i.e. +-1e-10 of rounding noise that differs between 1 and 2 processes,
    # and Adam's first step turns any |g| >> eps into a full +-lr step: a rounding amplifier, not a DDP effect.
    base = dict(out=str(out), architecture=arch, n_latents=64, k=4, batch_size=64, steps=10, lr=3e-3, eps=1e-8,
                l1_coef=0.05, dead_tokens=192, init_rows=512, warmup_steps=3, log_every=5, val_every=5,
                val_batches=2, ckpt_every=5, progress=False, device="cpu")
    return TrainConfig(**{**base, **kw})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, x: torch.Tensor, out: str, archs: tuple[str, ...],
            meta_default: bool) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK="0")
    torch.set_num_threads(1)
    info = sae.dist.init("cpu")
    assert info.world_size == world and sae.dist.active()
    try:
        if meta_default:  # anything created without device= lands on `meta`, which no collective accepts
            torch.set_default_device("meta")
            with pytest.raises(RuntimeError, match="process group works on cpu"):
                sae.dist.all_reduce_sum(torch.ones(()))  # the check itself fires on a stray tensor
        for arch in archs:
            Trainer(cfg_for(Path(out) / arch, arch), TensorSource(x), info).run()
    finally:
        torch.set_default_device(None)
        sae.dist.cleanup()


def _spawn(tmp: Path, x: torch.Tensor, archs: tuple[str, ...], meta_default: bool = False) -> None:
    mp.spawn(_worker, args=(2, _free_port(), x, str(tmp / "ddp"), archs, meta_default), nprocs=2, join=True)


def _val_lines(out: Path) -> dict[int, tuple[float, float]]:
    lines = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    return {m["step"]: (m["val_fvu"], m["val_l0"]) for m in lines if "val_fvu" in m}


def test_two_ranks_train_the_same_sae_and_validate_the_same_as_one(tmp_path: Path) -> None:
    x = generate(DATA).x
    _spawn(tmp_path, x, ARCHS)
    for arch in ARCHS:
        one = Trainer(cfg_for(tmp_path / "one" / arch, arch), TensorSource(x)).run()
        ddp = load(tmp_path / "ddp" / arch / "sae")
        for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"):
            torch.testing.assert_close(getattr(ddp, name), getattr(one.sae, name), atol=2e-5, rtol=1e-4,
                                       msg=f"{arch}: {name}")
        got, want = _val_lines(tmp_path / "ddp" / arch), _val_lines(tmp_path / "one" / arch)
        assert sorted(got) == sorted(want) == [5, 10], arch
        for step in want:
            assert got[step] == pytest.approx(want[step], rel=1e-5, abs=1e-7), (arch, step)
    assert float(one.sae.threshold.min()) == 0.0  # relu has no threshold; batchtopk's was compared above
    assert float(load(tmp_path / "ddp" / "batchtopk" / "sae").threshold.min()) > 0


def test_every_collective_uses_the_group_device(tmp_path: Path) -> None:
    """Training, validation and checkpoints under DDP with the default device set to `meta`: each collective
    checks its tensor's device (sae.dist.check_device), so a CPU-built tensor fails here as NCCL would."""
    x = generate(replace(DATA, rows=1500)).x
    _spawn(tmp_path, x, ("topk", "batchtopk"), meta_default=True)
    for arch in ("topk", "batchtopk"):
        assert sorted(_val_lines(tmp_path / "ddp" / arch)) == [5, 10]
        assert (tmp_path / "ddp" / arch / "checkpoint.pt").is_file()
