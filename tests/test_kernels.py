"""kernels/: the references against their definitions, call-time dispatch, import hygiene, and (in subprocesses,
so TRITON_INTERPRET=1 never leaks into other test files) the Triton kernels and the benchmark's dry run."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kernels
from kernels import reference

ROOT = Path(__file__).resolve().parents[1]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "LLAMA_SAE_KERNELS")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(**env), capture_output=True,
                          text=True, timeout=300)


def _decode_inputs(B: int = 6, k: int = 4, n: int = 24, d: int = 40, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(n // 2, generator=g)[:k] for _ in range(B)])  # shared latents
    idx[0, 1] = idx[0, 0]  # a latent repeated inside one row adds up
    return torch.rand(B, k, generator=g), idx, torch.randn(n, d, generator=g), torch.randn(B, d, generator=g)


def _grads(fn, acts, idx, W, grad):
    a, w = acts.clone().requires_grad_(), W.clone().requires_grad_()
    out = fn(a, idx, w)
    out.backward(grad)
    return out, a.grad, w.grad


def test_reference_decode_matches_its_definition():
    acts, idx, W, grad = _decode_inputs()
    got = _grads(reference.sparse_decode, acts, idx, W, grad)
    want_out = torch.stack([(acts[b, :, None] * W[idx[b]]).sum(0) for b in range(len(idx))])  # by hand
    torch.testing.assert_close(got[0], want_out)
    for g, w in zip(got, _grads(reference.sparse_decode_dense, acts, idx, W, grad)):
        torch.testing.assert_close(g, w)
    unused = torch.ones(W.shape[0], dtype=torch.bool)
    unused[idx.reshape(-1)] = False
    assert unused.any() and torch.equal(got[2][unused], torch.zeros_like(got[2][unused]))


def test_reference_decode_bf16_has_w_dtype():
    acts, idx, W, _ = _decode_inputs()
    out = reference.sparse_decode(acts, idx, W.bfloat16())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), reference.sparse_decode_dense(acts, idx, W.bfloat16().float()),
                               rtol=2e-2, atol=2e-2)


def test_cpu_dispatch_uses_reference(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("LLAMA_SAE_KERNELS", raising=False)
    acts, idx, W, grad = _decode_inputs()
    assert kernels.backend(acts, idx, W) == "reference"
    for g, w in zip(_grads(kernels.sparse_decode, acts, idx, W, grad),
                    _grads(reference.sparse_decode_dense, acts, idx, W, grad)):
        torch.testing.assert_close(g, w)
    x = torch.randn(3, 50)
    values, indices = kernels.topk(x, 5)
    torch.testing.assert_close(values, torch.sort(x, descending=True).values[:, :5])
    torch.testing.assert_close(x.gather(1, indices), values)


def test_dispatch_env_switches(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x = torch.randn(2, 8)
    monkeypatch.setenv("LLAMA_SAE_KERNELS", "triton")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        kernels.backend(x)
    monkeypatch.setenv("LLAMA_SAE_KERNELS", "fast")
    with pytest.raises(ValueError, match="LLAMA_SAE_KERNELS"):
        kernels.topk(x, 2)
    monkeypatch.setenv("LLAMA_SAE_KERNELS", "reference")
    assert kernels.backend(x) == "reference"


def test_bad_arguments_name_the_problem():
    acts, idx, W, _ = _decode_inputs()
    with pytest.raises(ValueError, match="top_indices must have top_acts' shape"):
        kernels.sparse_decode(acts, idx[:, :2], W)
    with pytest.raises(ValueError, match="top_indices must be int64"):
        kernels.sparse_decode(acts, idx.float(), W)
    with pytest.raises(ValueError, match="W_dec must be"):
        kernels.sparse_decode(acts, idx, W[0])
    with pytest.raises(ValueError, match=r"k must be in \[1, n=8\]"):
        kernels.topk(torch.randn(2, 8), 9)


def test_import_is_silent_and_works_without_triton():
    silent = _python("import kernels")
    assert silent.returncode == 0 and silent.stdout == "" and silent.stderr == "", silent.stderr
    code = ("import sys; sys.modules['triton'] = None\n"  # makes `import triton` raise ImportError
            "import torch, kernels\n"
            "x = torch.tensor([[1.0, 5.0, 3.0]])\n"
            "out = kernels.sparse_decode(torch.tensor([[2.0]]), torch.tensor([[1]]), torch.eye(3))\n"
            "print(kernels.backend(x), kernels.TRITON_ERROR is not None, kernels.topk(x, 2).indices.tolist(),"
            " out.tolist())\n")
    r = _python(code, TRITON_INTERPRET="1")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "reference True [[1, 2]] [[0.0, 2.0, 0.0]]"


def test_interpreter_set_after_import_is_refused_clearly():
    code = ("import os, torch, kernels\n"
            "os.environ['TRITON_INTERPRET'] = '1'\n"
            "print(kernels.backend(torch.zeros(2, 2)))\n"
            "os.environ['LLAMA_SAE_KERNELS'] = 'triton'\n"
            "try:\n    kernels.backend(torch.zeros(2, 2))\nexcept RuntimeError as e:\n    print(e)\n")
    r = _python(code)
    assert r.returncode == 0, r.stderr
    first, second = r.stdout.strip().splitlines()
    assert first == "reference" and "set after triton was imported" in second


def _pytest_summary(out: str) -> dict[str, int]:
    return {word: int(num) for num, word in re.findall(r"(\d+) (passed|failed|skipped|error|errors)", out)}


def test_triton_kernels_match_reference():
    """Runs tests/_kernels_interp_cases.py: on CUDA as is (fp32 + bf16), else under the Triton interpreter."""
    extra = {} if torch.cuda.is_available() else {"TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        str(ROOT / "tests" / "_kernels_interp_cases.py")],
                       cwd=ROOT, env=_env(**extra), capture_output=True, text=True, timeout=600)
    summary = _pytest_summary(r.stdout)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
    assert summary.get("passed", 0) >= 33 and not summary.get("skipped") and not summary.get("failed"), r.stdout


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only (bench/gpu.py runs it on a lent card)")
def test_triton_kernels_real_sizes_on_cuda():
    """tests/_kernels_cuda_cases.py: B=4096, d=2048, n=65536, odd k, skew, multi-stage top-k, > 2^31 elements."""
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        str(ROOT / "tests" / "_kernels_cuda_cases.py")],
                       cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=900)
    summary = _pytest_summary(r.stdout)
    assert r.returncode == 0 and summary.get("passed", 0) >= 20 and not summary.get("skipped"), r.stdout[-6000:]


def test_bench_dry_run():
    """bench/kernels.py --dry-run drives the GPU benchmark's code paths at tiny shapes under the interpreter."""
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "kernels.py"), "--dry-run"], cwd=ROOT,
                       env=_env(TRITON_INTERPRET="1"), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    for name in ("decode fwd", "decode fwd+bwd", "topk"):
        assert re.search(rf"^{re.escape(name)}\s.*\btriton\b", r.stdout, re.M), r.stdout
    assert "correctness: all ok" in r.stdout, r.stdout


def test_index_range_check_is_async_and_opt_in(monkeypatch):
    """LLAMA_SAE_CHECK_INDICES=1: an index outside [0, n) raises (on CPU at once; on CUDA a device-side assert,
    no host sync) naming the range, for sparse_decode and decode_weight_grad; valid indices pass."""
    acts, idx, W, grad = _decode_inputs()
    high, low = idx.clone(), idx.clone()
    high[1, 2], low[0, 0] = W.shape[0], -1
    monkeypatch.setenv("LLAMA_SAE_CHECK_INDICES", "1")
    torch.testing.assert_close(kernels.sparse_decode(acts, idx, W), reference.sparse_decode_dense(acts, idx, W))
    with pytest.raises(RuntimeError, match=r"sparse_decode: top_indices must lie in \[0, n_latents=24\)"):
        kernels.sparse_decode(acts, high, W)
    with pytest.raises(RuntimeError, match=r"decode_weight_grad: top_indices must lie in \[0, n_latents=24\)"):
        kernels.decode_weight_grad(grad, acts, low, W.shape[0])
