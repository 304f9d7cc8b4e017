"""Triton row-wise top-k for k <= 1024: filter each row by a provable threshold, then select among survivors.

Keys. Each fp32 value (bf16/fp16 are widened exactly) is canonicalised (-0.0 -> +0.0, every NaN -> the positive
quiet NaN, so NaNs rank above +inf whatever their sign bit, as in torch.topk) and mapped to an order-preserving
int32 (non-negative bits as they are, negative bits ^ 0x7FFFFFFF: the uint32 map with its top bit flipped, so
signed compares are native). Ties go to the lower index. Where an index must travel with a key (1/C of the
elements, and the survivors) both are packed into one int64 `(key << 32) | (0xFFFFFFFF - index)`, which sorts
like (value desc, index asc); such composites are all distinct.

Passes, grid (B, cdiv(n, BLOCK_N)) unless said:
1. chunk maxima: each run of C elements gives its max key and the lowest index holding it, one composite.
2. threshold T[row] = the k-th largest chunk composite (bitonic top-K2 over n/C composites, merge stages).
   Proof it is safe: k distinct elements (the argmax of each of the top k chunks) are >= T, so every element
   below T is outside the top k; and only the top k chunks hold elements >= T.
3. filter: re-read x; "strict" survivors (key > T's key: at most (k-1)*C of them, all in the top k-1 chunks) are
   compacted with an atomic per-row counter and a block prefix sum (blocks with none skip the scan and store);
   "ties" (T's key, index <= T's) are only counted per block.
4. ties: only the first k ties by index can matter (they share one key), so the blocks holding them re-read x
   and append those after the strict ones (blocks past the k-th tie skip). Constant rows, or AuxK's rows of
   -inf with a few dead latents, keep k ties instead of up to k*C. Survivors <= (k-1)*C + k: the buffer is
   [B, K2*(C+1)] with no overflow case, whatever the input.
5. select: bitonic top-K2 over the survivors only (blocks past the row's count skip the network), then read
   the values back from x at the chosen indices (the input's own bits: -0.0 and NaN payloads survive).
A row with n <= the merge block goes straight to one top-K2 (`direct`).

Compiles: K2 = max(2, next_pow2(k)) is the only k-dependent compile-time size (bucketed: 2, 4, ..., 1024), and k
itself is a runtime argument excluded from Triton's integer specialisation; buffer sizes and strides depend on
K2, not k. So an AuxK width that changes every step compiles once per power-of-two bucket (`SPECIALISATIONS`
mirrors Triton's cache key per launch so tests can count that without a GPU).

Cost on paper (n=65536, k=32, C=32; integer/compare ops per input element, not a speed claim): the previous
design ran a full bitonic top-K2 network on int64 keys per element (~225 int64 ops, i.e. ~450 32-bit
instructions). Now: pass 1 ~10 32-bit ops (canonicalise + map ~6, max-with-index ~3), pass 2 ~225/C ~7 int64
ops, pass 3 ~12 32-bit ops (+~5 for the scan and pack in blocks holding survivors), pass 4 ~0 (random rows
have one tie: the threshold's own element), pass 5 ~225 * s/n (s ~ k survivors on random rows: ~0.1). About
30-35 ops, mostly 32-bit: ~6x fewer ops, ~10x fewer instructions, for one more read of x (torch.topk's radix
select also makes several passes). Worst case ((k-1)*C + 1 survivors, e.g. sorted rows) pass 5 costs
~225 * k*C/n. Interpreter check at n=65536: k=32 keeps 32 survivors per row, k=1024 ~1170, AuxK rows (100
dead, k=1000) 1100. `kernels.topk` keeps dispatching to torch.topk unless LLAMA_SAE_TOPK=triton until a GPU
measures this faster: bench/kernels.py and bench/gpu.py time both.

Import this module only through `kernels` (TRITON_INTERPRET=1 must be set before triton is imported).
"""
from __future__ import annotations

import inspect
from typing import Any, NamedTuple

import torch
import triton
import triton.language as tl

MAX_K = 1024
MAX_MERGE_BLOCK = 8192  # int64 keys per select program (16*K2 up to K2=512; 8*K2 at K2=1024)
_KEY_FLOOR = tl.constexpr(-(2**63))  # padding composite: below every real one
_KEY32_FLOOR = tl.constexpr(-(2**31))  # padding key: below every real one (-inf maps to -2139095041)
SPECIALISATIONS: set[tuple] = set()  # every (kernel, Triton cache key) launched so far: tests count compiles


@triton.jit
def _ordered_key(v):
    """fp32 -> order-preserving int32, canonicalised (-0.0 -> +0.0, every NaN -> +NaN above +inf)."""
    v = tl.where(v == 0.0, 0.0, v)
    bits = tl.where(v != v, 0x7FC00000, v.to(tl.int32, bitcast=True))
    return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


