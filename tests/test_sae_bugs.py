"""Each SAE bug of the earlier project (DESIGN.md section 6), reintroduced on a test-only subclass or by a
monkeypatch, measurably fails the same check our code passes.

- decoder normalised along the wrong axis          -> decoder-row check
- DDP bypassed (ranks trained separate SAEs)       -> 2 gloo ranks vs 1 process
- AuxK with b_dec / not variance-normalised / only when >= k_aux dead (the dead floor) -> AuxK reference check
- b_pre (b_dec) computed in the wrong space        -> b_dec init check
"""
from __future__ import annotations

import os
import socket
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import sae.dist
import sae.train
from sae import SAE, SAEConfig, TensorSource, TrainConfig
from sae.model import geometric_median
from sae.synthetic import SyntheticConfig, generate
from sae.train import Trainer

DATA = SyntheticConfig(d=16, n_features=40, rows=3000, avg_active=3, scale=50.0, bias_norm=2.0, seed=7)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def cfg_for(out: Path, **kw) -> TrainConfig:
    base = dict(out=str(out), n_latents=64, k=4, batch_size=64, steps=20, lr=3e-3, dead_tokens=192, init_rows=512,
                warmup_steps=3, log_every=5, val_every=0, ckpt_every=0, progress=False, device="cpu")
    return TrainConfig(**{**base, **kw})


# ---- decoder normalised along the wrong axis ----------------------------------------------------------
class WrongAxisSAE(SAE):
    @torch.no_grad()
    def remove_parallel_grads(self) -> None:
        g, w = self.W_dec.grad, self.W_dec
        g -= (g * w).sum(dim=0, keepdim=True) * w / w.pow(2).sum(dim=0, keepdim=True)

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_dec /= self.W_dec.norm(dim=0, keepdim=True)


def check_decoder_rows(tmp: Path) -> None:
    tr = Trainer(cfg_for(tmp), TensorSource(generate(DATA).x))
    tr.init_weights()
    it = tr.source.batches(64, seed=0)
    for _ in range(5):
        tr.train_step(next(it))
    torch.testing.assert_close(tr.sae.W_dec.norm(dim=1), torch.ones(64), msg="decoder rows are not unit norm")
    out = tr.sae(next(it))  # the gradient step must not change a row's norm: parallel part removed
    out.fvu.backward()
    tr.sae.remove_parallel_grads()
    par = (tr.sae.W_dec.grad * tr.sae.W_dec).sum(dim=1).abs().max()
    assert par < 1e-6 * tr.sae.W_dec.grad.abs().max(), f"row-parallel gradient left: {par}"


def test_decoder_rows_unit_norm(tmp_path: Path) -> None:
    check_decoder_rows(tmp_path)


def test_bug_decoder_wrong_axis_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sae.train, "SAE", WrongAxisSAE)
    with pytest.raises(AssertionError):
        check_decoder_rows(tmp_path)


# ---- AuxK ------------------------------------------------------------------------------------------------
class AuxWithBias(SAE):
    def aux_decode(self, aux_acts, aux_idx):
        return super().aux_decode(aux_acts, aux_idx) + self.b_dec


class AuxNotVarianceNormalised(SAE):
    def aux_loss(self, e, e_hat, reduce=sae.loss.identity):
        return (e.detach() - e_hat).pow(2).sum(-1).mean()


class AuxDeadFloor(SAE):
    def aux_k(self, dead_mask):
        n_dead = int(dead_mask.sum())
        return self.cfg.k_aux if n_dead >= self.cfg.k_aux else 0


