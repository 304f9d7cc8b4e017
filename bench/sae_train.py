"""SAE train-step time and peak memory on CPU: ours vs EleutherAI sparsify, same data, same shapes, one run.

    python bench/sae_train.py                      # d=2048, n=32768, k=32, batch 4096 (the issue's shape)
    python bench/sae_train.py --d 512 --n 8192     # quicker
    python bench/sae_train.py --threads 1          # one thread setting only (default: 1 and 2)
    python bench/sae_train.py --device cuda --n 65536 --precisions bf16,fp32 --dead-fractions 0,0.05
                                                   # GPU: CUDA-event timing, peak CUDA memory (bench/gpu.py)

sparsify runs in its own venv (--peer-python, default /work/bench-venv/bin/python; see DESIGN.md section 8:
torch==2.13.0 pinned first, then `pip install eai-sparsify`, run with SPARSIFY_DISABLE_TRITON=1 on CPU).
Each side runs in a fresh subprocess (so peak RSS is its own); rounds alternate A/B and we report medians per
thread setting. The machine is shared, so only same-run ratios mean anything.

What one step is, on each side (like for like):
- ours: `Trainer.train_step` as training runs it: forward (FVU; AuxK skipped because no latent is dead yet),
  backward, decoder-gradient projection, grad-norm clip at 1.0, AdamW (weight decay 0 = Adam; fused), LR
  schedule, decoder renormalisation, dead-latent counters and logged stats. Its encoder GEMM runs on oneDNN's
  fp32 kernel (sae.ops.encoder_linear); `SAE_ENCODER_GEMM=blas python bench/sae_train.py` measures ours with
  F.linear (MKL sgemm, what sparsify uses) instead.
- sparsify: `SparseCoder.forward(x, dead_mask=all-False)` (so its AuxK is skipped too), fvu + auxk/32 backward,
  `remove_gradient_parallel_to_decoder_directions`, grad-norm clip at 1.0 (sparsify's trainer has no clipping;
  added so both do the same work), `torch.optim.Adam` built as sparsify's trainer builds it when bitsandbytes
  is absent (which on CPU is torch's per-tensor loop; `--peer-fused-adam` gives it fused Adam like ours), same
  lr and eps, `set_decoder_norm_to_unit_norm`. Not timed on its side: its LR scheduler and did_fire bookkeeping.
Both: fp32, same init scheme (W_enc = W_dec^T, unit rows), same data; the maths per step are identical (TopK on
pre-activations, ReLU on kept values, FVU against the batch variance).

On CUDA (--device cuda) each worker runs every (precision, dead fraction) variant in one process on data made on
the device: bf16 = the forward under bf16 autocast (ours: --autocast auto; sparsify: as its trainer does), fp32 =
no autocast (TF32 matmuls on both). --dead-fractions > 0 marks that fraction of latents dead on both sides (ours:
their counters set past --dead-tokens; sparsify: a fixed dead_mask), so AuxK (k_aux = d/2) runs in every step.
Steps are timed with CUDA events; peak memory is torch.cuda.max_memory_allocated. `--kernels reference` times ours
with LLAMA_SAE_KERNELS=reference. sparsify's own Triton decoder is on (SPARSIFY_DISABLE_TRITON only on CPU).
"""
from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@dataclass
class TrainBench:
    d: int = 2048
    n: int = 32768
    k: int = 32
    batch: int = 4096
    steps: int = 2  # timed steps per round (after one warm-up step)
    rounds: int = 2
    threads: str = "1,2"  # comma-separated torch thread counts, each measured separately
    peer_fused_adam: bool = False  # give sparsify torch's fused Adam as well (stricter peer)
    peer_python: str = "/work/bench-venv/bin/python"
    peer_path: str = ""  # extra PYTHONPATH for the peer (a --target install of sparsify, as bench/gpu.py makes)
    device: str = field(default="cpu", metadata={"choices": ["cpu", "cuda"]})
    precisions: str = "fp32"  # CUDA: comma-separated bf16,fp32
    dead_fractions: str = "0"  # CUDA: comma-separated fractions of latents kept dead (AuxK on when > 0)
    kernels: str = field(default="auto", metadata={"choices": ["auto", "reference"]})  # ours: LLAMA_SAE_KERNELS
    worker: str = ""  # internal: "ours" | "sparsify"
    data: str = ""  # internal