@triton.jit
def _pack(key, index):
    """(int32 key, index) -> int64 composite that sorts like (key desc, index asc)."""
    return (key.to(tl.int64) << 32) | (0xFFFFFFFF - index.to(tl.int64))


@triton.jit
def _chunk_max_kernel(x_ptr, n, stride_x, out_ptr, stride_out, BLOCK_N: tl.constexpr, C: tl.constexpr):
    R: tl.constexpr = BLOCK_N // C
    row = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    r = tl.arange(0, R)
    offs = blk * BLOCK_N + r[:, None] * C + tl.arange(0, C)[None, :]  # [R, C]
    mask = offs < n
    key = _ordered_key(tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32))
    key = tl.where(mask, key, _KEY32_FLOOR)
    m, pos = tl.max(key, axis=1, return_indices=True, return_indices_tie_break_left=True)  # first max of a chunk
    comp = tl.where(m == _KEY32_FLOOR, _KEY_FLOOR, _pack(m, blk * BLOCK_N + r * C + pos))
    tl.store(out_ptr + row * stride_out + blk * R + r, comp)


@triton.jit
def _threshold_split(x_ptr, n, stride_x, thr_ptr, row, offs):
    """Keys of x[row, offs] and which are above the threshold composite t (strict) or tie with it (same key,
    index <= t's): together, composite >= t."""
    mask = offs < n
    key = _ordered_key(tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32))
    t = tl.load(thr_ptr + row)  # the k-th largest chunk composite (or the floor: every element is strict)
    t_key = (t >> 32).to(tl.int32)
    t_index = 0xFFFFFFFF - (t & 0xFFFFFFFF)
    return key, mask & (key > t_key), mask & (key == t_key) & (offs <= t_index)


@triton.jit
def _filter_kernel(x_ptr, n, stride_x, thr_ptr, surv_ptr, stride_s, cnt_ptr, ties_ptr, stride_t,
                   BLOCK_N: tl.constexpr):
    """Appends the strict survivors (unordered, atomic counter cnt[row, 0]); counts the ties per block."""
    row = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    offs = blk * BLOCK_N + tl.arange(0, BLOCK_N)
    key, strict, tie = _threshold_split(x_ptr, n, stride_x, thr_ptr, row, offs)
    tl.store(ties_ptr + row * stride_t + blk, tl.sum(tie.to(tl.int32), axis=0))
    count = tl.sum(strict.to(tl.int32), axis=0)
    if count > 0:
        base = tl.atomic_add(cnt_ptr + row * 2, count)
        pos = base + tl.cumsum(strict.to(tl.int32), axis=0) - 1
        strict = strict & (pos < stride_s)  # never false (<= (k-1)*C strict): no write can leave the row
        tl.store(surv_ptr + row * stride_s + pos, _pack(key, offs), mask=strict)


@triton.jit(do_not_specialize=["k"])
def _ties_kernel(x_ptr, n, stride_x, thr_ptr, surv_ptr, stride_s, cnt_ptr, ties_ptr, stride_t, k,
                 BLOCK_N: tl.constexpr, NB: tl.constexpr):
    """Appends the first k ties by index after the strict survivors (at most k are needed: they share one key,
    so a tie with k ties before it loses to them). Blocks whose ties all come after the k-th skip the read."""
    row = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    b = tl.arange(0, NB)
    per_block = tl.load(ties_ptr + row * stride_t + b, mask=b <= blk, other=0)
    before = tl.sum(tl.where(b < blk, per_block, 0), axis=0)
    mine = tl.sum(tl.where(b == blk, per_block, 0), axis=0)
    if (mine > 0) & (before < k):
        offs = blk * BLOCK_N + tl.arange(0, BLOCK_N)
        key, strict, tie = _threshold_split(x_ptr, n, stride_x, thr_ptr, row, offs)
        rank = before + tl.cumsum(tie.to(tl.int32), axis=0) - 1  # among the row's ties, in index order
        pos = tl.load(cnt_ptr + row * 2) + rank
        keep = tie & (rank < k) & (pos < stride_s)
        tl.store(surv_ptr + row * stride_s + pos, _pack(key, offs), mask=keep)
        tl.atomic_add(cnt_ptr + row * 2 + 1, tl.sum(keep.to(tl.int32), axis=0))


