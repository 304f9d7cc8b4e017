"""Triton kernels at real sizes on CUDA (fp32 and bf16): what the interpreter cases cannot reach.

Not collected by the normal suite: tests/test_kernels.py runs this file when CUDA is available (and reports a
skip otherwise: a skip is not a pass), and bench/gpu.py runs it on the card. Sizes are the SAE's: B=4096,
d=2048 (BLOCK_D 256, 8 d tiles), n=65536, k of 32, 33 and 100, the AuxK skew (one latent in every row),
top-k with K2 = 128/256 through several merge stages, and one decode over more than 2^31 W_dec elements. The
threshold-filter top-k at B=4096, n=65536 for k = 32 and the AuxK widths (k_aux up to 1024, -inf masked rows,
k changing per call with no new compile, constant rows).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    pytest.skip("CUDA only (the interpreter versions are tests/_kernels_interp_cases.py)", allow_module_level=True)

from kernels.sparse_decode import decode_backward_w, pick_block_d  # noqa: E402
from kernels.sparse_decode import sparse_decode as triton_decode  # noqa: E402
from kernels.topk import topk as triton_topk  # noqa: E402

DEV = "cuda"
DTYPES = [torch.float32, torch.bfloat16]


def _row_rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().float(), want.detach().float()
    norm = want.norm(dim=-1)
    keep = norm > 0
    return float(((got - want).norm(dim=-1)[keep] / norm[keep]).max())


def _inputs(B: int, k: int, n: int, d: int, dtype: torch.dtype, seed: int, skew: bool = False):
    g = torch.Generator(device=DEV).manual_seed(seed)
    idx = torch.randint(0, n, (B, k), generator=g, device=DEV)
    if skew:
        idx[:, 0] = 5  # one latent in every row (the AuxK pattern)
    acts = torch.rand(B, k, generator=g, device=DEV).to(dtype) + 0.1
    W = (torch.randn(n, d, generator=g, device=DEV) / d**0.5).to(dtype)
    grad = torch.randn(B, d, generator=g, device=DEV).to(dtype)
    return acts, idx, W, grad


def _embedding_bag_fp32(acts, idx, W, grad):
    a, w = acts.float().requires_grad_(), W.float().requires_grad_()
    out = F.embedding_bag(idx, w, per_sample_weights=a, mode="sum")
    return (out, *torch.autograd.grad(out, (a, w), grad.float()))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k,skew", [(32, False), (33, False), (100, False), (32, True)])
def test_decode_real_size(k, skew, dtype):
    B, n, d = 4096, 65536, 2048
    assert pick_block_d(d) == 256
    acts, idx, W, grad = _inputs(B, k, n, d, dtype, seed=k, skew=skew)
    a, w = acts.clone().requires_grad_(), W.clone().requires_grad_()
    out = triton_decode(a, idx, w)
    ga, gw = torch.autograd.grad(out, (a, w), grad)
    want = _embedding_bag_fp32(acts, idx, W, grad)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for name, got, ref in zip(("out", "grad acts", "grad W"), (out, ga, gw), want):
        err = _row_rel_err(got, ref)
        assert err <= tol, f"{name}: per-row relative error {err:.2e} > {tol}"
    used = torch.zeros(n, dtype=torch.bool, device=DEV)
    used[idx.reshape(-1)] = True
    assert not used.all() and torch.equal(gw[~used], torch.zeros_like(gw[~used]))


def test_decode_weight_grad_deterministic_on_cuda():
    acts, idx, _, grad = _inputs(4096, 32, 65536, 2048, torch.float32, seed=1, skew=True)
    first = decode_backward_w(grad, acts, idx, 65536, torch.float32)
    assert torch.equal(first, decode_backward_w(grad, acts, idx, 65536, torch.float32))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k", [5, 17, 32, 33, 100, 200, 1024])
def test_topk_real_size(k, dtype):
    x = torch.randn(4096, 65536, device=DEV, generator=torch.Generator(device=DEV).manual_seed(k)).to(dtype)
    values, indices = triton_topk(x, k)  # 65536 / 2048 = 32 blocks per row, then merge stages
    ref = torch.topk(x, k)
    assert torch.equal(values, ref.values)
    assert torch.equal(x.gather(1, indices), values)
    assert bool((indices.sort(dim=1).values.diff(dim=1) > 0).all())  # distinct


def _stable_topk_indices(x: torch.Tensor, k: int) -> torch.Tensor:
    """The Triton contract among ties: the lowest indices, ordered by index (a stable descending sort)."""
    return torch.sort(x, dim=-1, descending=True, stable=True).indices[:, :k]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k", [32, 1024])
def test_topk_filter_real_size_exact_ties(k, dtype):
    """B=4096, n=65536 through the filter path: the indices equal a stable sort's (bf16 rows hold many ties)."""
    from kernels.topk import filter_rows
    x = torch.randn(4096, 65536, device=DEV, generator=torch.Generator(device=DEV).manual_seed(k)).to(dtype)
    values, indices = triton_topk(x, k)
    assert torch.equal(values, torch.topk(x, k).values)
    assert torch.equal(indices, _stable_topk_indices(x, k))
    keys, counts, C = filter_rows(x, k)
    strict, ties = counts.T
    assert bool((strict <= (k - 1) * C).all() and (ties <= k).all() and (strict + ties >= k).all())


