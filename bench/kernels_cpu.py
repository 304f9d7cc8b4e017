"""CPU: the reference sparse decode (what `kernels.sparse_decode` runs on CPU) vs the dense scatter+matmul path.

The SAE must stay at least as fast on CPU with kernels as with the dense definition. Both run alternately
(A/B, the machine drifts), the medians and their ratio are printed, for forward and forward+backward (grads
for top_acts and W_dec) at the SAE training shape d=2048, n=32768, k=32, B=4096. Also times kernels.topk (the
reference on CPU) vs torch.topk on [B, n] as a sanity peer.

    python bench/kernels_cpu.py --reps 3 --threads 2
    python bench/kernels_cpu.py --auxk-widths 32,128,256,512,1024 --batch 1024 --n-latents 16384 --d-model 512

--auxk-widths instead times decode fwd+bwd with k = each width (the AuxK pattern), the reference's sorted
gathers vs the dense [B, n] product, to place sae.ops.DENSE_WIDTH_DIVISOR["cpu"] (dense once w >= n / divisor).
"""
from __future__ import annotations

import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import kernels  # noqa: E402
from llama.cli import UserError, atomic_write_json, config_to_dict, parse_config, run_main  # noqa: E402


@dataclass
class CpuBenchConfig:
    batch: int = field(default=4096, metadata={"help": "tokens (B)"})
    d_model: int = 2048
    n_latents: int = 32768
    k: int = 32
    reps: int = field(default=3, metadata={"help": "alternating A/B repetitions (median reported)"})
    threads: int = field(default=0, metadata={"help": "torch threads (0: leave torch's default)"})
    dtype: str = field(default="float32", metadata={"choices": ["float32", "bfloat16"]})
    seed: int = 0
    out: str = field(default="", metadata={"help": "optional JSON file for config + results"})
    auxk_widths: str = field(default="", metadata={"help": "comma-separated widths: the AuxK path table only"})


def _fwd_bwd(fn: Callable, acts: torch.Tensor, idx: torch.Tensor, W: torch.Tensor, grad: torch.Tensor) -> None:
    a, w = acts.detach().requires_grad_(), W.detach().requires_grad_()
    torch.autograd.grad(fn(a, idx, w), (a, w), grad)


def _ab(fns: dict[str, Callable[[], object]], reps: int) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(CpuBenchConfig, argv, description=__doc__)
    if min(cfg.batch, cfg.d_model, cfg.n_latents, cfg.k, cfg.reps) < 1 or cfg.k > cfg.n_latents:
        raise UserError("--batch, --d-model, --n-latents, --k, --reps must be >= 1 and --k <= --n-latents")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dtype = getattr(torch, cfg.dtype)
    g = torch.Generator().manual_seed(cfg.seed)
    B, k, n, d = cfg.batch, cfg.k, cfg.n_latents, cfg.d_model
    idx = torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(B)])
    acts = torch.rand(B, k, generator=g).to(dtype)
    W = (torch.randn(n, d, generator=g) / d**0.5).to(dtype)
    grad = torch.randn(B, d, generator=g).to(dtype)
    assert kernels.backend(acts, idx, W) == "reference"
    dense, ref = kernels.reference.sparse_decode_dense, kernels.sparse_decode
    if cfg.auxk_widths:
        return auxk_table(cfg, W, grad, g)
    print(f"B={B} d={d} n={n} k={k} {cfg.dtype}, {torch.get_num_threads()} threads, {cfg.reps} reps", flush=True)
    results = {}
    results["fwd"] = _ab({"dense": lambda: dense(acts, idx, W), "kernels": lambda: ref(acts, idx, W)}, cfg.reps)
    results["fwd+bwd"] = _ab({"dense": lambda: _fwd_bwd(dense, acts, idx, W, grad),
                              "kernels": lambda: _fwd_bwd(ref, acts, idx, W, grad)}, cfg.reps)
    x = torch.randn(B, n, generator=g).to(dtype)
    results["topk"] = _ab({"dense": lambda: torch.topk(x, k), "kernels": lambda: kernels.topk(x, k)}, cfg.reps)
    print(f"{'op':10s} {'peer':>12s} {'peer ms':>10s} {'kernels ms':>11s} {'speedup':>8s}")
    for op, t in results.items():
        peer = "torch.topk" if op == "topk" else "dense"
        print(f"{op:10s} {peer:>12s} {t['dense']:10.1f} {t['kernels']:11.1f} {t['dense'] / t['kernels']:7.2f}x")
    if cfg.out:
        atomic_write_json(cfg.out, {"config": config_to_dict(cfg), "threads": torch.get_num_threads(),
                                    "ms": results})
    return 0


def auxk_table(cfg: CpuBenchConfig, W: torch.Tensor, grad: torch.Tensor, g: torch.Generator) -> int:
    from sae.ops import DENSE_WIDTH_DIVISOR
    B, n = grad.shape[0], W.shape[0]
    print(f"{'width':>6s} {'n/width':>8s} {'sparse ms':>10s} {'dense ms':>9s} {'dense/sparse':>13s} {'ours':>7s}")
    rows = []
    for w in (int(v) for v in cfg.auxk_widths.split(",")):
        idx = torch.stack([torch.randperm(n, generator=g)[:w] for _ in range(B)])
        acts = torch.rand(B, w, generator=g).to(W.dtype)
        t = _ab({"sparse": lambda: _fwd_bwd(kernels.sparse_decode, acts, idx, W, grad),
                 "dense": lambda: _fwd_bwd(kernels.reference.sparse_decode_dense, acts, idx, W, grad)}, cfg.reps)
        ours = "dense" if w * DENSE_WIDTH_DIVISOR["cpu"] >= n else "sparse"
        print(f"{w:6d} {n // w:8d} {t['sparse']:10.1f} {t['dense']:9.1f} {t['dense'] / t['sparse']:12.2f}x {ours:>7s}")
        rows.append({"width": w, **t})
    if cfg.out:
        atomic_write_json(cfg.out, {"config": config_to_dict(cfg), "auxk": rows})
    return 0


if __name__ == "__main__":
    run_main(main)
