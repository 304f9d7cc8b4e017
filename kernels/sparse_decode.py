"""Triton sparse decoder: out[b] = sum_j top_acts[b, j] * W_dec[top_indices[b, j]], forward and backward.

Never builds the dense [B, n_latents] latent tensor. Every kernel loads in the storage dtype, accumulates in
fp32 and casts at the store (this is also what makes it run under TRITON_INTERPRET=1, which has no bf16
arithmetic). d is tiled by BLOCK_D with a mask rather than padded to a power of two.

- forward, grid (B, d tiles): gather the k rows of one token, chunk by chunk of BLOCK_K, and sum them.
- grad top_acts, grid (B, k chunks): <grad_out[b], W_dec[idx[b, j]]>, looping over d tiles.
- grad W_dec, grid (n, d tiles): the indices are sorted once (latent -> list of (token, slot) occurrences,
  CSR offsets); the program of latent l sums top_acts * grad_out over l's occurrences and writes row l once.
  Rows never selected are written as zeros by their own program: no atomics, no memset, no dense [B, n].

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
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_offs = k0 + tl.arange(0, BLOCK_K)
        k_mask = k_offs < K
        lat = tl.load(idx_ptr + b * K + k_offs, mask=k_mask, other=0).to(tl.int64)
        a = tl.load(acts_ptr + b * K + k_offs, mask=k_mask, other=0.0).to(tl.float32)
        rows = tl.load(w_ptr + lat[:, None] * stride_w + d_offs[None, :],
                       mask=k_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(a[:, None] * rows, axis=0)
    tl.store(out_ptr + b * D + d_offs, acc.to(out_ptr.dtype.element_ty), mask=d_mask)


@triton.jit
def _decode_bwd_acts_kernel(grad_ptr, idx_ptr, w_ptr, gacts_ptr, K, D, stride_w,
                            BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    k_offs = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    k_mask = k_offs < K
    lat = tl.load(idx_ptr + b * K + k_offs, mask=k_mask, other=0).to(tl.int64)
    acc = tl.zeros([BLOCK_K], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d_offs = d0 + tl.arange(0, BLOCK_D)
        d_mask = d_offs < D
        g = tl.load(grad_ptr + b * D + d_offs, mask=d_mask, other=0.0).to(tl.float32)
        rows = tl.load(w_ptr + lat[:, None] * stride_w + d_offs[None, :],
                       mask=k_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(rows * g[None, :], axis=1)
    tl.store(gacts_ptr + b * K + k_offs, acc.to(gacts_ptr.dtype.element_ty), mask=k_mask)


@triton.jit
def _decode_bwd_w_kernel(grad_ptr, acts_ptr, order_ptr, offsets_ptr, gw_ptr, K, D,
                         BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    lat = tl.program_id(0).to(tl.int64)
    d_offs = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = d_offs < D
    start = tl.load(offsets_ptr + lat)
    end = tl.load(offsets_ptr + lat + 1)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for s0 in range(start, end, BLOCK_S):
        s_offs = s0 + tl.arange(0, BLOCK_S)
        s_mask = s_offs < end
        pos = tl.load(order_ptr + s_offs, mask=s_mask, other=0)  # flat position b * K + j
        a = tl.load(acts_ptr + pos, mask=s_mask, other=0.0).to(tl.float32)
        tok = pos // K
        g = tl.load(grad_ptr + tok[:, None] * D + d_offs[None, :],
                    mask=s_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(a[:, None] * g, axis=0)
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
                      block_s: int = 16) -> torch.Tensor:
    B, K = top_indices.shape
    D = grad_out.shape[1]
    grad_w = torch.empty(n_latents, D, dtype=w_dtype, device=grad_out.device)
    if n_latents == 0 or D == 0:
        return grad_w
    flat = top_indices.reshape(-1).long()
    order = torch.sort(flat, stable=True).indices  # occurrences grouped by latent, in token order
    offsets = torch.zeros(n_latents + 1, dtype=torch.int64, device=flat.device)
    torch.cumsum(torch.bincount(flat, minlength=n_latents), 0, out=offsets[1:])
    BLOCK_D = block_d or pick_block_d(D)
    _decode_bwd_w_kernel[(n_latents, triton.cdiv(D, BLOCK_D))](
        grad_out, top_acts, order, offsets, grad_w, K, D, BLOCK_S=block_s, BLOCK_D=BLOCK_D)
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
