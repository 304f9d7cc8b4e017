"""The measurements of bench/gpu.py, one function per section: each takes the run's Ctx and returns a dict of
results (its "rows" become the printed table). Shapes are the issue's on a card and tiny under --dry-run (CPU,
Triton interpreter: the same code paths, timings meaningless)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]

# nominal (datasheet) HBM bandwidth GB/s and dense bf16 TFLOP/s; the env section also measures both
NOMINAL = {"H200": (4800, 989), "H100": (3350, 989), "A100": (2039, 312), "L40S": (864, 362), "A10G": (600, 125),
           "RTX 4090": (1008, 165)}


@dataclass
class Ctx:
    dry: bool
    device: str
    tmp: Path
    sparsify_path: str = ""  # PYTHONPATH entry holding sparsify, "" when unavailable
    sparsify_why: str = ""
    peak_tflops: float | None = None  # measured bf16 GEMM rate (env section)
    extra: dict = field(default_factory=dict)

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"


def sync(ctx: Ctx) -> None:
    if ctx.cuda:
        torch.cuda.synchronize()


def time_ms(ctx: Ctx, fn: Callable[[], object], reps: int = 10, warmup: int = 2) -> float:
    from bench.kernels import time_ms as _time_ms
    return _time_ms(fn, 1 if ctx.dry else reps, 0 if ctx.dry else warmup, ctx.cuda)


def env(ctx: Ctx) -> dict:
    out: dict = {"torch": torch.__version__, "python": sys.version.split()[0]}
    try:
        import triton
        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    if not ctx.cuda:
        out["card"] = "cpu (dry run)"
        return out
    p = torch.cuda.get_device_properties(0)
    out.update(card=p.name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
               memory_gib=round(p.total_memory / 2**30, 1))
    try:
        out["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                       capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        out["driver"] = None
    for key, (gbps, tflops) in NOMINAL.items():
        if key.lower() in p.name.lower():
            out.update(nominal_gbps=gbps, nominal_bf16_tflops=tflops)
            break
    out.update(_measured_ceilings(ctx))
    ctx.peak_tflops = out.get("nominal_bf16_tflops") or out["measured_bf16_tflops"]
    return out


def _measured_ceilings(ctx: Ctx) -> dict:
    """bf16 GEMM 8192^3 TFLOP/s and device-to-device copy GB/s (4 GiB, read + write counted)."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    gemm_ms = time_ms(ctx, lambda: a @ a, reps=10, warmup=3)
    src = torch.empty(2**30, dtype=torch.float32, device="cuda")
    copy_ms = time_ms(ctx, lambda: src.clone(), reps=5, warmup=1)
    return {"measured_bf16_tflops": round(2 * 8192**3 / gemm_ms / 1e9, 1),
            "measured_copy_gbps": round(2 * src.numel() * 4 / copy_ms / 1e6)}


def _pytest_counts(text: str) -> dict[str, int]:
    return {w: int(n) for n, w in re.findall(r"(\d+) (passed|failed|skipped|errors?|xfailed)", text)}


def kernel_tests(ctx: Ctx) -> dict:
    """The kernel suite's CUDA cases (interpreter cases run as is on CUDA, fp32 + bf16; the real-size file)."""
    files = [str(ROOT / "tests" / "_kernels_interp_cases.py"), str(ROOT / "tests" / "_kernels_cuda_cases.py")]
    args = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE", *files]
    env = {k: v for k, v in os.environ.items() if k not in ("LLAMA_SAE_KERNELS", "LLAMA_SAE_TOPK")}
    env["PYTHONPATH"] = str(ROOT)
    if ctx.dry:
        args += ["-k", "tile_heuristic"]
        env["TRITON_INTERPRET"] = "1"
    else:
        try:
            import xdist  # noqa: F401  (parallel Triton compiles; one GPU shared)
            args += ["-n", "4"]
        except ImportError:
            pass
    r = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300 if ctx.dry else 240)
    counts = _pytest_counts(r.stdout.splitlines()[-1] if r.stdout.strip() else "")
    failed = [ln for ln in r.stdout.splitlines() if ln.startswith(("FAILED", "ERROR"))]
    res = {"returncode": r.returncode, "counts": counts, "failed": failed[:40], "tail": r.stdout[-3000:]}
    if r.returncode != 0:
        raise SectionFailed(f"kernel tests: {counts}, {len(failed)} failed", res)
    res["rows"] = [{"what": "kernel tests on " + ("CPU interpreter (subset)" if ctx.dry else "CUDA fp32+bf16"),
                    **counts}]
    return res


