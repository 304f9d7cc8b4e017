"""SAE train-step time and peak memory on CPU: ours vs EleutherAI sparsify, same data, same shapes, one run.

    python bench/sae_train.py                      # d=2048, n=32768, k=32, batch 4096 (the issue's shape)
    python bench/sae_train.py --d 512 --n 8192     # quicker
    python bench/sae_train.py --threads 1          # one thread setting only (default: 1 and 2)

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
from dataclasses import dataclass
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
    worker: str = ""  # internal: "ours" | "sparsify"
    data: str = ""  # internal


def run_worker(b: TrainBench) -> None:
    import torch
    torch.set_num_threads(int(b.threads))
    torch.manual_seed(0)
    x = torch.load(b.data, weights_only=True)
    batches = list(x.split(b.batch))
    if b.worker == "ours":
        from sae import TensorSource, TrainConfig
        from sae.train import Trainer
        tr = Trainer(TrainConfig(out=tempfile.mkdtemp(), n_latents=b.n, k=b.k, batch_size=b.batch, progress=False,
                                 init_rows=b.batch, b_dec_init="mean"), TensorSource(x, val_fraction=0.0))
        tr.init_weights()

        def step(xb):
            tr.train_step(xb)
    else:
        from sparsify import SparseCoder, SparseCoderConfig
        sae = SparseCoder(b.d, SparseCoderConfig(num_latents=b.n, k=b.k))
        opt = torch.optim.Adam(sae.parameters(), lr=2e-4 / (b.n / 2**14) ** 0.5, eps=6.25e-10,
                               **({"fused": True} if b.peer_fused_adam else {}))
        dead = torch.zeros(b.n, dtype=torch.bool)

        def step(xb):
            out = sae(xb, dead_mask=dead)
            loss = out.fvu + out.auxk_loss / 32
            opt.zero_grad(set_to_none=True)
            loss.backward()
            sae.remove_gradient_parallel_to_decoder_directions()
            torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
            opt.step()
            sae.set_decoder_norm_to_unit_norm()
    step(batches[0])  # warm-up
    times = []
    for i in range(b.steps):
        t0 = time.perf_counter()
        step(batches[(i + 1) % len(batches)])
        times.append(time.perf_counter() - t0)
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"times": times, "peak_rss_mb": rss_mb}))


def launch(b: TrainBench, who: str, data: str, threads: int) -> dict:
    py = sys.executable if who == "ours" else b.peer_python
    args = [py, str(Path(__file__).resolve()), "--worker", who, "--data", data, f"--threads={threads}"] + [
        f"--{k.replace('_', '-')}={getattr(b, k)}" for k in ("d", "n", "k", "batch", "steps", "peer_fused_adam")]
    env = {**os.environ, "SPARSIFY_DISABLE_TRITON": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads)}
    r = subprocess.run(args, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise SystemExit(f"{who} worker failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    from llama.cli import parse_config
    b = parse_config(TrainBench, argv, description=__doc__)
    if b.worker:
        run_worker(b)
        return 0
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
                    out = launch(b, who, data, threads)
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


if __name__ == "__main__":
    from llama.cli import run_main
    run_main(main)