@triton.jit(do_not_specialize=["k"])
def _select_kernel(src_ptr, n_src, stride_src, cnt_ptr, dst_ptr, stride_dst, x_ptr, stride_x, vals_ptr, idx_ptr, k,
                   BLOCK: tl.constexpr, K2: tl.constexpr, FROM_X: tl.constexpr, HAS_CNT: tl.constexpr,
                   OUT: tl.constexpr):
    """Top-K2 of one block of a row. src: packed composites (or x itself if FROM_X), the first `cnt[row]` valid
    if HAS_CNT. OUT 0: the K2 best composites to dst[row, blk*K2:]; 1: values/indices [B, k]; 2: the k-th best
    composite to dst[row] (the threshold)."""
    row = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    n_valid = n_src
    if HAS_CNT:  # strict survivors + ties kept
        n_valid = tl.minimum(tl.load(cnt_ptr + row * 2) + tl.load(cnt_ptr + row * 2 + 1), n_src)
    mask = offs < n_valid
    if blk * BLOCK < n_valid:
        if FROM_X:
            key = _ordered_key(tl.load(src_ptr + row * stride_src + offs, mask=mask, other=0.0).to(tl.float32))
            keys = tl.where(mask, _pack(key, offs), _KEY_FLOOR)
        else:
            keys = tl.load(src_ptr + row * stride_src + offs, mask=mask, other=_KEY_FLOOR)
        top = tl.topk(keys, K2)  # [K2], largest first
    else:  # past the survivors: nothing to sort
        top = tl.full([K2], _KEY_FLOOR, tl.int64)
    j = tl.arange(0, K2)
    if OUT == 0:
        tl.store(dst_ptr + row * stride_dst + blk * K2 + j, top)
    elif OUT == 1:
        index = 0xFFFFFFFF - (top & 0xFFFFFFFF)
        val = tl.load(x_ptr + row * stride_x + index, mask=j < k, other=0.0)
        tl.store(vals_ptr + row * k + j, val.to(vals_ptr.dtype.element_ty), mask=j < k)
        tl.store(idx_ptr + row * k + j, index, mask=j < k)
    else:
        tl.store(dst_ptr + row * stride_dst + (j - (k - 1)), top, mask=j == k - 1)  # offset 0 where stored


def _spec_key(kernel: Any, args: tuple, constexprs: dict, num_warps: int) -> tuple:
    """What Triton's cache key holds for this launch: constexprs, num_warps, dtypes, and for each int argument
    not in do_not_specialize whether it is 1 or divisible by 16."""
    fn = getattr(kernel, "fn", kernel)
    names = list(inspect.signature(fn).parameters)
    dns = getattr(kernel, "do_not_specialize", None) or getattr(kernel, "kwargs", {}).get("do_not_specialize") or ()
    skip = {names[d] if isinstance(d, int) else d for d in dns}
    parts = []
    for name, a in zip(names, args):
        if isinstance(a, torch.Tensor):
            parts.append((name, str(a.dtype), a.data_ptr() % 16 == 0))
        elif isinstance(a, int) and name not in skip:
            parts.append((name, a == 1, a % 16 == 0))
    return (fn.__name__, tuple(sorted(constexprs.items())), num_warps, tuple(parts))


def _launch(kernel: Any, grid: tuple[int, int], *args: Any, **constexprs: Any) -> None:
    size = constexprs.get("BLOCK", constexprs.get("BLOCK_N", 1024))
    num_warps = 4 if size <= 2048 else 8 if size <= 4096 else 16
    SPECIALISATIONS.add(_spec_key(kernel, args, constexprs, num_warps))
    kernel[grid](*args, **constexprs, num_warps=num_warps)


def _select(src: torch.Tensor, counts: torch.Tensor | None, x: torch.Tensor, values: torch.Tensor,
            indices: torch.Tensor, k: int, K2: int, block: int, out: int, from_x: bool = False) -> None:
    """Top-K2 per row of src [B, m] by merge stages of `block` keys (each keeps K2), then the final block."""
    B = src.shape[0]
    n_cur = src.shape[1]
    dst = values  # out 2: `values` is the int64 [B, 1] threshold
    while True:
        n_blocks = triton.cdiv(n_cur, block)
        cnt = counts if counts is not None else src
        if n_blocks == 1:
            size = max(triton.next_power_of_2(n_cur), K2)
            stride_dst = 0 if out == 1 else dst.stride(0)  # [B, k] outputs use k itself (a [B, k] stride would
            # let Triton specialise on k % 16 and recompile as k changes)
            _launch(_select_kernel, (B, 1), src, n_cur, src.stride(0), cnt, dst, stride_dst, x, x.stride(0),
                    values, indices, k, BLOCK=size, K2=K2, FROM_X=from_x, HAS_CNT=counts is not None, OUT=out)
            return
        nxt = torch.empty(B, n_blocks * K2, dtype=torch.int64, device=src.device)
        _launch(_select_kernel, (B, n_blocks), src, n_cur, src.stride(0), cnt, nxt, nxt.stride(0), x,
                x.stride(0), values, indices, k, BLOCK=block, K2=K2, FROM_X=from_x, HAS_CNT=counts is not None,
                OUT=0)
        src, n_cur, counts, from_x = nxt, n_blocks * K2, None, False