def check_auxk(cls: type[SAE]) -> None:
    """Independent reference: top-min(k_aux, n_dead) among dead latents, ReLU, decoded without b_dec, squared
    error to the detached residual over the residual's total variance; runs with a single dead latent."""
    torch.manual_seed(0)
    m = cls(SAEConfig(d_in=16, n_latents=48, k=4, k_aux=8), seed=3)
    with torch.no_grad():
        m.b_dec.normal_(0, 2.0)
        m.W_enc.add_(0.3 * torch.randn_like(m.W_enc))
    x = torch.randn(64, 16) * 3
    for n_dead in (1, 20):
        dead = torch.zeros(48, dtype=torch.bool)
        dead[torch.randperm(48)[:n_dead]] = True
        m.zero_grad()
        out = m(x, dead)
        x_n = m.normalize(x)
        pre = (x_n - m.b_dec) @ m.W_enc.T + m.b_enc
        e = (x_n - (out.x_hat * m.norm_scale)).detach()
        av, ai = torch.where(dead, pre, torch.tensor(float("-inf"))).topk(min(8, n_dead), dim=-1)
        z = torch.zeros_like(pre).scatter(-1, ai, torch.relu(av))
        want = ((e - z @ m.W_dec) ** 2).sum() / ((e - e.mean(0)) ** 2).sum()
        torch.testing.assert_close(out.auxk_loss, want, msg=f"AuxK with {n_dead} dead")
        out.auxk_loss.backward()
        assert m.W_enc.grad[dead].abs().sum() > 0, "AuxK gradient does not reach the dead latents"


def test_auxk_matches_definition() -> None:
    check_auxk(SAE)


@pytest.mark.parametrize("cls", [AuxWithBias, AuxNotVarianceNormalised, AuxDeadFloor])
def test_bug_auxk_variants_fail(cls: type[SAE]) -> None:
    with pytest.raises(AssertionError):
        check_auxk(cls)


# ---- b_dec (b_pre) in the wrong space ------------------------------------------------------------------------
def init_raw_space(model: SAE, sample: torch.Tensor, b_dec_init: str = "median") -> None:
    """The earlier project's way: the scale is set, but b_pre is the median of the RAW activations."""
    model.norm_scale.fill_((model.cfg.d_in / sample.pow(2).sum(-1).mean()).sqrt().item())
    model.b_dec.data.copy_(geometric_median(sample))


def check_b_dec_space(tmp: Path) -> None:
    x = generate(DATA).x
    tr = Trainer(cfg_for(tmp), TensorSource(x))
    tr.init_weights()
    m = tr.sae
    x_n, b = m.normalize(x[-500:]).detach(), m.b_dec.detach()  # held-out rows in the SAE's input space
    u = (x_n - b) / (x_n - b).norm(dim=1, keepdim=True)
    const_fvu = float(((x_n - b) ** 2).sum() / ((x_n - x_n.mean(0)) ** 2).sum())
    assert const_fvu < 1.1, f"b_dec as a constant prediction explains nothing: FVU {const_fvu:.2f}"
    assert u.mean(0).norm() < 0.15, "b_dec is not near the geometric median of the normalised inputs"


def test_b_dec_init_in_input_space(tmp_path: Path) -> None:
    check_b_dec_space(tmp_path)


def test_bug_b_dec_in_raw_space_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sae.train, "init_from_sample", init_raw_space)
    with pytest.raises(AssertionError):
        check_b_dec_space(tmp_path)


# ---- DDP bypassed ----------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, x: torch.Tensor, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    info = sae.dist.DistInfo(rank, world, 0, torch.device("cpu"))
    results = {}
    for name in ("synced", "bypassed"):
        if name == "bypassed":  # the bug: every rank steps on its own gradient
            sae.dist.all_reduce_grads = lambda params: None
        res = Trainer(cfg_for(Path(out) / name), TensorSource(x), info).run()
        results[name] = {k: v.clone() for k, v in res.sae.state_dict().items()}
    if rank == 0:
        torch.save(results, Path(out) / "weights.pt")
    torch.distributed.destroy_process_group()


def test_bug_ddp_bypassed_fails(tmp_path: Path) -> None:
    """The DDP check (2 ranks == 1 process) passes with synced gradients and fails with the sync removed."""
    x = generate(replace(DATA, scale=1.0)).x
    mp.spawn(_worker, args=(2, _free_port(), x, str(tmp_path)), nprocs=2, join=True)
    got = torch.load(tmp_path / "weights.pt", weights_only=True)
    single = Trainer(cfg_for(tmp_path / "single"), TensorSource(x)).run().sae.state_dict()
    for k in ("W_enc", "W_dec", "b_enc", "b_dec"):
        torch.testing.assert_close(got["synced"][k], single[k], atol=2e-5, rtol=1e-4)
    with pytest.raises(AssertionError):
        for k in ("W_enc", "W_dec", "b_enc", "b_dec"):
            torch.testing.assert_close(got["bypassed"][k], single[k], atol=2e-5, rtol=1e-4)
