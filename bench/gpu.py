"""The GPU acceptance run: one command on one CUDA device, <= 8 minutes, JSON + a printed table with the card.

    python bench/gpu.py                    # on the card; writes bench/results/gpu-<card>-<date>.json
    python bench/gpu.py --dry-run          # the same code paths at tiny shapes on CPU (Triton interpreter; CI)
    python bench/gpu.py --make-wheelhouse  # on a machine with PyPI: sparsify + the deps a bare card lacks -> .whl/

Sections (bench/gpu_sections.py), in this order, each guarded (a failure is recorded, the rest still run) and
skipped when the time left is below its estimate: env (card, driver, measured bf16 GEMM TFLOP/s and copy GB/s),
zero_sync (non-logging training steps under torch.cuda.set_sync_debug_mode("error")), sae_train (tokens/s of
full steps at d=2048, n=65536, k=32, B=4096, bf16 autocast and fp32, no dead latents and 5% dead (AuxK on): ours
vs LLAMA_SAE_KERNELS=reference vs EleutherAI sparsify), kernel_tests (the kernel suite's CUDA cases, fp32 + bf16),
capture (Llama-3.2-1B shapes, random bf16 weights: ours vs HF output_hidden_states, tokens/s and MFU against the
card's bf16 peak), kernels_grid (bench/kernels.py correctness + timing, trimmed; decode fwd+bwd vs dense at
n=2^17), topk (Triton vs torch.topk), auxk_paths (sparse vs dense AuxK decode by width), store (activation store
on local disk -> device, rows/s and GB/s, and training fed from it), wgrad (W_dec-gradient kernel, uniform vs
skewed indices), recovery (ground-truth benchmark in fp32, TF32, bf16). Rerun a part with --sections capture,...

sparsify: the card's machine has no network. The script uses, in order: an importable `sparsify`, a --target
install it made before (--sparsify-site), or installs the wheels in --wheelhouse there (pip --no-index --no-deps;
make them with --make-wheelhouse and carry `.whl`); else it says sparsify is unavailable and runs the rest.
"""
from __future__ import annotations

import datetime
import os
import re
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# sparsify 1.3.3 and what its import needs beyond the card image's packages (torch, transformers, accelerate,
# huggingface-hub, safetensors, einops, pyarrow, pandas, xxhash, fsspec are there; see the device notes)
WHEELS = ["eai-sparsify==1.3.3", "datasets==5.2.0", "dill==0.4.1", "multiprocess==0.70.19", "natsort==8.4.0",
          "schedulefree==1.4.1", "simple-parsing==0.1.9", "docstring-parser==0.18.0"]


@dataclass
class GpuBench:
    dry_run: bool = field(default=False, metadata={"help": "tiny shapes on CPU under TRITON_INTERPRET=1"})
    budget_s: float = field(default=470, metadata={"help": "wall-clock budget; sections that would overrun skip"})
    sections: str = field(default="all", metadata={"help": "comma-separated subset of the sections, or all"})
    out: str = field(default="", metadata={"help": "JSON path (default bench/results/gpu-<card>-<date>.json)"})
    wheelhouse: str = field(default=str(ROOT / ".whl"), metadata={"help": "wheels for sparsify (carried)"})
    sparsify_site: str = field(default="/tmp/llama-sae-sparsify", metadata={"help": "pip --target dir"})
    make_wheelhouse: bool = field(default=False, metadata={"help": "download WHEELS into --wheelhouse and exit"})


