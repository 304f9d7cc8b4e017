"""Triton kernels vs their references: forward and every gradient.

Not collected by the normal suite (the name does not start with test_): tests/test_kernels.py runs this file in
a subprocess with TRITON_INTERPRET=1 set before anything imports triton (CPU, fp32), or as is on CUDA (fp32 and
bf16). Shapes stay tiny: the interpreter runs Triton programs one after another in Python.
"""
from __future__ import annotations

import pytest
import torch

import kernels
from kernels import reference
from kernels.sparse_decode import pick_block_d
from kernels.sparse_decode import sparse_decode as triton_decode
from kernels.topk import topk as triton_topk

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and not kernels.interpreter_ready():
    raise RuntimeError("run with TRITON_INTERPRET=1 set before triton is imported (see tests/test_kernels.py)")
DTYPES = [torch.float32] + ([torch.bfloat16] if DEVICE == "cuda" else [])


def _tol(dtype: torch.dtype) -> dict[str, float]:
    return dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=3e-2)


def _decode_inputs(B: int, k: int, n: int, d: int, dtype: torch.dtype, seed: int):
    """Rows draw k distinct latents from a pool of about n/2, so rows share latents and others are never used."""
    g = torch.Generator().manual_seed(seed)
    pool = torch.randperm(n, generator=g)[: max(k, n // 2)]
    idx = torch.stack([pool[torch.randperm(len(pool), generator=g)[:k]] for _ in range(B)])
    acts = torch.rand(B, k, generator=g) + 0.1
    W = torch.randn(n, d, generator=g) / d**0.5
    grad = torch.randn(B, d, generator=g)
    to = dict(device=DEVICE, dtype=dtype)
    return acts.to(**to), idx.to(DEVICE), W.to(**to), grad.to(**to)


def _run(fn, acts, idx, W, grad, need_acts=True, need_w=True):
    a = acts.detach().clone().requires_grad_(need_acts)
    w = W.detach().clone().requires_grad_(need_w)
    out = fn(a, idx, w)
    out.backward(grad)
    return out, a.grad, w.grad


def _dense_fp32(a, i, w):
    return reference.sparse_decode_dense(a.float(), i, w.float())


# (B, k, n, d, block_d): d power of two and not, several d tiles, k in {1, 4, 32}, B = 1
DECODE_CASES = [
    (1, 1, 10, 48, None),
    (1, 4, 12, 64, None),
    (6, 4, 20, 48, 32),     # two d tiles, the second half masked
    (5, 4, 20, 64, None),
    (4, 32, 50, 64, 32),    # two d tiles, two k chunks
    (3, 32, 40, 96, None),  # heuristic tiles d=96 as 3 x 32 (no padding to 128)
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,k,n,d,block_d", DECODE_CASES)
def test_sparse_decode_matches_dense_reference(B, k, n, d, block_d, dtype):
    acts, idx, W, grad = _decode_inputs(B, k, n, d, dtype, seed=B * 100 + k + d)
    out, ga, gw = _run(lambda a, i, w: triton_decode(a, i, w, block_d=block_d), acts, idx, W, grad)
    ref_out, ref_ga, ref_gw = _run(_dense_fp32, acts, idx, W, grad.float())
    assert out.dtype == dtype and ga.dtype == dtype and gw.dtype == dtype
    tol = _tol(dtype)
    torch.testing.assert_close(out.float(), ref_out, **tol)
    torch.testing.assert_close(ga.float(), ref_ga, **tol)
    torch.testing.assert_close(gw.float(), ref_gw, **tol)
    used = torch.zeros(n, dtype=torch.bool, device=DEVICE)
    used[idx.reshape(-1)] = True
    if B > 1:  # the premise of the case: shared latents (accumulation) and latents never selected
        assert torch.bincount(idx.reshape(-1), minlength=n).max() > 1 and not used.all()
    assert torch.equal(gw[~used], torch.zeros_like(gw[~used]))


def test_sparse_decode_tile_heuristic_does_not_pad():
    assert [pick_block_d(d) for d in (2048, 3072, 4096, 96, 48)] == [256, 256, 256, 32, 64]


@pytest.mark.parametrize("need_acts,need_w", [(True, False), (False, True)])
def test_sparse_decode_single_gradient(need_acts, need_w):
    acts, idx, W, grad = _decode_inputs(3, 4, 16, 48, torch.float32, seed=7)
    out, ga, gw = _run(triton_decode, acts, idx, W, grad, need_acts, need_w)
    ref_out, ref_ga, ref_gw = _run(_dense_fp32, acts, idx, W, grad, need_acts, need_w)
    torch.testing.assert_close(out, ref_out, **_tol(torch.float32))
    assert (ga is None) == (not need_acts) and (gw is None) == (not need_w)
    torch.testing.assert_close(ga if need_acts else gw, ref_ga if need_acts else ref_gw, **_tol(torch.float32))


def test_sparse_decode_repeated_index_in_a_row_adds_up():
    acts, _, W, grad = _decode_inputs(2, 4, 8, 48, torch.float32, seed=3)
    idx = torch.tensor([[5, 5, 1, 5], [1, 0, 0, 7]], device=DEVICE)
    got = _run(triton_decode, acts, idx, W, grad)
    want = _run(_dense_fp32, acts, idx, W, grad)
    for g_, w_ in zip(got, want):
        torch.testing.assert_close(g_, w_, **_tol(torch.float32))


def _check_topk(x: torch.Tensor, k: int, values: torch.Tensor, indices: torch.Tensor) -> None:
    """Tie-robust: the values equal torch.topk's exactly, and the indices are distinct and point at them."""
    ref_values = torch.topk(x, k, dim=-1).values
    assert values.dtype == x.dtype and indices.dtype == torch.int64 and values.shape == (x.shape[0], k)
    torch.testing.assert_close(values, ref_values, rtol=0, atol=0)
    torch.testing.assert_close(x.gather(1, indices), values, rtol=0, atol=0)
    assert all(len(set(row.tolist())) == k for row in indices)


# (B, n, k, block_n): B = 1, k in {1, 4, 32, 64}, n not a multiple of the block, one and several merge rounds
TOPK_CASES = [
    (1, 7, 1, None),
    (3, 100, 4, 32),
    (2, 200, 32, 64),
    (1, 200, 4, 8),    # 25 blocks -> 100 candidates -> 52 -> 28 -> 16 -> 8: several merge rounds
    (2, 70, 64, None),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,n,k,block_n", TOPK_CASES)
def test_topk_matches_torch_topk(B, n, k, block_n, dtype):
    x = torch.randn(B, n, generator=torch.Generator().manual_seed(n + k)).to(DEVICE, dtype)
    values, indices = triton_topk(x, k, block_n)
    _check_topk(x, k, values, indices)


def test_topk_ties_keep_lowest_indices():
    x = torch.randint(1, 4, (2, 50), generator=torch.Generator().manual_seed(0)).float().to(DEVICE)
    values, indices = triton_topk(x, 5, 16)
    _check_topk(x, 5, values, indices)
    stable = torch.sort(x, dim=-1, descending=True, stable=True)  # among equals: lower index first
    assert torch.equal(indices, stable.indices[:, :5])


def test_topk_special_values():
    inf = float("inf")
    x = torch.tensor([[-inf, 3.0, -inf, inf, -1.0, 3.0, -0.5, -inf, 1e30, -1e-30]], device=DEVICE)
    values, indices = triton_topk(x, 6, 4)
    _check_topk(x, 6, values, indices)
    assert indices[0].tolist() == [3, 8, 1, 5, 9, 6]


def test_topk_gradient_matches_torch():
    x = torch.randn(3, 40, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    g = torch.randn(3, 4, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    (triton_topk(x1, 4, 16)[0] * g).sum().backward()
    (torch.topk(x2, 4).values * g).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=0, atol=0)


def test_public_functions_dispatch_to_triton(monkeypatch):
    monkeypatch.delenv("LLAMA_SAE_KERNELS", raising=False)
    acts, idx, W, grad = _decode_inputs(2, 4, 10, 48, torch.float32, seed=5)
    assert kernels.backend(acts, idx, W) == "triton"
    assert kernels.backend(acts.double(), idx, W.double()) == "reference"
    torch.testing.assert_close(kernels.sparse_decode(acts, idx, W), _dense_fp32(acts, idx, W))
    x = torch.randn(2, 30, device=DEVICE)
    result = kernels.topk(x, 4)
    assert isinstance(result, kernels.TopK)
    _check_topk(x, 4, *result)
    monkeypatch.setenv("LLAMA_SAE_KERNELS", "reference")
    assert kernels.backend(acts, idx, W) == "reference"
    torch.testing.assert_close(kernels.sparse_decode(acts, idx, W), _dense_fp32(acts, idx, W))


# ---- shapes a wrong kernel would get wrong (issue 15 item 13): production BLOCK_D, k not a power of two, skew -----
def _row_rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest per-row relative error ||got_r - want_r|| / ||want_r|| over rows with a non-zero reference."""
    got, want = got.detach().float(), want.detach().float()
    norm = want.norm(dim=-1)
    keep = norm > 0
    return float(((got - want).norm(dim=-1)[keep] / norm[keep]).max()) if keep.any() else 0.0


def _check_decode(acts, idx, W, grad, n, **kw) -> None:
    dtype = W.dtype
    out, ga, gw = _run(lambda a, i, w: triton_decode(a, i, w, **kw), acts, idx, W, grad)
    ref_out, ref_ga, ref_gw = _run(_dense_fp32, acts, idx, W, grad.float())
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for name, g_, w_ in (("out", out, ref_out), ("grad acts", ga, ref_ga), ("grad W", gw, ref_gw)):
        assert _row_rel_err(g_, w_) <= tol, (name, _row_rel_err(g_, w_))
    used = torch.zeros(n, dtype=torch.bool, device=DEVICE)
    used[idx.reshape(-1)] = True
    assert not used.all() and torch.equal(gw[~used], torch.zeros_like(gw[~used]))  # exactly zero, not ~0


# (B, k, n, d): the production tile (BLOCK_D = 256 for d % 256 == 0), k of 5, 17, 33, 100
REAL_TILE_CASES = [(3, 5, 40, 256), (2, 17, 60, 512), (2, 33, 80, 256), (2, 100, 240, 256)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,k,n,d", REAL_TILE_CASES)
def test_sparse_decode_production_tile_and_odd_k(B, k, n, d, dtype):
    assert pick_block_d(d) == 256
    _check_decode(*_decode_inputs(B, k, n, d, dtype, seed=k + d), n)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ["one latent in every row", "one latent everywhere", "chunk edges"])
def test_sparse_decode_skewed_indices(case, dtype):
    """The AuxK pattern: one latent in every row, so its occurrences span many chunks of the W_dec-gradient
    kernel's sorted list (and the fix-up pass sums them); and a list that is a single latent throughout."""
    B, k, n, d = 40, 5, 30, 64
    acts, idx, W, grad = _decode_inputs(B, k, n, d, dtype, seed=11)
    if case == "one latent in every row":
        idx[:, 2] = 7  # (a row that drew 7 already now holds it twice: repeats add up)
    elif case == "one latent everywhere":
        idx[:] = 3
    else:  # segments ending exactly on a chunk edge: 8 occurrences each with chunks of 8 (block_s below)
        idx = torch.arange(B * k, device=DEVICE).reshape(B, k) // 8 % n
    for block_s in (32, 8):
        out, ga, gw = _run(triton_decode, acts, idx, W, grad)
        from kernels.sparse_decode import decode_backward_w
        gw2 = decode_backward_w(grad, acts, idx, n, dtype, block_s=block_s)
        ref_gw = _run(_dense_fp32, acts, idx, W, grad.float())[2]
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        assert _row_rel_err(gw, ref_gw) <= tol and _row_rel_err(gw2, ref_gw) <= tol, case
        unused = torch.ones(n, dtype=torch.bool, device=DEVICE)
        unused[idx.reshape(-1)] = False
        assert torch.equal(gw2[unused], torch.zeros_like(gw2[unused]))
    _check_decode(acts, idx, W, grad, n)


def test_decode_weight_grad_is_deterministic():
    acts, idx, W, grad = _decode_inputs(24, 4, 20, 32, torch.float32, seed=4)
    idx[:, 0] = 1
    from kernels.sparse_decode import decode_backward_w
    first = decode_backward_w(grad, acts, idx, 20, torch.float32)
    assert all(torch.equal(first, decode_backward_w(grad, acts, idx, 20, torch.float32)) for _ in range(3))


# (B, n, k, block_n): K2 = 8, 32, 64, 128, 256 (k = 5, 17, 33, 100, 200), one and several stages
TOPK_REAL_CASES = [(2, 300, 5, None), (1, 600, 17, 128), (1, 1000, 33, None), (1, 700, 100, 256),
                   (1, 700, 200, 512)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,n,k,block_n", TOPK_REAL_CASES)
def test_topk_odd_k_and_multi_stage(B, n, k, block_n, dtype):
    x = torch.randn(B, n, generator=torch.Generator().manual_seed(n + k)).to(DEVICE, dtype)
    _check_topk(x, k, *triton_topk(x, k, block_n))


def test_topk_nan_and_signed_zero_rank_like_torch():
    """-0.0 ties with +0.0 (lower index first); every NaN, sign bit set or not, ranks above +inf, as in
    torch.topk; the values returned are the input's own bits."""
    neg_nan = torch.tensor([0xFFC00001], dtype=torch.int64).to(torch.int32).view(torch.float32).item()
    x = torch.tensor([[-0.0, 1.0, 0.0, neg_nan, float("inf"), -1.0, float("nan"), -0.0, 0.0, float("-inf")]],
                     device=DEVICE)
    values, indices = triton_topk(x, 7, 4)
    assert indices[0].tolist() == [3, 6, 4, 1, 0, 2, 7]
    ref = torch.topk(x, 7)
    torch.testing.assert_close(values, ref.values, equal_nan=True, rtol=0, atol=0)
    assert torch.equal(torch.signbit(values), torch.signbit(x.gather(1, indices)))  # -0.0 and NaN signs kept


# ---- the threshold-filter top-k (issue 15 item 10): survivors, ties, NaN/-0.0, k changing per call ---------------
from kernels.topk import SPECIALISATIONS, _select_kernel, filter_rows  # noqa: E402


def _check_topk_contract(x: torch.Tensor, k: int, values: torch.Tensor, indices: torch.Tensor) -> None:
    """The exact contract: torch.topk's values, and the lowest indices among ties ordered by index, i.e. a stable
    descending sort (which, like torch.topk, ties -0.0 with +0.0 and puts every NaN above +inf)."""
    want = torch.sort(x, dim=-1, descending=True, stable=True)
    torch.testing.assert_close(values, torch.topk(x, k).values, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(indices, want.indices[:, :k])
    assert torch.equal(values.view(torch.int32), x.gather(1, indices).view(torch.int32))  # the input's own bits


# (B, n, k, block_n, chunk, merge_block): every case takes the filter path (n > merge_block); k of 5, 17, 33, 100
# (K2 = 8, 32, 64, 128), k larger than a filter block (block_n 16), several merge stages for the threshold
FILTER_CASES = [
    (2, 1000, 5, 64, None, 16),
    (2, 600, 17, 32, 4, 64),
    (1, 700, 33, 16, 4, 128),    # k > block_n: a block holds fewer elements than k
    (1, 900, 100, 64, 2, 256),
    (1, 5000, 5, None, None, None),  # the default sizes (BLOCK_N 4096, C 32, merge block 1024)
]


@pytest.mark.parametrize("B,n,k,block_n,chunk,merge_block", FILTER_CASES)
def test_topk_filter_path_matches_stable_sort(B, n, k, block_n, chunk, merge_block):
    x = torch.randn(B, n, generator=torch.Generator().manual_seed(n + k)).to(DEVICE)
    _check_topk_contract(x, k, *triton_topk(x, k, block_n, chunk, merge_block))
    keys, counts, C = filter_rows(x, k, block_n, chunk, merge_block)
    strict, ties = counts.T
    assert bool((strict <= (k - 1) * C).all() and (ties <= k).all() and (strict + ties >= k).all()), counts
    assert int((strict + ties).max()) <= 2 * k + 4, counts  # random rows: few survive the threshold


def _special_rows(n: int, k: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    neg_nan = torch.tensor([0xFFC00001], dtype=torch.int64).to(torch.int32).view(torch.float32).item()
    zeros = torch.zeros(n)
    zeros[torch.rand(n, generator=g) < 0.5] = -0.0
    aux = torch.full((n,), float("-inf"))  # AuxK: live latents masked to -inf, three dead ones left
    aux[torch.randperm(n, generator=g)[:3]] = torch.randn(3, generator=g)
    nan = torch.randn(n, generator=g)
    nan[torch.randperm(n, generator=g)[:4]] = torch.tensor([float("nan"), neg_nan, float("nan"), neg_nan])
    nan[7] = float("inf")
    few = torch.randint(0, 3, (n,), generator=g).float()  # three values, heavy ties
    return {"random": torch.randn(n, generator=g), "constant": torch.full((n,), 2.5), "signed zeros": zeros,
            "auxk -inf": aux, "nan and inf": nan, "sorted ascending": torch.arange(n).float(), "three values": few}


@pytest.mark.parametrize("k", [5, 17, 33])
def test_topk_filter_special_rows(k):
    """Rows where many elements survive (constant, all-equal, -inf with few finite, sorted) and few (random)."""
    n, C = 640, 4
    rows = _special_rows(n, k, torch.Generator().manual_seed(k))
    x = torch.stack(list(rows.values())).to(DEVICE)
    _check_topk_contract(x, k, *triton_topk(x, k, 32, C, 64))
    counts = {name: tuple(c) for name, c in zip(rows, filter_rows(x, k, 32, C, 64).counts.tolist())}
    assert all(s <= (k - 1) * C and t <= k and s + t >= k for s, t in counts.values()), counts
    assert counts["sorted ascending"] == ((k - 1) * C, 1), counts  # the most survivors the bound allows
    assert counts["constant"] == counts["signed zeros"] == (0, k), counts  # all ties: only the first k kept
    assert counts["auxk -inf"] == (3, k) and sum(counts["random"]) < 2 * k, counts


def test_topk_k_changes_without_a_new_compile():
    """AuxK's width changes every step: k is a runtime argument (not specialised), K2 = next_pow2(k) the only
    compile-time size, so k = 18..32 reuse k = 17's kernels; k = 33 (K2 64) is a new bucket."""
    assert "k" in (getattr(_select_kernel, "do_not_specialize", None)
                   or getattr(_select_kernel, "kwargs", {}).get("do_not_specialize"))
    x = torch.randn(2, 700, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    args = (32, 4, 64)  # filter path at this size
    SPECIALISATIONS.clear()  # a record of launches (Triton's own cache is untouched): start it from this test
    _check_topk_contract(x, 17, *triton_topk(x, 17, *args))
    before = len(SPECIALISATIONS)
    for k in (18, 24, 31, 32, 20):
        _check_topk_contract(x, k, *triton_topk(x, k, *args))
    assert len(SPECIALISATIONS) == before > 0
    _check_topk_contract(x, 33, *triton_topk(x, 33, *args))
    assert len(SPECIALISATIONS) > before  # the counter does see a real change


def test_topk_dispatch_is_decided_at_call_time(monkeypatch):
    module = kernels._triton_topk  # (the attribute kernels.topk is the public function)
    calls = []
    real = module.topk
    monkeypatch.setattr(module, "topk", lambda x, k: calls.append(k) or real(x, k))
    monkeypatch.delenv("LLAMA_SAE_KERNELS", raising=False)
    x = torch.randn(2, 1500, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    monkeypatch.delenv("LLAMA_SAE_TOPK", raising=False)
    kernels.topk(x, 300)  # the default: torch.topk
    monkeypatch.setenv("LLAMA_SAE_TOPK", "triton")
    _check_topk_contract(x, 300, *kernels.topk(x, 300))  # k > 256 now has a Triton path (AuxK widths)
    monkeypatch.setenv("LLAMA_SAE_KERNELS", "reference")
    kernels.topk(x, 4)
    assert calls == [300]


def test_index_range_check_stops_the_triton_path(monkeypatch):
    acts, idx, W, grad = _decode_inputs(2, 4, 10, 48, torch.float32, seed=6)
    idx[1, 3] = 10  # one past the last latent: the kernel would read outside W_dec
    monkeypatch.setenv("LLAMA_SAE_CHECK_INDICES", "1")
    assert kernels.backend(acts, idx, W) == "triton"
    with pytest.raises(RuntimeError, match=r"must lie in \[0, n_latents=10\)"):
        kernels.sparse_decode(acts, idx, W)
