"""Triton kernels vs their peers on CUDA: correctness at real sizes, then a timing table.

1. correctness, fp32 and bf16, every (d, n, k) of the grid at B=4096: sparse decode forward, grad top_acts and
   grad W_dec against F.embedding_bag in fp32 (relative max error), top-k values against torch.topk (exact).
2. timings (bf16 decode; bf16 and fp32 top-k), median of CUDA-event timed reps: sparse decode forward and
   forward+backward, Triton vs dense (scatter into [B, n] then matmul) vs F.embedding_bag; Triton top-k vs
   torch.topk. Columns: ms, speedup over the peer (dense / torch.topk), effective GB/s (a minimal bytes model:
   each touched row read once, each output written once) and its share of the card's nominal bandwidth.
Goals checked at the end: decode fwd+bwd >= 5x dense at n=2^17, k=32; top-k no slower than torch.topk.

    python bench/kernels.py                # CUDA, under 4 minutes on an H100
    python bench/kernels.py --dry-run      # tiny shapes on CPU under the Triton interpreter (tests)
CPU reference-vs-dense numbers: bench/kernels_cpu.py.
"""
from __future__ import annotations

import dataclasses
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from llama.cli import UserError, atomic_write_json, config_to_dict, parse_config, run_main  # noqa: E402

NOMINAL_GBPS = {"H200": 4800, "H100 SXM": 3350, "H100 80GB HBM3": 3350, "H100 PCIe": 2000, "H100": 3350,
                "A100-SXM4-80GB": 2039, "A100-SXM4-40GB": 1555, "A100": 1555, "L40S": 864, "A10G": 600,
                "RTX 4090": 1008, "RTX 3090": 936}


@dataclass
class BenchConfig:
    dry_run: bool = field(default=False, metadata={"help": "tiny shapes on CPU under TRITON_INTERPRET=1"})
    batch: int = field(default=4096, metadata={"help": "tokens per batch (B)"})
    d_models: tuple[int, ...] = field(default=(2048, 3072, 4096), metadata={"help": "correctness grid: d"})
    n_latents: tuple[int, ...] = field(default=(2**15, 2**16, 2**17), metadata={"help": "correctness grid: n"})
    ks: tuple[int, ...] = field(default=(32, 64), metadata={"help": "correctness grid: k"})
    timing: tuple[str, ...] = field(default=("2048:131072:32", "3072:65536:64", "4096:131072:32"),
                                    metadata={"help": "timed shapes as d:n:k"})
    reps: int = field(default=20, metadata={"help": "timed repetitions (median reported)"})
    warmup: int = field(default=3, metadata={"help": "untimed calls first (compile, caches)"})
    seed: int = 0
    out: str = field(default="", metadata={"help": "optional JSON file for config + results"})


DRY_RUN = dict(batch=8, d_models=(48, 64), n_latents=(64, 100), ks=(4, 8), timing=("48:100:4",), reps=1,
               warmup=0)


class Row(NamedTuple):
    op: str
    shape: str
    impl: str
    ms: float
    speedup: float
    gbps: float


def time_ms(fn: Callable[[], object], reps: int, warmup: int, cuda: bool) -> float:
    for _ in range(warmup):
        fn()
    if not cuda:
        times = []
        for _ in range(max(reps, 1)):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events)


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-30)).item()


def decode_inputs(B: int, k: int, n: int, d: int, dtype: torch.dtype, device: str, seed: int):
    g = torch.Generator(device=device).manual_seed(seed)
    idx = torch.randint(0, n, (B, k), generator=g, device=device)
    acts = torch.rand(B, k, generator=g, device=device).to(dtype)
    W = (torch.randn(n, d, generator=g, device=device) / d**0.5).to(dtype)
    grad = torch.randn(B, d, generator=g, device=device).to(dtype)
    return acts, idx, W, grad


def fwd_bwd(fn: Callable, acts: torch.Tensor, idx: torch.Tensor, W: torch.Tensor, grad: torch.Tensor):
    a, w = acts.detach().requires_grad_(), W.detach().requires_grad_()
    out = fn(a, idx, w)
    return (out, *torch.autograd.grad(out, (a, w), grad))