def _imports_sparsify(path: str) -> str | None:
    """None if `import sparsify` works with `path` on PYTHONPATH, else the error's last line."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), path) if p)}
    r = subprocess.run([sys.executable, "-c", "import sparsify, sparsify.sparse_coder"], env=env,
                       capture_output=True, text=True, timeout=120)
    return None if r.returncode == 0 else (r.stderr.strip().splitlines() or ["?"])[-1]


def find_sparsify(cfg: GpuBench) -> tuple[str, str]:
    """(PYTHONPATH entry holding sparsify or "", why it is unavailable)."""
    if _imports_sparsify("") is None:
        return str(ROOT), ""  # already importable (ROOT is on the path anyway: a non-empty entry adding nothing)
    if Path(cfg.sparsify_site).is_dir() and _imports_sparsify(cfg.sparsify_site) is None:
        return cfg.sparsify_site, ""
    wh = Path(cfg.wheelhouse)
    if not list(wh.glob("eai_sparsify-*.whl")):
        return "", (f"not importable and no wheels in {wh} (no network on the card's machine: run `python "
                    f"bench/gpu.py --make-wheelhouse` where PyPI is reachable and carry .whl)")
    names = [w.split("==")[0] for w in WHEELS]
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--target", cfg.sparsify_site, "--find-links", str(wh), *names],
                       capture_output=True, text=True, timeout=180)
    if r.returncode != 0:
        return "", f"pip install from {wh} failed: {r.stderr.strip()[-400:]}"
    why = _imports_sparsify(cfg.sparsify_site)
    return ("", f"installed but `import sparsify` fails: {why}") if why else (cfg.sparsify_site, "")


def make_wheelhouse(cfg: GpuBench) -> int:
    Path(cfg.wheelhouse).mkdir(parents=True, exist_ok=True)
    plats = [a for p in ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
             for a in ("--platform", p)]
    r = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                        "--python-version", "3.12", "--implementation", "cp", *plats, "-d", cfg.wheelhouse, *WHEELS])
    print(f"wheelhouse {cfg.wheelhouse}: {sorted(p.name for p in Path(cfg.wheelhouse).glob('*.whl'))}")
    return r.returncode


def format_rows(rows: list[dict]) -> str:
    if not rows:
        return "  (no rows)"
    keys = list(dict.fromkeys(k for r in rows for k in r if not isinstance(r[k], (list, dict))))
    fmt = (lambda v: f"{v:,.0f}" if isinstance(v, (int, float)) and not isinstance(v, bool) and abs(v) >= 1000
           else f"{v:.3g}" if isinstance(v, float) else str(v))
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(r.get(k, "")) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from llama.cli import UserError, atomic_write_json, parse_config
    cfg = parse_config(GpuBench, argv, description=__doc__)
    if cfg.make_wheelhouse:
        return make_wheelhouse(cfg)
    if cfg.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    import torch
    if not cfg.dry_run and not torch.cuda.is_available():
        raise UserError("no CUDA device: run on a GPU, or pass --dry-run (CPU interpreter smoke run)")
    from bench import gpu_sections as gs
    ctx = gs.new_ctx(cfg.dry_run)
    t_start = time.perf_counter()
    ctx.sparsify_path, ctx.sparsify_why = find_sparsify(cfg) if not cfg.dry_run else ("", "not tried in a dry run")
    wanted = None if cfg.sections == "all" else {s.strip() for s in cfg.sections.split(",")}
    unknown = (wanted or set()) - {name for name, _, _ in gs.SECTIONS}
    if unknown:
        raise UserError(f"--sections: unknown {sorted(unknown)}; choose from {[n for n, _, _ in gs.SECTIONS]}")
    report: dict = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "dry_run": cfg.dry_run,
                    "sparsify": ctx.sparsify_path or f"unavailable: {ctx.sparsify_why}", "sections": {}}
    for name, fn, estimate in gs.SECTIONS:
        if wanted is not None and name not in wanted:
            continue
        left = cfg.budget_s - (time.perf_counter() - t_start)
        if not cfg.dry_run and left < estimate:
            report["sections"][name] = {"status": f"skipped: {left:.0f} s left < estimated {estimate:.0f} s"}
            print(f"== {name}: skipped (time budget)", flush=True)
            continue
        print(f"== {name} ...", flush=True)
        t0 = time.perf_counter()
        try:
            res, status = fn(ctx), "ok"
        except gs.SectionFailed as e:
            res, status = e.result, f"failed: {e}"
        except Exception as e:  # noqa: BLE001 - one section's failure must not stop the others
            res, status = {"traceback": traceback.format_exc()[-3000:]}, f"failed: {type(e).__name__}: {e}"
        finally:
            if ctx.cuda:
                torch.cuda.empty_cache()
        res.update(status=status, seconds=round(time.perf_counter() - t0, 1))
        report["sections"][name] = res
        print(f"   {status} in {res['seconds']} s\n" + format_rows(res.get("rows", [])), flush=True)
        for line in res.get("goals", []) + res.get("notes", []):
            print("   " + str(line))
    card = report["sections"].get("env", {}).get("card") or ("cpu" if cfg.dry_run else torch.cuda.get_device_name())
    report["card"] = card
    report["total_seconds"] = round(time.perf_counter() - t_start, 1)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", card).strip("-").lower()
    results = ctx.tmp if cfg.dry_run else ROOT / "bench" / "results"  # a dry run never writes into the repo
    out = Path(cfg.out) if cfg.out else results / f"gpu-{slug}-{datetime.date.today()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, report)
    print(f"\ncard: {card}; total {report['total_seconds']} s; sparsify: {report['sparsify']}")
    for name, res in report["sections"].items():
        print(f"  {name:13s} {res['status']}")
    print(f"wrote {out}")
    return 0 if all(r["status"] == "ok" for r in report["sections"].values()) else 1


if __name__ == "__main__":
    from llama.cli import run_main
    run_main(main)