def test_topk_auxk_masked_rows_and_k_per_step_without_recompiles():
    """The AuxK call: pre with live latents masked to -inf, k_aux changing every step (513..1024: one K2
    bucket) on the real kernels' caches; a few dead latents (mostly -inf ties) and many dead ones."""
    from kernels.topk import _chunk_max_kernel, _filter_kernel, _select_kernel, _ties_kernel
    kernels_ = (_chunk_max_kernel, _filter_kernel, _ties_kernel, _select_kernel)
    dev = torch.cuda.current_device()

    def n_compiled() -> int:
        return sum(len(kn.device_caches[dev][0]) for kn in kernels_)

    g = torch.Generator(device=DEV).manual_seed(0)
    pre = torch.randn(4096, 65536, device=DEV, generator=g)
    for n_dead in (100, 40000):
        dead = torch.zeros(65536, dtype=torch.bool, device=DEV)
        dead[torch.randperm(65536, device=DEV, generator=g)[:n_dead]] = True
        x = pre.masked_fill(~dead, float("-inf"))
        triton_topk(x, 1024)  # warm: compiles the K2 = 1024 bucket
        before = n_compiled()
        for k_aux in (1024, 1000, 777, 513):
            values, indices = triton_topk(x, k_aux)
            assert torch.equal(values, torch.topk(x, k_aux).values)
            assert torch.equal(indices, _stable_topk_indices(x, k_aux))
        assert n_compiled() == before


def test_topk_constant_rows_real_size():
    """Every element ties: the most survivors the filter allows ((k-1)*C + 1 per row); lowest indices win."""
    x = torch.zeros(4096, 65536, device=DEV)
    x[::2] = -0.0
    for k in (32, 1024):
        values, indices = triton_topk(x, k)
        assert torch.equal(indices, torch.arange(k, device=DEV).expand(4096, k))
        assert torch.equal(torch.signbit(values), torch.signbit(x[:, :k]))


def test_decode_beyond_2_pow_31_elements():
    """W_dec with more than 2^31 elements (n = 2^20 + 64, d = 2048, bf16: 4.3 GB): int64 offsets everywhere."""
    n, d, B, k = 2**20 + 64, 2048, 64, 8
    assert n * d > 2**31
    W = torch.empty(n, d, device=DEV, dtype=torch.bfloat16)
    W[-128:] = torch.randn(128, d, device=DEV).to(torch.bfloat16)
    W[:64] = torch.randn(64, d, device=DEV).to(torch.bfloat16)
    idx = torch.randint(n - 128, n, (B, k), device=DEV)
    idx[:, 0] = torch.randint(0, 64, (B,), device=DEV)
    acts = torch.rand(B, k, device=DEV)
    grad = torch.randn(B, d, device=DEV).to(torch.bfloat16)
    a, w = acts.clone().requires_grad_(), W.requires_grad_()
    out = triton_decode(a, idx, w)
    ga, gw = torch.autograd.grad(out, (a, w), grad)
    rows = W.detach()[idx].float()  # [B, k, d]
    want = (acts[..., None] * rows).sum(1)
    assert _row_rel_err(out, want) <= 1e-2
    assert _row_rel_err(ga, (rows * grad.float()[:, None, :]).sum(-1)) <= 1e-2
    want_gw = torch.zeros(128, d, device=DEV).index_add_(0, (idx[:, 1:] - (n - 128)).reshape(-1),
                                                          (acts[:, 1:, None] * grad.float()[:, None, :]).reshape(-1, d))
    assert _row_rel_err(gw[-128:], want_gw) <= 1e-2
    assert not bool(gw[64:-128].any())