class SectionFailed(Exception):
    def __init__(self, msg: str, result: dict) -> None:
        super().__init__(msg)
        self.result = result


def kernels_grid(ctx: Ctx) -> dict:
    """bench/kernels.py, trimmed: correctness at B=4096 over d=2048, n in {2^16, 2^17}, k=32; timings."""
    import bench.kernels as bk
    out = ctx.tmp / "kernels.json"
    argv = ["--dry-run"] if ctx.dry else ["--d-models", "2048", "--n-latents", "65536", "131072", "--ks", "32",
                                          "--timing", "2048:131072:32", "2048:65536:32", "--reps", "10"]
    if ctx.dry:  # one correctness shape is enough to walk the code (the test suite runs bench/kernels.py's own)
        bk.DRY_RUN = {**bk.DRY_RUN, "d_models": (48,), "n_latents": (100,), "ks": (4,)}
    code = bk.main(argv + ["--out", str(out)])
    res = json.loads(out.read_text())
    res["rows"] = res.pop("rows")
    if code:
        raise SectionFailed(f"kernels.py correctness failures: {res['correctness_failures']}", res)
    return res


def _trainer(ctx: Ctx, d: int, n: int, k: int, B: int, autocast: str, dead_fraction: float):
    from sae import TensorSource, TrainConfig
    from sae.train import Trainer
    x = (torch.randn(2 * B, d) * 3 + torch.randn(d)).to(ctx.device)
    tr = Trainer(TrainConfig(out=str(ctx.tmp / "train"), n_latents=n, k=k, batch_size=B, progress=False,
                             init_rows=B, b_dec_init="mean", device=ctx.device, autocast=autocast),
                 TensorSource(x, val_fraction=0.0))
    tr.init_weights()
    dead = torch.randperm(n, generator=torch.Generator().manual_seed(1))[:int(dead_fraction * n)]
    tr.tokens_since_fired[dead.to(ctx.device)] = 10**15
    tr.dead_bound.refresh(tr.tokens_since_fired)
    return tr, list(x.split(B))


def zero_sync(ctx: Ctx) -> dict:
    """Non-logging training steps with AuxK on, under torch.cuda.set_sync_debug_mode("error") (CPU dry run:
    sae.nosync.HostSyncGuard), for our kernels and for LLAMA_SAE_KERNELS=reference (informative)."""
    from sae.nosync import HostSyncGuard
    d, n, k, B = (16, 64, 4, 16) if ctx.dry else (2048, 65536, 32, 4096)
    rows = []
    for kern in ("auto", "reference"):
        os.environ["LLAMA_SAE_KERNELS"] = kern
        try:
            tr, batches = _trainer(ctx, d, n, k, B, "auto", 0.05)
            for i in range(2):  # warm-up: compiles, optimizer state init
                tr.train_step(batches[i % 2])
            sync(ctx)
            err = None
            try:
                if ctx.cuda:
                    torch.cuda.set_sync_debug_mode("error")
                guard = HostSyncGuard() if not ctx.cuda else None
                if guard:
                    guard.__enter__()
                try:
                    for i in range(1 if ctx.dry else 3):
                        tr.train_step(batches[i % 2])
                finally:
                    if guard:
                        guard.__exit__(None, None, None)
                    if ctx.cuda:
                        torch.cuda.set_sync_debug_mode(0)
            except Exception as e:  # noqa: BLE001 - the sync is the finding
                err = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}"
            sync(ctx)
            rows.append({"kernels": "triton" if kern == "auto" else "reference", "aux_width": min(
                tr.sae.cfg.k_aux, tr.dead_bound.bound()), "syncs": "none" if err is None else err})
        finally:
            os.environ.pop("LLAMA_SAE_KERNELS", None)
    res = {"rows": rows}
    if rows[0]["syncs"] != "none":
        raise SectionFailed(f"our training step syncs: {rows[0]['syncs']}", res)
    return res