def make_step(b: TrainBench, who: str, x, bf16: bool, dead_fraction: float):
    """(step(x_batch), n_dead) for one side: ours (`Trainer.train_step`) or sparsify (see the module docstring)."""
    import torch
    device = torch.device(b.device)
    n_dead = int(round(dead_fraction * b.n))
    dead_idx = torch.randperm(b.n, generator=torch.Generator().manual_seed(1))[:n_dead].to(device)
    if who == "ours":
        from sae import TensorSource, TrainConfig
        from sae.train import Trainer
        tr = Trainer(TrainConfig(out=tempfile.mkdtemp(), n_latents=b.n, k=b.k, batch_size=b.batch, progress=False,
                                 init_rows=b.batch, b_dec_init="mean", device=b.device,
                                 autocast="auto" if bf16 else "off"), TensorSource(x, val_fraction=0.0))
        tr.init_weights()
        tr.tokens_since_fired[dead_idx] = 10**15  # dead for the whole run unless they fire
        tr.dead_bound.refresh(tr.tokens_since_fired)
        return tr.train_step, n_dead
    from sparsify import SparseCoder, SparseCoderConfig
    torch.backends.cuda.matmul.allow_tf32 = True
    sae = SparseCoder(b.d, SparseCoderConfig(num_latents=b.n, k=b.k), device=device)
    opt = torch.optim.Adam(sae.parameters(), lr=2e-4 / (b.n / 2**14) ** 0.5, eps=6.25e-10,
                           **({"fused": True} if b.peer_fused_adam or b.device == "cuda" else {}))
    dead = torch.zeros(b.n, dtype=torch.bool, device=device)
    dead[dead_idx] = True

    def step(xb):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16 and device.type == "cuda"):
            out = sae(xb, dead_mask=dead)
        loss = out.fvu + out.auxk_loss / 32
        opt.zero_grad(set_to_none=True)
        loss.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        opt.step()
        sae.set_decoder_norm_to_unit_norm()
    return step, n_dead


def time_steps(step, batches, steps: int, cuda: bool) -> list[float]:
    """Seconds per step after one warm-up step (CUDA events on a GPU: the device's time, queue kept full)."""
    import torch
    step(batches[0])
    if not cuda:
        times = []
        for i in range(steps):
            t0 = time.perf_counter()
            step(batches[(i + 1) % len(batches)])
            times.append(time.perf_counter() - t0)
        return times
    step(batches[1 % len(batches)])  # a second warm-up: Triton compiles, allocator settles
    torch.cuda.synchronize()
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)]
    ev[0].record()
    for i in range(steps):
        step(batches[i % len(batches)])
        ev[i + 1].record()
    torch.cuda.synchronize()
    return [ev[i].elapsed_time(ev[i + 1]) / 1e3 for i in range(steps)]


def run_worker(b: TrainBench) -> None:
    import torch
    torch.set_num_threads(int(b.threads))
    torch.manual_seed(0)
    if b.kernels == "reference":
        os.environ["LLAMA_SAE_KERNELS"] = "reference"
    if b.data:
        x = torch.load(b.data, weights_only=True)
    else:  # the same seeded data on every side, made here (on the device)
        x = (torch.randn(2 * b.batch, b.d) * 3 + torch.randn(b.d)).to(b.device)
    batches = list(x.split(b.batch))
    results = []
    for prec in [p for p in b.precisions.split(",") if p]:
        for frac in [float(f) for f in b.dead_fractions.split(",") if f]:
            if b.device == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            step, n_dead = make_step(b, b.worker, x, prec == "bf16", frac)
            times = time_steps(step, batches, b.steps, b.device == "cuda")
            med = statistics.median(times)
            results.append({"precision": prec, "dead_fraction": frac, "n_dead": n_dead, "times": times,
                            "tokens_per_s": b.batch / med, "peak_rss_mb": resource.getrusage(
                                resource.RUSAGE_SELF).ru_maxrss / 1024,
                            "peak_cuda_mb": torch.cuda.max_memory_allocated() / 2**20 if b.device == "cuda" else 0})
            del step
    print(json.dumps(results))


