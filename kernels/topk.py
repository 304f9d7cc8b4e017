"""Triton row-wise top-k for k <= 256 and n up to 2^20 (and beyond): per-block candidates, then merges.

Each (value, index) pair is packed into one int64 key that sorts like the pair: the high 32 bits are the fp32
value's bits mapped to an order-preserving signed int, the low 32 bits are 0xFFFFFFFF - index (so among equal
values the lower index is the larger key). One `tl.topk` (bitonic top-k) on keys then selects values and
indices together.

- stage 1, grid (B, cdiv(n, BLOCK_N)): each block of a row keeps its K2 = next_pow2(k) best keys.
- merge, grid (B, cdiv(n_candidates, BLOCK_N)): the same on keys, repeated while more than one block remains.
- final (one block per row): the best k keys are unpacked into int64 indices, and the values read from x there.
Values are compared in fp32 (exact for fp32, bf16 and fp16 inputs), canonicalised first: -0.0 ties with +0.0 and
every NaN ranks above +inf, as in torch.topk. K2 is the only compile-time size, so k (e.g. an AuxK width that
changes every step) recompiles only when it crosses a power of two.

Not yet the design a GPU needs (a full bitonic network on int64 keys per element: ~225 integer ops each), so
`kernels.topk` dispatches to torch.topk unless LLAMA_SAE_TOPK=triton; bench/gpu.py times both on the card.

Import this module only through `kernels` (TRITON_INTERPRET=1 must be set before triton is imported).
"""
from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

MAX_K = 256
_KEY_FLOOR = tl.constexpr(-(2**63))  # padding key: below every real key


@triton.jit
def _topk_stage_kernel(src_ptr, n, stride_src, dst_ptr, stride_dst, x_ptr, stride_x, vals_ptr, idx_ptr, k,
                       BLOCK_N: tl.constexpr, K2: tl.constexpr, PACKED: tl.constexpr, FINAL: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    offs = blk * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = offs < n
    low32 = tl.full([BLOCK_N], 0xFFFFFFFF, tl.int64)
    if PACKED:
        keys = tl.load(src_ptr + row * stride_src + offs, mask=mask, other=_KEY_FLOOR)
    else:
        v = tl.load(src_ptr + row * stride_src + offs, mask=mask, other=0.0).to(tl.float32)
        # canonicalise before the bitcast: -0.0 -> +0.0 (they tie, as in torch.topk), every NaN -> the positive
        # quiet NaN (ranks above +inf whatever its sign bit and payload, as in torch.topk)
        v = tl.where(v == 0.0, 0.0, v)
        bits = tl.where(v != v, 0x7FC00000, v.to(tl.int32, bitcast=True))
        ordered = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # signed-int order == float order
        keys = (ordered.to(tl.int64) << 32) | (low32 - offs.to(tl.int64))
        keys = tl.where(mask, keys, _KEY_FLOOR)
    top = tl.topk(keys, K2)  # [K2], largest first
    j = tl.arange(0, K2)
    if FINAL:  # values are read back from x at the chosen indices: the input's own bits (-0.0, NaN payloads)
        index = tl.full([K2], 0xFFFFFFFF, tl.int64) - (top & tl.full([K2], 0xFFFFFFFF, tl.int64))
        val = tl.load(x_ptr + row * stride_x + index, mask=j < k, other=0.0)
        tl.store(vals_ptr + row * k + j, val.to(vals_ptr.dtype.element_ty), mask=j < k)
        tl.store(idx_ptr + row * k + j, index, mask=j < k)
    else:
        tl.store(dst_ptr + row * stride_dst + blk * K2 + j, top)


def topk_forward(x: torch.Tensor, k: int, block_n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Values [B, k] (x's dtype, largest first) and int64 indices [B, k]; block_n: power of two >= 2*K2."""
    if k > MAX_K:
        raise ValueError(f"topk: the Triton kernel supports k <= {MAX_K}, got {k}")
    x = x.contiguous()
    B, n = x.shape
    K2 = max(2, triton.next_power_of_2(k))  # tl.topk collapses a 1-wide result to a scalar
    BLOCK_N = max(block_n or 2048, 2 * K2)
    values = torch.empty(B, k, dtype=x.dtype, device=x.device)
    indices = torch.empty(B, k, dtype=torch.int64, device=x.device)
    if B == 0:
        return values, indices
    src, n_cur, packed = x, n, False
    while True:
        n_blocks = triton.cdiv(n_cur, BLOCK_N)
        if n_blocks == 1:
            block = max(triton.next_power_of_2(n_cur), K2)
            _topk_stage_kernel[(B, 1)](src, n_cur, src.stride(0), src, 0, x, x.stride(0), values, indices, k,
                                       BLOCK_N=block, K2=K2, PACKED=packed, FINAL=True)
            return values, indices
        dst = torch.empty(B, n_blocks * K2, dtype=torch.int64, device=x.device)
        _topk_stage_kernel[(B, n_blocks)](src, n_cur, src.stride(0), dst, dst.stride(0), x, x.stride(0), values,
                                          indices, k,
                                          BLOCK_N=BLOCK_N, K2=K2, PACKED=packed, FINAL=False)
        src, n_cur, packed = dst, n_blocks * K2, True


class TopKFunction(torch.autograd.Function):
    """Values are differentiable in x like torch.topk: the gradient is scattered back to the kept positions."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, k: int, block_n: int | None = None):
        values, indices = topk_forward(x, k, block_n)
        ctx.mark_non_differentiable(indices)
        ctx.save_for_backward(indices)
        ctx.x_shape = x.shape
        return values, indices

    @staticmethod
    def backward(ctx, grad_values: torch.Tensor, grad_indices: Any):
        (indices,) = ctx.saved_tensors
        grad_x = grad_values.new_zeros(ctx.x_shape).scatter_(1, indices, grad_values)
        return grad_x, None, None


def topk(x: torch.Tensor, k: int, block_n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton path of `kernels.topk` (no dispatch, no argument checks: call `kernels.topk`)."""
    return TopKFunction.apply(x, k, block_n)
