"""Triton sparse decoder: out[b] = sum_j top_acts[b, j] * W_dec[top_indices[b, j]], forward and backward.

Never builds the dense [B, n_latents] latent tensor. Every kernel loads in the storage dtype, accumulates in
fp32 and casts at the store (this is also what makes it run under TRITON_INTERPRET=1, which has no bf16
arithmetic). d is tiled by BLOCK_D with a mask rather than padded to a power of two.

- forward, grid (B, d tiles): gather the k rows of one token, chunk by chunk of BLOCK_K, and sum them.
- grad top_acts, grid (B, k chunks): <grad_out[b], W_dec[idx[b, j]]>, looping over d tiles.
- grad W_dec (`decode_backward_w`, also the encoder's weight gradient in sae/ops.py), grid (B*k / 32, d tiles):
  one memset, one sort of the indices (latent -> its (token, slot) occurrences), then a load-balanced segmented
  reduction: each program sums 32 consecutive entries of the sorted list per latent and writes the rows that
  end inside its chunk; latents crossing a chunk edge (e.g. one firing on every token) are summed from
  per-chunk partials by a fix-up pass, in chunk order. No atomics, no host sync, no dense [B, n].
Loops accumulate a 2-D tile and reduce once at the end.

Import this module only through `kernels` (TRITON_INTERPRET=1 must be set before triton is imported).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _decode_fwd_kernel(acts_ptr, idx_ptr, w_ptr, out_ptr, K, D, stride_w,
                       BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    d_offs = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = d_offs < D
    acc = tl.zeros([BLOCK_K, BLOCK_D], dtype=tl.float32)  # reduced once, after the loop
    for k0 in range(0, K, BLOCK_K):
        k_offs = k0 + tl.arange(0, BLOCK_K)
        k_mask = k_offs < K
        lat = tl.load(idx_ptr + b * K + k_offs, mask=k_mask, other=0).to(tl.int64)
        a = tl.load(acts_ptr + b * K + k_offs, mask=k_mask, other=0.0).to(tl.float32)
        rows = tl.load(w_ptr + lat[:, None] * stride_w + d_offs[None, :],
                       mask=k_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
        acc += a[:, None] * rows
    tl.store(out_ptr + b * D + d_offs, tl.sum(acc, axis=0).to(out_ptr.dtype.element_ty), mask=d_mask)


@triton.jit
def _decode_bwd_acts_kernel(grad_ptr, idx_ptr, w_ptr, gacts_ptr, K, D, stride_w,
                            BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    k_offs = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    k_mask = k_offs < K
    lat = tl.load(idx_ptr + b * K + k_offs, mask=k_mask, other=0).to(tl.int64)
    acc = tl.zeros([BLOCK_K, BLOCK_D], dtype=tl.float32)  # reduced once, after the loop
    for d0 in range(0, D, BLOCK_D):
        d_offs = d0 + tl.arange(0, BLOCK_D)
        d_mask = d_offs < D
        g = tl.load(grad_ptr + b * D + d_offs, mask=d_mask, other=0.0).to(tl.float32)
        rows = tl.load(w_ptr + lat[:, None] * stride_w + d_offs[None, :],
                       mask=k_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
        acc += rows * g[None, :]
    tl.store(gacts_ptr + b * K + k_offs, tl.sum(acc, axis=1).to(gacts_ptr.dtype.element_ty), mask=k_mask)


@triton.jit
def _decode_bwd_w_kernel(grad_ptr, acts_ptr, order_ptr, lat_ptr, part_ptr, gw_ptr, M, K, D,
                         BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program (c, t): entries [c*S, (c+1)*S) of the latent-sorted occurrence list (S = BLOCK_S), d tile t.
    Walks its entries in order, summing act * grad_out[token] per latent. A latent whose occurrences all lie in
    this chunk is written to grad_w directly; a latent that crosses the chunk's edge leaves its partial sum in
    part[c, slot] (slot 0: the chunk's first latent, which started in an earlier chunk; slot 1: its last latent,
    which goes on into the next), summed by _decode_bwd_w_fixup_kernel. Every program does S entries."""
    c = tl.program_id(0).to(tl.int64)
    d_offs = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = d_offs < D
    s0 = c * BLOCK_S
    first = tl.load(lat_ptr + s0)
    started_before = tl.load(lat_ptr + s0 - 1, mask=s0 > 0, other=-2) == first
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for i in tl.static_range(BLOCK_S):  # unrolled: the chunk's independent loads can all be in flight
        s = s0 + i
        valid = s < M
        lat = tl.load(lat_ptr + s, mask=valid, other=-1)
        pos = tl.load(order_ptr + s, mask=valid, other=0)  # flat position b * K + j
        a = tl.load(acts_ptr + pos, mask=valid, other=0.0).to(tl.float32)
        g = tl.load(grad_ptr + (pos // K) * D + d_offs, mask=d_mask & valid, other=0.0).to(tl.float32)
        acc += a * g
        seg_end = valid & (tl.load(lat_ptr + s + 1, mask=s + 1 < M, other=-2) != lat)
        chunk_end = valid & (i == BLOCK_S - 1)
        sb = started_before & (lat == first)  # only the chunk's first latent can have started before it
        tl.store(gw_ptr + lat * D + d_offs, acc.to(gw_ptr.dtype.element_ty), mask=d_mask & seg_end & ~sb)
        partial = (seg_end & sb) | (chunk_end & ~seg_end)
        slot = tl.where(sb, 0, 1)
        tl.store(part_ptr + (c * 2 + slot) * D + d_offs, acc, mask=d_mask & partial)
        acc = tl.where(seg_end | chunk_end, 0.0, acc)


@triton.jit
def _decode_bwd_w_fixup_kernel(lat_ptr, seg_end_ptr, part_ptr, gw_ptr, M, D,
                               BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program (c, t): if chunk c's last latent starts in chunk c and goes on past it, sum its partials in chunk
    order (deterministic: no atomics) and write its row."""
    c = tl.program_id(0).to(tl.int64)
    d_offs = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = d_offs < D
    s0 = c * BLOCK_S
    last = tl.minimum(s0 + BLOCK_S, M) - 1
    lat = tl.load(lat_ptr + last)
    goes_on = tl.load(lat_ptr + last + 1, mask=last + 1 < M, other=-2) == lat
    started_before = (tl.load(lat_ptr + s0) == lat) & (tl.load(lat_ptr + s0 - 1, mask=s0 > 0, other=-2) == lat)
    if goes_on & ~started_before:
        acc = tl.load(part_ptr + (c * 2 + 1) * D + d_offs, mask=d_mask, other=0.0)
        last_chunk = (tl.load(seg_end_ptr + c) - 1) // BLOCK_S
        for c2 in range(c + 1, last_chunk + 1):
            acc += tl.load(part_ptr + (c2 * 2) * D + d_offs, mask=d_mask, other=0.0)
        tl.store(gw_ptr + lat * D + d_offs, acc.to(gw_ptr.dtype.element_ty), mask=d_mask)


def pick_block_d(d: int, cap: int = 256) -> int:
    """Largest power of two <= cap that divides d (no masked lanes), else the next power of two up to cap."""
    block = cap
    while block >= 32:
        if d % block == 0:
            return block
        block //= 2
    return min(cap, triton.next_power_of_2(d))


def _blocks(d: int, k: int, block_d: int | None, block_k: int | None) -> tuple[int, int]:
    return block_d or pick_block_d(d), block_k or min(16, triton.next_power_of_2(k))


def decode_forward(top_acts: torch.Tensor, top_indices: torch.Tensor, W_dec: torch.Tensor,
                   block_d: int | None = None, block_k: int | None = None) -> torch.Tensor:
    B, K = top_acts.shape
    D = W_dec.shape[1]
    out = torch.empty(B, D, dtype=W_dec.dtype, device=W_dec.device)
    if B == 0 or D == 0:
        return out.zero_()
    BLOCK_D, BLOCK_K = _blocks(D, K, block_d, block_k)
    _decode_fwd_kernel[(B, triton.cdiv(D, BLOCK_D))](
        top_acts, top_indices, W_dec, out, K, D, W_dec.stride(0), BLOCK_K=BLOCK_K, BLOCK_D=BLOCK_D)
    return out


def decode_backward_acts(grad_out: torch.Tensor, top_indices: torch.Tensor, W_dec: torch.Tensor,
                         acts_dtype: torch.dtype, block_d: int | None = None,
                         block_k: int | None = None) -> torch.Tensor:
    B, K = top_indices.shape
    D = W_dec.shape[1]
    grad_acts = torch.zeros(B, K, dtype=acts_dtype, device=W_dec.device)
    if B == 0 or D == 0:
        return grad_acts
    BLOCK_D, BLOCK_K = _blocks(D, K, block_d, block_k)
    _decode_bwd_acts_kernel[(B, triton.cdiv(K, BLOCK_K))](
        grad_out, top_indices, W_dec, grad_acts, K, D, W_dec.stride(0), BLOCK_K=BLOCK_K, BLOCK_D=BLOCK_D)
    return grad_acts


def decode_backward_w(grad_out: torch.Tensor, top_acts: torch.Tensor, top_indices: torch.Tensor,
                      n_latents: int, w_dtype: torch.dtype, block_d: int | None = None,
                      block_s: int = 32) -> torch.Tensor:
    """[n, d]: row i = sum over (b, j) with top_indices[b, j] == i of top_acts[b, j] * grad_out[b]. One memset
    (rows never selected stay zero), one sort, then a segmented reduction over the sorted list in equal chunks of
    block_s entries (a latent firing on every token is split over many programs), plus a small fix-up pass for
    the latents that cross a chunk's edge. No host sync, no atomics (deterministic)."""
    B, K = top_indices.shape
    D = grad_out.shape[1]
    grad_w = torch.zeros(n_latents, D, dtype=w_dtype, device=grad_out.device)
    M = B * K
    if n_latents == 0 or D == 0 or M == 0:
        return grad_w
    lat, order = torch.sort(top_indices.reshape(-1).long(), stable=True)  # occurrences by latent, in token order
    n_chunks = triton.cdiv(M, block_s)
    last = torch.clamp(torch.arange(1, n_chunks + 1, device=lat.device) * block_s, max=M) - 1
    seg_end = torch.searchsorted(lat, lat[last], right=True)  # where each chunk's last latent's occurrences end
    partials = torch.empty(n_chunks, 2, D, dtype=torch.float32, device=grad_out.device)
    BLOCK_D = block_d or pick_block_d(D)
    grid = (n_chunks, triton.cdiv(D, BLOCK_D))
    _decode_bwd_w_kernel[grid](grad_out, top_acts, order, lat, partials, grad_w, M, K, D,
                               BLOCK_S=block_s, BLOCK_D=BLOCK_D)
    _decode_bwd_w_fixup_kernel[grid](lat, seg_end, partials, grad_w, M, D, BLOCK_S=block_s, BLOCK_D=BLOCK_D)
    return grad_w


class SparseDecode(torch.autograd.Function):
    """Differentiable in top_acts and W_dec (top_indices gets no gradient). Block sizes: None = heuristic."""

    @staticmethod
    def forward(ctx, top_acts: torch.Tensor, top_indices: torch.Tensor, W_dec: torch.Tensor,
                block_d: int | None = None, block_k: int | None = None) -> torch.Tensor:
        top_acts, top_indices, W_dec = top_acts.contiguous(), top_indices.contiguous(), W_dec.contiguous()
        ctx.save_for_backward(top_acts, top_indices, W_dec)
        ctx.blocks = (block_d, block_k)
        return decode_forward(top_acts, top_indices, W_dec, block_d, block_k)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        top_acts, top_indices, W_dec = ctx.saved_tensors
        block_d, block_k = ctx.blocks
        grad_out = grad_out.contiguous()
        grad_acts = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_acts = decode_backward_acts(grad_out, top_indices, W_dec, top_acts.dtype, block_d, block_k)
        if ctx.needs_input_grad[2]:
            grad_w = decode_backward_w(grad_out, top_acts, top_indices, W_dec.shape[0], W_dec.dtype, block_d)
        return grad_acts, None, grad_w, None, None


def sparse_decode(top_acts: torch.Tensor, top_indices: torch.Tensor, W_dec: torch.Tensor,
                  block_d: int | None = None, block_k: int | None = None) -> torch.Tensor:
    """Triton path of `kernels.sparse_decode` (no dispatch, no argument checks: call `kernels.sparse_decode`)."""
    return SparseDecode.apply(top_acts, top_indices, W_dec, block_d, block_k)