def sae_train(ctx: Ctx) -> dict:
    """Tokens/s of full training steps, ours vs LLAMA_SAE_KERNELS=reference vs sparsify (bench/sae_train.py)."""
    import bench.sae_train as st
    b = st.TrainBench(d=16, n=64, k=4, batch=16, steps=1) if ctx.dry else st.TrainBench(
        d=2048, n=65536, k=32, batch=4096, steps=12)
    b.device, b.precisions, b.dead_fractions, b.threads = ctx.device, "bf16,fp32", "0,0.05", "4"
    if ctx.dry:  # on CPU bf16 and fp32 are the same code (autocast is CUDA-only): one variant, AuxK on
        b.precisions, b.dead_fractions = "bf16", "0.05"
    b.peer_path = ctx.sparsify_path
    rows, notes = [], []
    for who in ("ours", "sparsify") if ctx.dry else ("ours", "reference", "sparsify"):  # dry: one start less
        if who == "sparsify" and not ctx.sparsify_path:
            notes.append(f"sparsify unavailable: {ctx.sparsify_why}")
            continue
        try:
            got = st.launch(b, who, "", 1 if ctx.dry else 4, timeout=300 if ctx.dry else 200)
            rows += [{"impl": who, **{k: v for k, v in r.items() if k != "times"},
                      "step_ms": [round(1e3 * t, 3) for t in r["times"]]} for r in got]
        except Exception as e:  # noqa: BLE001 - keep the other sides
            notes.append(f"{who} failed: {str(e).strip()[-600:]}")
    res = {"rows": rows, "notes": notes, "table": st.format_cuda_rows(rows, b)}
    ours = [r for r in rows if r["impl"] == "ours" and r["precision"] == "bf16"]
    peer = {(r["precision"], r["dead_fraction"]): r["tokens_per_s"] for r in rows if r["impl"] == "sparsify"}
    res["goals"] = [f"bf16, {r['n_dead']} dead: {r['tokens_per_s']:,.0f} tokens/s (goal >= 1M: "
                    f"{'met' if r['tokens_per_s'] >= 1e6 else 'MISSED'})" + (
                        f"; {r['tokens_per_s'] / peer[('bf16', r['dead_fraction'])]:.2f}x sparsify (goal >= 1.5x)"
                        if ("bf16", r["dead_fraction"]) in peer else "") for r in ours]
    if not any(r["impl"] == "ours" for r in rows):
        raise SectionFailed("our training benchmark did not run", res)
    return res


def store(ctx: Ctx) -> dict:
    """Reading an activation store on local disk to the device (rows/s, GB/s) and training steps fed from it."""
    from bench.capture import synthetic_store
    d, rows_n, B, steps = (16, 4096, 256, 1) if ctx.dry else (2048, 2**18, 4096, 12)
    st = synthetic_store(ctx.tmp / "store", d, rows_n)
    st.rows(0, len(st))  # page cache warm, as during training
    res: dict = {"rows": []}
    for dtype in (torch.bfloat16, torch.float32):
        it = st.batches(B, seed=0, dtype=dtype, device=ctx.device)
        next(it)
        sync(ctx)
        n = 3 if ctx.dry else 40
        t0 = time.perf_counter()
        for _ in range(n):
            next(it)
        sync(ctx)
        dt = time.perf_counter() - t0
        res["rows"].append({"what": f"store read -> {ctx.device} {str(dtype)[6:]}", "rows_per_s": round(n * B / dt),
                            "gb_per_s_of_bf16": round(n * B * d * 2 / dt / 1e9, 2)})
    n, B = (64, 16) if ctx.dry else (65536, B)
    tr, batches = _trainer(ctx, d, n, 4 if ctx.dry else 32, B, "auto", 0.0)
    for source, get in (("resident", lambda i: batches[i % 2]),
                        ("store", (lambda it: lambda i: next(it))(st.batches(B, seed=1, device=ctx.device)))):
        tr.train_step(get(0))
        sync(ctx)
        t0 = time.perf_counter()
        for i in range(steps):
            tr.train_step(get(i))
        sync(ctx)
        res["rows"].append({"what": f"train steps, batches {source}", "rows_per_s": round(
            steps * B / (time.perf_counter() - t0))})
    return res


