"""SAE training: ground-truth recovery, exact resume, real DDP (2 gloo ranks == 1 rank), dead counting, metrics."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from llama.cli import UserError
from sae import TensorSource, TrainConfig, load
from sae.synthetic import SyntheticConfig, generate, recovery
from sae.train import Trainer, train

ROOT = Path(__file__).resolve().parents[1]
EASY = SyntheticConfig(d=32, n_features=64, rows=20_000, avg_active=3, scale=7.0, bias_norm=1.0, seed=123)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def small_cfg(out: Path, **kw) -> TrainConfig:
    base = dict(out=str(out), n_latents=64, k=4, batch_size=64, steps=30, lr=2e-3, log_every=10, val_every=10,
                val_batches=2, ckpt_every=10, progress=False, dead_tokens=640, init_rows=512, warmup_steps=5)
    return TrainConfig(**{**base, **kw})


def test_recovers_ground_truth_features_easy_case(tmp_path: Path) -> None:
    torch.manual_seed(0)
    data = generate(EASY)
    cfg = TrainConfig(out=str(tmp_path), n_latents=128, k=4, batch_size=256, steps=700, lr=3e-3, log_every=100,
                      val_every=350, progress=False, dead_tokens=5000, ckpt_every=0, warmup_steps=50)
    tr = Trainer(cfg, TensorSource(data.x))
    assert recovery(data.features, tr.sae.W_dec) < 0.7  # the initial decoder is not already the answer
    res = tr.run()
    r = recovery(data.features, res.sae.W_dec)
    assert r >= 0.9, f"mean max cosine {r:.3f}"
    assert res.metrics["val_fvu"] < 0.2


def _weights(sae) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in sae.state_dict().items()}


def test_crash_and_resume_is_bit_identical(tmp_path: Path) -> None:
    x = generate(replace(EASY, rows=4000, d=16, n_features=32)).x
    full = Trainer(small_cfg(tmp_path / "a"), TensorSource(x))
    full_res = full.run()

    class Crash(Exception):
        pass

    def crash_at_15(step: int, sae) -> None:
        if step == 15:  # the checkpoint on disk is from step 10; steps 11-15 are lost like in a kill
            raise Crash

    with pytest.raises(Crash):
        Trainer(small_cfg(tmp_path / "b"), TensorSource(x)).run(crash_at_15)
    resumed = Trainer(small_cfg(tmp_path / "b", resume=True), TensorSource(x))
    res = resumed.run()
    assert resumed.step == 30
    for k, v in _weights(full_res.sae).items():
        assert torch.equal(v, res.sae.state_dict()[k]), k
    assert torch.equal(full.tokens_since_fired, resumed.tokens_since_fired)
    sa, sb = full.opt.state_dict()["state"], resumed.opt.state_dict()["state"]
    for i in sa:
        assert torch.equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"])
    lines = [json.loads(ln) for ln in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [10, 20, 30]  # the lost step-20 line of the crashed run is not doubled
    for key in ("loss", "fvu", "l0", "auxk", "dead", "dense", "lr", "tokens_per_s", "val_fvu"):
        assert key in lines[-1]
    # without --resume, a rerun starts over rather than silently continuing
    assert Trainer(small_cfg(tmp_path / "b"), TensorSource(x)).step == 0


def test_dead_latents_are_counted_in_tokens(tmp_path: Path) -> None:
    x = generate(replace(EASY, rows=4000, d=16, n_features=32)).x
    tr = Trainer(small_cfg(tmp_path, steps=12, dead_tokens=640, lr=1e-9), TensorSource(x))  # lr ~0: frozen
    tr.init_weights()
    with torch.no_grad():
        tr.sae.b_enc[5] = -1e4  # latent 5 can never fire
    it = tr.source.batches(64, seed=0)
    dead_at = []
    for step in range(12):
        dead_at.append(bool((tr.tokens_since_fired >= 640)[5]))
        tr.train_step(next(it))
    assert tr.tokens_since_fired[5] == 12 * 64
    assert dead_at == [False] * 10 + [True] * 2  # dead once 640 tokens (10 batches of 64) passed unfired


def test_other_architectures_train(tmp_path: Path) -> None:
    x = generate(replace(EASY, rows=4000, d=16, n_features=32)).x
    for arch in ("batchtopk", "relu"):
        res = train(small_cfg(tmp_path / arch, architecture=arch, steps=100, l1_coef=0.05), TensorSource(x))
        assert res.metrics["val_fvu"] < 0.6, (arch, res.metrics)
        back = load(tmp_path / arch / "sae")
        assert back.cfg.architecture == arch


def test_bad_input_is_a_user_error(tmp_path: Path) -> None:
    x = torch.randn(1000, 8)
    with pytest.raises(UserError, match="divisible"):
        Trainer(small_cfg(tmp_path, batch_size=63), TensorSource(x),
                info=__import__("sae.dist", fromlist=["DistInfo"]).DistInfo(0, 2, 0, torch.device("cpu")))
    r = subprocess.run([sys.executable, str(ROOT / "scripts/train_sae.py"), "--store", str(tmp_path / "nope")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "error: --store" in r.stderr and "Traceback" not in r.stderr


def _torchrun(tmp: Path, out: Path, store: Path, nproc: int, extra: list[str] = ()) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(ROOT / "scripts/train_sae.py"), "--store", str(store), "--out", str(out), "--n-latents", "128",
           "--k", "4", "--batch-size", "64", "--steps", "25", "--lr", "3e-3", "--dead-tokens", "320",
           "--init-rows", "512", "--warmup-steps", "3", "--log-every", "5", "--val-every", "0", "--progress", "false",
           "--device", "cpu", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]


def test_ddp_two_gloo_ranks_equal_one_process(tmp_path: Path) -> None:
    """torchrun with 2 ranks (each 32 rows) trains the same SAE as 1 process with the global batch of 64,
    AuxK and dead counters included (dead_tokens is small so latents die during the run)."""
    x = generate(replace(EASY, rows=3000, d=16, n_features=40)).x
    torch.save(x, tmp_path / "acts.pt")
    _torchrun(tmp_path, tmp_path / "ddp", tmp_path / "acts.pt", 2)
    one = train(TrainConfig(out=str(tmp_path / "one"), n_latents=128, k=4, batch_size=64, steps=25, lr=3e-3,
                            dead_tokens=320, init_rows=512, warmup_steps=3, log_every=5, val_every=0,
                            progress=False, device="cpu"), TensorSource(x))
    ddp = load(tmp_path / "ddp" / "sae")
    ref = load(tmp_path / "one" / "sae")
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        torch.testing.assert_close(getattr(ddp, name), getattr(ref, name), atol=2e-5, rtol=1e-4, msg=name)
    metrics = [json.loads(ln) for ln in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert max(m["dead"] for m in metrics) > 0  # AuxK was active in the compared run
    assert one.step == 25


def test_clip_grad_norm_matches_torch_above_and_below_the_limit() -> None:
    from sae.train import clip_grad_norm
    for scale in (1e-3, 1e3):  # below max_norm (untouched) and above it (rescaled)
        g = torch.Generator().manual_seed(1)
        a = [torch.nn.Parameter(torch.randn(5, 3, generator=g)) for _ in range(2)]
        b = [torch.nn.Parameter(p.detach().clone()) for p in a]
        for p, q in zip(a, b):
            p.grad = torch.randn(p.shape, generator=g) * scale
            q.grad = p.grad.clone()
        n_ours = clip_grad_norm(a, 1.0)
        n_torch = torch.nn.utils.clip_grad_norm_(b, 1.0)
        torch.testing.assert_close(n_ours, n_torch)
        for p, q in zip(a, b):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=0)


def test_validation_runs_on_its_own_schedule(tmp_path: Path) -> None:
    """val_every need not be a multiple of log_every: validation at steps 6 and 12 with logging every 4."""
    x = generate(replace(EASY, rows=4000, d=16, n_features=32)).x
    train(small_cfg(tmp_path, steps=12, log_every=4, val_every=6, ckpt_every=0), TensorSource(x))
    lines = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines if "val_fvu" in m] == [6, 12]
    assert [m["step"] for m in lines if "tokens_per_s" in m] == [4, 8, 12]
    assert [m["step"] for m in lines] == [4, 6, 8, 12]


def test_ema_sae_has_unit_norm_decoder_rows(tmp_path: Path) -> None:
    """The saved EMA SAE is the average of the weights with its decoder rows put back on the unit sphere, like
    every trained SAE (an average of unit rows is shorter than 1)."""
    x = generate(replace(EASY, rows=4000, d=16, n_features=32)).x
    tr = Trainer(small_cfg(tmp_path, steps=20, ema_decay=0.9, ckpt_every=0), TensorSource(x))
    res = tr.run()
    saved = load(tmp_path / "sae")
    torch.testing.assert_close(saved.W_dec.norm(dim=1), torch.ones(64))
    torch.testing.assert_close(res.sae.W_dec.norm(dim=1), torch.ones(64))
    ema = tr.ema["W_dec"]
    assert float(ema.norm(dim=1).min()) < 1 - 1e-4  # the raw average is not unit norm: the renormalisation mattered
    torch.testing.assert_close(saved.W_dec, ema / ema.norm(dim=1, keepdim=True), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(saved.W_enc, tr.ema["W_enc"], atol=1e-5, rtol=1e-5)


def test_a_source_without_training_rows_is_one_clear_error(tmp_path: Path) -> None:
    from llama.cli import UserError
    with pytest.raises(UserError, match="holds no training rows.*--val-fraction 1"):
        Trainer(small_cfg(tmp_path), TensorSource(torch.randn(256, 16), val_fraction=1.0))
