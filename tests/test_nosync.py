"""A non-logging training step never makes the host wait for the device (sae/nosync.py), AuxK sized by the
host-side dead-latent bound is exactly AuxK sized by the true count, and the dense AuxK path equals the sparse
one. The sync check runs on CPU: HostSyncGuard refuses every op that would sync on CUDA."""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from sae import SAE, SAEConfig, TensorSource, TrainConfig
from sae.nosync import DeadLatentBound, HostSyncError, HostSyncGuard
from sae.synthetic import SyntheticConfig, generate
from sae.train import Trainer, as_floats

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

SYNCS = {
    "item": lambda x: x.sum().item(),
    "bool": lambda x: bool(x.sum() > 0),
    "int": lambda x: int(x[0, 0]),
    "float": lambda x: float(x[0, 0]),
    "tolist": lambda x: x.tolist(),
    "mask index": lambda x: x[x > 0],
    "nonzero": lambda x: x.nonzero(),
    "bincount": lambda x: torch.bincount(x.flatten().long().abs()),
    "torch.tensor": lambda x: torch.tensor([1.0, 2.0]),
    "repeat_interleave": lambda x: torch.repeat_interleave(x.flatten().long().abs()),
}


@pytest.mark.parametrize("name", list(SYNCS))
def test_guard_refuses_every_kind_of_sync(name: str) -> None:
    x = torch.randn(4, 5) * 3
    with pytest.raises(HostSyncError), HostSyncGuard():
        SYNCS[name](x)
    SYNCS[name](x)  # and the guard is gone afterwards


def test_guard_allows_device_side_code_and_sees_backward() -> None:
    x = torch.randn(4, 5, requires_grad=True)
    with HostSyncGuard():
        y = torch.where(x > 0, x, 0.0).masked_fill(x < -1, 0.0)[torch.arange(2)].sum()
        y.backward()  # the guard follows autograd's backward too
    assert x.grad is not None

    class SyncInBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, a):
            return a * 2

        @staticmethod
        def backward(ctx, g):
            return g * float(g.sum())

    with pytest.raises(HostSyncError), HostSyncGuard():
        SyncInBackward.apply(x).sum().backward()


def _trainer(tmp: Path, **kw) -> Trainer:
    x = generate(SyntheticConfig(d=16, n_features=32, rows=4000, avg_active=3, seed=1)).x
    cfg = TrainConfig(**{**dict(out=str(tmp), n_latents=64, k=4, k_aux=8, batch_size=64, steps=20, lr=2e-3,
                                log_every=10, val_every=0, ckpt_every=0, progress=False, dead_tokens=128,
                                init_rows=512, warmup_steps=2), **kw})
    tr = Trainer(cfg, TensorSource(x))
    tr.init_weights()
    with torch.no_grad():
        tr.sae.b_enc[:5] = -1e4  # five latents that never fire: AuxK runs once they are dead
    return tr


def test_non_logging_train_step_has_no_host_sync(tmp_path: Path) -> None:
    tr = _trainer(tmp_path)
    it = tr.source.batches(64, seed=0)
    for _ in range(3):  # warm-up: the optimizer's lazy state init (torch.tensor(step)) happens once
        tr.train_step(next(it))
    assert tr.dead_bound.bound() > 0 and int((tr.tokens_since_fired >= 128).sum()) >= 5  # AuxK is on
    with HostSyncGuard():
        for _ in range(3):
            stats = tr.train_step(next(it))
    assert as_floats(stats)["auxk"] > 0


