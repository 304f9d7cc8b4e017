"""SAE train-step time and peak memory on CPU: ours vs EleutherAI sparsify, same data, same shapes, one run.

    python bench/sae_train.py                      # d=2048, n=32768, k=32, batch 4096 (the issue's shape)
    python bench/sae_train.py --d 512 --n 8192     # quicker

sparsify runs in its own venv (--peer-python, default /work/bench-venv/bin/python; see DESIGN.md section 8:
torch==2.13.0 pinned first, then `pip install eai-sparsify`, run with SPARSIFY_DISABLE_TRITON=1 on CPU).
Each side runs in a fresh subprocess (so peak RSS is its own); rounds alternate A/B and we report medians.
A step = forward, backward, decoder-gradient projection, Adam step, decoder renormalisation (no dead latents yet,
as at the start of training, so neither side runs AuxK).
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
    threads: int = 2
    peer_python: str = "/work/bench-venv/bin/python"
    worker: str = ""  # internal: "ours" | "sparsify"
    data: str = ""  # internal


def run_worker(b: TrainBench) -> None:
    import torch
    torch.set_num_threads(b.threads)
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
        opt = torch.optim.Adam(sae.parameters(), lr=2e-4 / (b.n / 2**14) ** 0.5, eps=6.25e-10)
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


def launch(b: TrainBench, who: str, data: str) -> dict:
    py = sys.executable if who == "ours" else b.peer_python
    args = [py, str(Path(__file__).resolve()), "--worker", who, "--data", data] + [
        f"--{k}={getattr(b, k)}" for k in ("d", "n", "k", "batch", "steps", "threads")]
    env = {**os.environ, "SPARSIFY_DISABLE_TRITON": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(b.threads)}
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
    res: dict[str, dict[str, list[float]]] = {w: {"times": [], "rss": []} for w in ("ours", "sparsify")}
    with tempfile.TemporaryDirectory() as tmp:
        data = str(Path(tmp) / "x.pt")
        torch.save(x, data)
        for r in range(b.rounds):
            for who in (("ours", "sparsify") if r % 2 == 0 else ("sparsify", "ours")):
                out = launch(b, who, data)
                res[who]["times"] += out["times"]
                res[who]["rss"].append(out["peak_rss_mb"])
                print(f"round {r} {who}: steps {['%.2f' % t for t in out['times']]} s, peak RSS {out['peak_rss_mb']:.0f} MB",
                      flush=True)
    med = {w: statistics.median(v["times"]) for w, v in res.items()}
    rss = {w: max(v["rss"]) for w, v in res.items()}
    print(f"\nd={b.d} n={b.n} k={b.k} batch={b.batch}, CPU threads={b.threads}, {b.rounds} alternating rounds x "
          f"{b.steps} steps\n| | step time (median s) | peak RSS (MB) |\n|---|---|---|")
    for w in ("ours", "sparsify"):
        print(f"| {w} | {med[w]:.2f} | {rss[w]:.0f} |")
    print(f"| ratio ours/sparsify | {med['ours'] / med['sparsify']:.2f}x (goal <= 0.8x) | "
          f"{rss['ours'] / rss['sparsify']:.2f}x |")
    return 0


if __name__ == "__main__":
    from llama.cli import run_main
    run_main(main)