def capture(ctx: Ctx) -> dict:
    """Llama-3.2-1B shapes, random bf16 weights: our forward to a middle layer (what capture runs) and our full
    forward vs HF output_hidden_states; tokens/s and model-FLOPs utilisation against the card's bf16 peak."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import llama
    if ctx.dry:
        shape = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2)
        B, T, dtype = 2, 16, torch.float32
    else:
        shape = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                     num_attention_heads=32, num_key_value_heads=8)
        B, T, dtype = 8, 1024, torch.bfloat16
    cfg = LlamaConfig(**shape, rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=131072,
                      tie_word_embeddings=True, rope_scaling={"rope_type": "llama3", "factor": 32.0,
                                                              "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                              "original_max_position_embeddings": 8192})
    torch.manual_seed(0)
    with torch.device(ctx.device):
        hf = LlamaForCausalLM(cfg).to(dtype).eval()
    folder = ctx.tmp / "llama"
    hf.save_pretrained(folder)
    ours = llama.load_model(folder, device=ctx.device, dtype=dtype)
    L = shape["num_hidden_layers"]
    layer = L // 2 - 1  # HF's last hidden_states entry is after the final norm: stay below the last layer
    point = f"blocks.{layer}.hook_resid_post"
    tokens = torch.randint(0, shape["vocab_size"], (B, T), device=ctx.device)
    d, f, v = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"]
    kv = d * shape["num_key_value_heads"] // shape["num_attention_heads"]
    per_layer = 2 * (2 * d * d + 2 * d * kv + 3 * d * f) + 2 * T * d  # weights (2 FLOPs each) + causal attention
    with torch.inference_mode():
        ref = hf(tokens, output_hidden_states=True).hidden_states[layer + 1]
        got = ours(tokens, capture=[point], stop_early=True).activations[point]
        max_diff = float((ref.float() - got.float()).abs().max())
        runs = {"ours capture (stop_early)": (lambda: ours(tokens, capture=[point], stop_early=True),
                                              (layer + 1) * per_layer),
                "ours full forward": (lambda: ours(tokens), L * per_layer + 2 * d * v),
                "HF output_hidden_states": (lambda: hf(tokens, output_hidden_states=True), L * per_layer + 2 * d * v)}
        rows = []
        for name, (fn, flops_per_token) in runs.items():
            ms = time_ms(ctx, fn, reps=5, warmup=2)
            tps = B * T / (ms / 1e3)
            rows.append({"what": name, "tokens_per_s": round(tps), "ms": round(ms, 2), "mfu": round(
                flops_per_token * tps / (ctx.peak_tflops * 1e12), 3) if ctx.peak_tflops else None})
    return {"rows": rows, "max_abs_diff_hf_vs_ours": max_diff, "batch": [B, T], "point": point,
            "peak_tflops_used": ctx.peak_tflops}


def topk(ctx: Ctx) -> dict:
    """Our Triton top-k vs torch.topk on [B, n] (decides the default dispatch of kernels.topk): TopK's k, the
    AuxK widths up to 1024, and an AuxK-shaped input (live latents masked to -inf, 100 dead)."""
    from kernels.topk import topk as triton_topk
    B, n, ks = (2, 2048, (4,)) if ctx.dry else (4096, 65536, (32, 128, 256, 1024))  # dry: the filter path too
    rows = []
    for dtype in (torch.bfloat16, torch.float32) if ctx.cuda else (torch.float32,):
        x = torch.randn(B, n, device=ctx.device).to(dtype)
        dead = torch.zeros(n, dtype=torch.bool, device=ctx.device)
        dead[torch.randperm(n, device=ctx.device)[:100]] = True
        for what, inp, k_list in (("random", x, ks), ("auxk -inf masked", x.masked_fill(~dead, float("-inf")),
                                                      ks[-1:])):
            for k in k_list:
                t_ref = time_ms(ctx, lambda: torch.topk(inp, k))
                t_tri = time_ms(ctx, lambda: triton_topk(inp, k))
                rows.append({"input": what, "dtype": str(dtype)[6:], "B": B, "n": n, "k": k,
                             "torch_ms": round(t_ref, 3), "triton_ms": round(t_tri, 3),
                             "triton_speedup": round(t_ref / t_tri, 2)})
    return {"rows": rows}


def auxk_paths(ctx: Ctx) -> dict:
    """AuxK decode fwd+bwd by width: gather kernels vs the dense [B, n] product (checks DENSE_WIDTH_DIVISOR)."""
    import kernels
    from sae.ops import DENSE_WIDTH_DIVISOR
    B, n, d, widths = (8, 256, 32, (4, 16)) if ctx.dry else (4096, 65536, 2048, (64, 256, 512, 1024))
    dtype = torch.bfloat16 if ctx.cuda else torch.float32
    W = (torch.randn(n, d, device=ctx.device) / d**0.5).to(dtype)
    g = torch.randn(B, d, device=ctx.device).to(dtype)
    rows = []
    for w in widths:
        idx = torch.rand(B, n, device=ctx.device).topk(w, dim=1).indices
        acts = torch.rand(B, w, device=ctx.device).to(dtype)

        def fwd_bwd(fn):
            a, ww = acts.detach().requires_grad_(), W.detach().requires_grad_()
            torch.autograd.grad(fn(a, idx, ww), (a, ww), g)
        t_sparse = time_ms(ctx, lambda: fwd_bwd(kernels.sparse_decode))
        t_dense = time_ms(ctx, lambda: fwd_bwd(kernels.reference.sparse_decode_dense))
        rows.append({"width": w, "n_over_width": n // w, "sparse_ms": round(t_sparse, 3),
                     "dense_ms": round(t_dense, 3), "dense_faster": t_dense < t_sparse,
                     "our_choice": "dense" if w * DENSE_WIDTH_DIVISOR["cuda"] >= n else "sparse"})
    return {"rows": rows}


def wgrad(ctx: Ctx) -> dict:
    """The W_dec-gradient kernel on uniform vs skewed indices (one latent in every row) vs the reference's
    embedding_bag segment sum: load balance shows as skewed ~ uniform."""
    import kernels
    from kernels.sparse_decode import decode_backward_w
    B, k, n, d = (16, 4, 64, 32) if ctx.dry else (4096, 32, 65536, 2048)
    dtype = torch.bfloat16 if ctx.cuda else torch.float32
    grad = torch.randn(B, d, device=ctx.device).to(dtype)
    acts = torch.rand(B, k, device=ctx.device).to(dtype)
    rows = []
    for case in ("uniform", "skewed"):
        idx = torch.randint(0, n, (B, k), device=ctx.device)
        if case == "skewed":
            idx[:, 0] = 0
        t_tri = time_ms(ctx, lambda: decode_backward_w(grad, acts, idx, n, dtype))
        t_ref = time_ms(ctx, lambda: kernels.reference.decode_weight_grad(grad, acts, idx, n))
        rows.append({"indices": case, "triton_ms": round(t_tri, 3), "embedding_bag_ms": round(t_ref, 3),
                     "speedup": round(t_ref / t_tri, 2)})
    return {"rows": rows}


def recovery(ctx: Ctx) -> dict:
    """Accuracy cost of the GPU defaults on the ground-truth benchmark (bench/sae_recovery.py): fp32, TF32, bf16."""
    import bench.sae_recovery as sr
    b = sr.RecoveryBench(d=16, n_features=32, n_latents=64, k=4, rows=2000, steps=8, batch_size=32,
                         dead_tokens=320) if ctx.dry else sr.RecoveryBench()
    variants = [("fp32", "off", False)] if ctx.dry else [
        ("fp32", "off", False), ("TF32", "off", True), ("bf16 autocast + TF32 (default)", "auto", True)]
    rows = []
    for name, autocast, tf32 in variants:
        b.device, b.autocast, b.tf32, b.progress = ctx.device, autocast, tf32, False
        out = sr.run(b)
        rows.append({"precision": name, **{k: round(v, 4) for k, v in out.items() if k != "table"}})
    if ctx.cuda:
        torch.backends.cuda.matmul.allow_tf32 = False
    return {"rows": rows}


SECTIONS: list[tuple[str, Callable[[Ctx], dict], float]] = [  # name, function, estimated seconds on an H200
    ("env", env, 10), ("zero_sync", zero_sync, 30), ("sae_train", sae_train, 130), ("kernel_tests", kernel_tests, 100),
    ("capture", capture, 50), ("kernels_grid", kernels_grid, 60), ("topk", topk, 10), ("auxk_paths", auxk_paths, 10),
    ("store", store, 30), ("wgrad", wgrad, 10), ("recovery", recovery, 60)]


def new_ctx(dry: bool) -> Ctx:
    return Ctx(dry=dry, device="cpu" if dry else "cuda", tmp=Path(tempfile.mkdtemp(prefix="gpu-bench-")))