def test_non_logging_train_step_has_no_host_sync_on_triton_path() -> None:
    """The same with the Triton kernels (interpreter, in a subprocess): their Python wrappers do not sync."""
    code = ("import tempfile, pathlib, torch, kernels\n"
            "from tests.test_nosync import _trainer\n"
            "from sae.nosync import HostSyncGuard\n"
            "tr = _trainer(pathlib.Path(tempfile.mkdtemp()), n_latents=32, batch_size=16, init_rows=64, k_aux=6)\n"
            "assert kernels.backend(tr.sae.W_dec) == 'triton'\n"
            "it = tr.source.batches(16, seed=0)\n"
            "for _ in range(9): tr.train_step(next(it))\n"
            "assert tr.dead_bound.bound() > 0\n"
            "with HostSyncGuard():\n    tr.train_step(next(it))\n"
            "print('ok')\n")
    env = {k: v for k, v in os.environ.items() if k not in ("LLAMA_SAE_KERNELS", "LLAMA_SAE_TOPK")}
    env.update(TRITON_INTERPRET="1", LLAMA_SAE_TOPK="triton", PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stdout[-3000:] + r.stderr[-3000:]


def test_logged_metrics_are_floats(tmp_path: Path) -> None:
    res = _trainer(tmp_path, steps=10).run()
    assert all(isinstance(v, float) for k, v in res.metrics.items() if k != "step"), res.metrics


def test_dead_latent_bound_is_an_upper_bound() -> None:
    g = torch.Generator().manual_seed(0)
    counters = torch.randint(0, 500, (200,), generator=g)
    bound = DeadLatentBound(1000, counters)
    for step in range(40):
        assert bound.bound() >= int((counters >= 1000).sum()), step
        counters = torch.where(torch.rand(200, generator=g) < 0.1, 0, counters + 64)
        bound.advance(64)
        if step % 10 == 9:
            bound.refresh(counters)
            assert bound.bound() == int((counters >= 1000).sum())


def _grads(m: SAE, x: torch.Tensor, dead: torch.Tensor, **kw) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    m.zero_grad()
    out = m(x, dead, **kw)
    (out.fvu + out.auxk_loss).backward()
    return out.auxk_loss.detach(), {k: p.grad.clone() for k, p in m.named_parameters()}


def _model() -> tuple[SAE, torch.Tensor]:
    torch.manual_seed(0)
    m = SAE(SAEConfig(d_in=16, n_latents=48, k=4, k_aux=12), seed=3)
    with torch.no_grad():
        m.b_dec.normal_(0, 2.0)
        m.W_enc.add_(0.3 * torch.randn_like(m.W_enc))
    return m, torch.randn(64, 16) * 3


@pytest.mark.parametrize("n_dead", [0, 1, 5, 20])
def test_auxk_sized_by_bound_equals_auxk_sized_by_count(n_dead: int) -> None:
    m, x = _model()
    dead = torch.zeros(48, dtype=torch.bool)
    dead[torch.randperm(48, generator=torch.Generator().manual_seed(n_dead))[:n_dead]] = True
    want_aux, want = _grads(m, x, dead)  # width min(k_aux, n_dead), one host sync
    for bound in {n_dead, n_dead + 3, 48}:
        aux, got = _grads(m, x, dead, n_dead_bound=bound)
        torch.testing.assert_close(aux, want_aux, rtol=1e-6, atol=1e-7)
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-7, msg=f"{k}, bound {bound}")
    if n_dead == 0:
        assert want_aux == 0


def test_auxk_dense_path_equals_sparse_path(monkeypatch: pytest.MonkeyPatch) -> None:
    m, x = _model()
    dead = torch.zeros(48, dtype=torch.bool)
    dead[::2] = True
    results = {}
    for path in ("sparse", "dense"):
        monkeypatch.setenv("LLAMA_SAE_AUXK_PATH", path)
        results[path] = _grads(m, x, dead, n_dead_bound=24)
    assert results["sparse"][0] > 0
    torch.testing.assert_close(results["dense"][0], results["sparse"][0], rtol=1e-5, atol=1e-7)
    for k, g in results["sparse"][1].items():
        torch.testing.assert_close(results["dense"][1][k], g, rtol=1e-4, atol=1e-6, msg=k)


def test_auxk_path_is_chosen_by_width(monkeypatch: pytest.MonkeyPatch) -> None:
    from sae import ops
    monkeypatch.delenv("LLAMA_SAE_AUXK_PATH", raising=False)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert not ops.use_dense(32, 65536, cuda) and ops.use_dense(1024, 65536, cuda)
    assert not ops.use_dense(512, 16384, cpu) and ops.use_dense(1024, 16384, cpu)
    monkeypatch.setenv("LLAMA_SAE_AUXK_PATH", "fast")
    with pytest.raises(ValueError, match="LLAMA_SAE_AUXK_PATH"):
        ops.use_dense(1, 2, cpu)


def test_training_with_dense_auxk_matches_sparse(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    weights = {}
    for path in ("sparse", "dense"):
        monkeypatch.setenv("LLAMA_SAE_AUXK_PATH", path)
        tr = _trainer(tmp_path / path)
        it = tr.source.batches(64, seed=0)
        for _ in range(6):
            tr.train_step(next(it))
        weights[path] = replace(tr.sae.cfg), {k: v.detach().clone() for k, v in tr.sae.state_dict().items()}
    for k, v in weights["sparse"][1].items():
        torch.testing.assert_close(weights["dense"][1][k], v, rtol=1e-4, atol=1e-5, msg=k)