class Survivors(NamedTuple):
    keys: torch.Tensor    # [B, min(n, K2*(C+1))] int64 composites; the first counts[b].sum() are valid
    counts: torch.Tensor  # [B, 2] int32: strict survivors (<= (k-1)*C), ties kept (<= k); k <= their sum
    chunk: int            # C


def _sizes(n: int, k: int, block_n: int | None, chunk: int | None, merge_block: int | None):
    K2 = max(2, triton.next_power_of_2(k))  # tl.topk collapses a 1-wide result to a scalar
    block = max(merge_block or min(MAX_MERGE_BLOCK, max(1024, 16 * K2)), 2 * K2)
    C = chunk or min(32, max(2, triton.next_power_of_2(n // (4 * K2) + 1) // 2))  # largest pow2 <= n/(4*K2)
    return K2, block, C, max(block_n or 4096, C)


def filter_rows(x: torch.Tensor, k: int, block_n: int | None = None, chunk: int | None = None,
                merge_block: int | None = None) -> Survivors:
    """Passes 1-3 (module docstring): the elements of each row of x [B, n] that can be in its top k."""
    B, n = x.shape
    K2, block, C, BLOCK_N = _sizes(n, k, block_n, chunk, merge_block)
    n_blocks = triton.cdiv(n, BLOCK_N)
    maxima = torch.empty(B, n_blocks * (BLOCK_N // C), dtype=torch.int64, device=x.device)
    _launch(_chunk_max_kernel, (B, n_blocks), x, n, x.stride(0), maxima, maxima.stride(0), BLOCK_N=BLOCK_N, C=C)
    threshold = torch.empty(B, 1, dtype=torch.int64, device=x.device)
    _select(maxima, None, x, threshold, threshold, k, K2, block, out=2)
    survivors = torch.empty(B, min(n, K2 * C + K2), dtype=torch.int64, device=x.device)  # never overflows
    counts = torch.zeros(B, 2, dtype=torch.int32, device=x.device)  # strict survivors, ties kept
    ties = torch.empty(B, n_blocks, dtype=torch.int32, device=x.device)  # ties per block
    args = (x, n, x.stride(0), threshold, survivors, survivors.stride(0), counts, ties, ties.stride(0))
    _launch(_filter_kernel, (B, n_blocks), *args, BLOCK_N=BLOCK_N)
    _launch(_ties_kernel, (B, n_blocks), *args, k, BLOCK_N=BLOCK_N, NB=triton.next_power_of_2(n_blocks))
    return Survivors(survivors, counts, C)


def topk_forward(x: torch.Tensor, k: int, block_n: int | None = None, chunk: int | None = None,
                 merge_block: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Values [B, k] (x's dtype, largest first) and int64 indices [B, k]. Tuning (powers of two, tests use small
    ones): block_n elements of x per filter program (default 4096), chunk C (default: n/(4*K2) clamped to
    [2, 32]), merge_block keys per select program (default min(8192, max(1024, 16*K2)), at least 2*K2)."""
    if k > MAX_K:
        raise ValueError(f"topk: the Triton kernel supports k <= {MAX_K}, got {k}")
    x = x.contiguous()
    B, n = x.shape
    K2, block, _, _ = _sizes(n, k, block_n, chunk, merge_block)
    values = torch.empty(B, k, dtype=x.dtype, device=x.device)
    indices = torch.empty(B, k, dtype=torch.int64, device=x.device)
    if B == 0:
        return values, indices
    if n <= block:  # one block holds the row: no filter
        _select(x, None, x, values, indices, k, K2, block, out=1, from_x=True)
    else:
        keys, counts, _ = filter_rows(x, k, block_n, chunk, merge_block)
        _select(keys, counts, x, values, indices, k, K2, block, out=1)
    return values, indices


class TopKFunction(torch.autograd.Function):
    """Values are differentiable in x like torch.topk: the gradient is scattered back to the kept positions."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, k: int, block_n: int | None = None, chunk: int | None = None,
                merge_block: int | None = None):
        values, indices = topk_forward(x, k, block_n, chunk, merge_block)
        ctx.mark_non_differentiable(indices)
        ctx.save_for_backward(indices)
        ctx.x_shape = x.shape
        return values, indices

    @staticmethod
    def backward(ctx, grad_values: torch.Tensor, grad_indices: Any):
        (indices,) = ctx.saved_tensors
        grad_x = grad_values.new_zeros(ctx.x_shape).scatter_(1, indices, grad_values)
        return grad_x, None, None, None, None


def topk(x: torch.Tensor, k: int, block_n: int | None = None, chunk: int | None = None,
         merge_block: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton path of `kernels.topk` (no dispatch, no argument checks: call `kernels.topk`); the extra
    arguments only tune (see topk_forward)."""
    return TopKFunction.apply(x, k, block_n, chunk, merge_block)