def embedding_bag(acts: torch.Tensor, idx: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    return F.embedding_bag(idx, W, per_sample_weights=acts, mode="sum")


def triton_topk(x: torch.Tensor, k: int):
    """Our Triton top-k itself (kernels.topk runs torch.topk unless LLAMA_SAE_TOPK=triton)."""
    from kernels.topk import topk
    return topk(x, k)


def check_correctness(cfg: BenchConfig, dtypes: list[torch.dtype], device: str) -> list[str]:
    import kernels
    failures = []
    for dtype in dtypes:
        tol = 1e-4 if dtype == torch.float32 else 1.5e-2
        for d in cfg.d_models:
            for n in cfg.n_latents:
                for k in cfg.ks:
                    acts, idx, W, grad = decode_inputs(cfg.batch, k, n, d, dtype, device, cfg.seed)
                    assert kernels.backend(acts, idx, W) == "triton"
                    got = fwd_bwd(kernels.sparse_decode, acts, idx, W, grad)
                    want = fwd_bwd(embedding_bag, acts.float(), idx, W.float(), grad.float())
                    errs = [rel_err(a, b) for a, b in zip(got, want)]
                    del got, want, W
                    x = torch.randn(cfg.batch, n, device=device).to(dtype)
                    values, indices = triton_topk(x, k)
                    topk_ok = (torch.equal(values, torch.topk(x, k).values)
                               and torch.equal(x.gather(1, indices), values))
                    ok = max(errs) <= tol and topk_ok
                    line = (f"{str(dtype)[6:]:8s} d={d:5d} n={n:6d} k={k:3d}  decode rel err out/acts/W "
                            f"{errs[0]:.1e}/{errs[1]:.1e}/{errs[2]:.1e} (tol {tol:.0e})  topk "
                            f"{'exact' if topk_ok else 'MISMATCH'}  {'ok' if ok else 'FAIL'}")
                    print(line, flush=True)
                    if not ok:
                        failures.append(line)
    return failures


def decode_bytes(B: int, k: int, n: int, d: int, elt: int, backward: bool) -> int:
    fwd = B * k * d * elt + B * d * elt + B * k * 16
    bwd = 3 * B * k * d * elt + B * d * elt + n * d * elt  # grad_acts rows, grad rows, W rows written
    return fwd + (bwd if backward else 0)


def time_shapes(cfg: BenchConfig, device: str) -> list[Row]:
    import kernels
    cuda = device == "cuda"
    rows: list[Row] = []
    decode_dtype = torch.bfloat16 if cuda else torch.float32
    for spec in cfg.timing:
        try:
            d, n, k = (int(v) for v in spec.split(":"))
        except ValueError:
            raise UserError(f"--timing: expected d:n:k like 2048:131072:32, got {spec!r}") from None
        B, elt = cfg.batch, decode_dtype.itemsize
        acts, idx, W, grad = decode_inputs(B, k, n, d, decode_dtype, device, cfg.seed)
        shape = f"B={B} d={d} n={n} k={k} {str(decode_dtype)[6:]}"
        impls = {"dense": kernels.reference.sparse_decode_dense, "embedding_bag": embedding_bag,
                 "triton": kernels.sparse_decode}
        for backward in (False, True):
            op = "decode fwd+bwd" if backward else "decode fwd"
            gb = decode_bytes(B, k, n, d, elt, backward) / 1e9
            times = {}
            for name, fn in impls.items():
                call = (lambda fn=fn: fwd_bwd(fn, acts, idx, W, grad)) if backward else \
                       (lambda fn=fn: fn(acts, idx, W))
                times[name] = time_ms(call, cfg.reps, cfg.warmup, cuda)
            rows += [Row(op, shape, name, ms, times["dense"] / ms, gb / (ms / 1e3)) for name, ms in times.items()]
        del acts, idx, W, grad
        for dtype in ([torch.bfloat16, torch.float32] if cuda else [torch.float32]):
            x = torch.randn(B, n, device=device).to(dtype)
            gb = (B * n * dtype.itemsize + B * k * (dtype.itemsize + 8)) / 1e9
            t_ref = time_ms(lambda: torch.topk(x, k), cfg.reps, cfg.warmup, cuda)
            t_tri = time_ms(lambda: triton_topk(x, k), cfg.reps, cfg.warmup, cuda)
            shape = f"B={B} n={n} k={k} {str(dtype)[6:]}"
            rows += [Row("topk", shape, "torch.topk", t_ref, 1.0, gb / (t_ref / 1e3)),
                     Row("topk", shape, "triton", t_tri, t_ref / t_tri, gb / (t_tri / 1e3))]
            del x
    return rows


def nominal_bandwidth(device: str) -> tuple[str, float | None]:
    if device != "cuda":
        return "cpu (dry run)", None
    name = torch.cuda.get_device_name()
    for key, gbps in NOMINAL_GBPS.items():
        if key.lower() in name.lower():
            return name, float(gbps)
    return name, None


def print_table(rows: list[Row], card: str, bw: float | None) -> None:
    print(f"\ncard: {card}; nominal bandwidth: {f'{bw:.0f} GB/s' if bw else 'unknown'}")
    print(f"{'op':15s} {'shape':34s} {'impl':14s} {'ms':>9s} {'speedup':>8s} {'GB/s':>8s} {'%bw':>6s}")
    for r in rows:
        pct = f"{100 * r.gbps / bw:5.1f}%" if bw else "    -"
        print(f"{r.op:15s} {r.shape:34s} {r.impl:14s} {r.ms:9.3f} {r.speedup:7.2f}x {r.gbps:8.1f} {pct:>6s}")
    print("(speedup: over dense scatter+matmul for decode rows, over torch.topk for topk rows)")


def check_goals(rows: list[Row]) -> list[str]:
    lines = []
    for r in rows:
        if r.op == "decode fwd+bwd" and r.impl == "triton" and "n=131072 k=32" in r.shape:
            lines.append(f"goal decode fwd+bwd >= 5x dense ({r.shape}): {r.speedup:.1f}x "
                         f"{'met' if r.speedup >= 5 else 'MISSED'}")
        if r.op == "topk" and r.impl == "triton":
            lines.append(f"goal topk no slower than torch.topk ({r.shape}): {r.speedup:.2f}x "
                         f"{'met' if r.speedup >= 1 else 'MISSED'}")
    return lines


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(BenchConfig, argv, description=__doc__)
    if cfg.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # effective only if triton is not imported yet
        cfg = dataclasses.replace(cfg, **DRY_RUN)
        device = "cpu"
    elif torch.cuda.is_available():
        device = "cuda"
    else:
        raise UserError("no CUDA device: run on a GPU, or pass --dry-run (CPU interpreter smoke run)")
    import kernels
    if kernels.backend(torch.zeros(1, device=device)) != "triton":
        raise UserError(f"the Triton kernels cannot run here: {kernels.TRITON_ERROR or 'interpreter not ready'}")
    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    dtypes = [torch.float32, torch.bfloat16] if device == "cuda" else [torch.float32]
    failures = check_correctness(cfg, dtypes, device)
    print(f"correctness: {'all ok' if not failures else f'{len(failures)} FAILED'}", flush=True)
    rows = time_shapes(cfg, device)
    card, bw = nominal_bandwidth(device)
    print_table(rows, card, bw)
    goals = check_goals(rows)
    if device != "cuda":
        goals = [g + " (dry run: interpreter timings mean nothing)" for g in goals]
    print("\n".join(goals))
    print(f"total {time.perf_counter() - t0:.1f} s")
    if cfg.out:
        atomic_write_json(cfg.out, {"config": config_to_dict(cfg), "card": card, "nominal_gbps": bw,
                                    "correctness_failures": failures, "goals": goals,
                                    "rows": [r._asdict() for r in rows]})
    return 1 if failures else 0


if __name__ == "__main__":
    run_main(main)