def launch(b: TrainBench, who: str, data: str, threads: int, timeout: float | None = None):
    """Run one side's worker in a fresh process; its last stdout line is JSON. `who`: ours | reference | sparsify."""
    py = b.peer_python if who == "sparsify" and not b.peer_path else sys.executable
    worker = "sparsify" if who == "sparsify" else "ours"
    args = [py, str(Path(__file__).resolve()), "--worker", worker, "--data", data, f"--threads={threads}",
            f"--kernels={'reference' if who == 'reference' else 'auto'}"] + [
        f"--{k.replace('_', '-')}={getattr(b, k)}" for k in ("d", "n", "k", "batch", "steps", "peer_fused_adam",
                                                             "device", "precisions", "dead_fractions")]
    path = os.pathsep.join(p for p in (str(ROOT), b.peer_path if who == "sparsify" else "") if p)
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": str(threads)}
    if b.device == "cpu":
        env["SPARSIFY_DISABLE_TRITON"] = "1"
    r = subprocess.run(args, capture_output=True, text=True, env=env, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"{who} worker failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    from llama.cli import parse_config
    b = parse_config(TrainBench, argv, description=__doc__)
    if b.worker:
        run_worker(b)
        return 0
    if b.device == "cuda":
        return cuda_table(b)
    if not Path(b.peer_python).exists():
        print(f"peer venv {b.peer_python} missing: create it as the module docstring says")
        return 1
    import torch
    torch.manual_seed(0)
    x = torch.randn(2 * b.batch, b.d) * 3 + torch.randn(b.d)
    thread_list = [int(t) for t in str(b.threads).split(",") if t.strip()]
    peer = "sparsify" + (" (fused Adam)" if b.peer_fused_adam else "")
    tables = []
    with tempfile.TemporaryDirectory() as tmp:
        data = str(Path(tmp) / "x.pt")
        torch.save(x, data)
        for threads in thread_list:
            res: dict[str, dict[str, list[float]]] = {w: {"times": [], "rss": []} for w in ("ours", "sparsify")}
            for r in range(b.rounds):
                for who in (("ours", "sparsify") if r % 2 == 0 else ("sparsify", "ours")):
                    out = launch(b, who, data, threads)[0]
                    res[who]["times"] += out["times"]
                    res[who]["rss"].append(out["peak_rss_mb"])
                    print(f"threads {threads} round {r} {who}: steps {['%.2f' % t for t in out['times']]} s, "
                          f"peak RSS {out['peak_rss_mb']:.0f} MB", flush=True)
            med = {w: statistics.median(v["times"]) for w, v in res.items()}
            rss = {w: max(v["rss"]) for w, v in res.items()}
            lines = [f"\nd={b.d} n={b.n} k={b.k} batch={b.batch}, CPU threads={threads}, {b.rounds} alternating "
                     f"rounds x {b.steps} steps\n| | step time (median s) | peak RSS (MB) |\n|---|---|---|",
                     f"| ours | {med['ours']:.2f} | {rss['ours']:.0f} |",
                     f"| {peer} | {med['sparsify']:.2f} | {rss['sparsify']:.0f} |",
                     f"| ratio ours/{peer} | {med['ours'] / med['sparsify']:.2f}x (goal <= 0.8x) | "
                     f"{rss['ours'] / rss['sparsify']:.2f}x |"]
            tables.append("\n".join(lines))
    print("\n".join(tables))
    return 0


def cuda_table(b: TrainBench) -> int:
    """GPU: ours, ours with LLAMA_SAE_KERNELS=reference and sparsify (if importable), each in one worker."""
    rows = []
    for who in ("ours", "reference", "sparsify"):
        try:
            rows += [{"impl": who, **r} for r in launch(b, who, "", b.threads and int(b.threads.split(",")[0]))]
        except Exception as e:  # noqa: BLE001 - the peer is optional; say why it is missing
            print(f"{who}: unavailable ({str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__})")
    print(format_cuda_rows(rows, b))
    return 0


def format_cuda_rows(rows: list[dict], b: TrainBench) -> str:
    lines = [f"d={b.d} n={b.n} k={b.k} B={b.batch}, {b.steps} timed steps (median)",
             "| impl | precision | dead latents | tokens/s | step ms | peak CUDA MB | vs sparsify |",
             "|---|---|---|---|---|---|---|"]
    peer = {(r["precision"], r["dead_fraction"]): r["tokens_per_s"] for r in rows if r["impl"] == "sparsify"}
    for r in rows:
        p = peer.get((r["precision"], r["dead_fraction"]))
        ratio = f"{r['tokens_per_s'] / p:.2f}x" if p else "-"
        lines.append(f"| {r['impl']} | {r['precision']} | {r['n_dead']} | {r['tokens_per_s']:,.0f} | "
                     f"{1e3 * b.batch / r['tokens_per_s']:.2f} | {r['peak_cuda_mb']:,.0f} | {ratio} |")
    return "\n".join(lines)


if __name__ == "__main__":
    from llama.cli import run_main
    run_main(main)
