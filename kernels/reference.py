"""Pure-PyTorch spec of every kernel op (imports only torch). The Triton kernels must match these.

- `sparse_decode(top_acts, top_indices, W_dec)`: out[b] = sum_j top_acts[b, j] * W_dec[top_indices[b, j]].
  Forward: `F.embedding_bag(mode="sum", per_sample_weights=...)`, a gather, never the dense [B, n] latent
  tensor (on CPU ~60-80x faster than the dense definition below; see bench/kernels.py --cpu). Backward as the
  Triton kernel does it (DESIGN.md section 5): grad top_acts = <grad_out[b], W_dec[idx[b, j]]> (ATen's
  per-sample-weights backward), grad W_dec by `decode_weight_grad`.
- `decode_weight_grad(grad_out, top_acts, top_indices, n)`: the W_dec gradient sparse^T @ grad_out, built per
  latent from the sorted (latent -> occurrences) map: it is itself an embedding_bag over the rows of grad_out
  (one bag per latent), so each row is written once, with no [n, d] zero fill, no scatter and no [B*k, d]
  temporary. ~2x faster on CPU than embedding_bag's own dense backward (sort + zero fill + index_add).
- `sparse_decode_dense`: the same op written by its definition (scatter the kept values into a dense [B, n]
  tensor, then matmul). The independent check for tests and the "dense" peer in the benchmark.
- `topk(x, k)`: torch.topk along the last dimension, sorted, largest first.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


class TopK(NamedTuple):
    values: torch.Tensor   # [B, k], sorted largest first
    indices: torch.Tensor  # [B, k] int64


def check_decode_args(top_acts: torch.Tensor, top_indices: torch.Tensor, W_dec: torch.Tensor) -> None:
    """Shapes and dtypes every sparse_decode implementation expects; raises ValueError naming the argument."""
    if top_acts.dim() != 2:
        raise ValueError(f"sparse_decode: top_acts must be [B, k], got shape {tuple(top_acts.shape)}")
    if top_indices.shape != top_acts.shape:
        raise ValueError(f"sparse_decode: top_indices must have top_acts' shape {tuple(top_acts.shape)}, "
                         f"got {tuple(top_indices.shape)}")
    if top_indices.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"sparse_decode: top_indices must be int64 (or int32), got {top_indices.dtype}")
    if W_dec.dim() != 2:
        raise ValueError(f"sparse_decode: W_dec must be [n_latents, d], got shape {tuple(W_dec.shape)}")
    if not (top_acts.is_floating_point() and W_dec.is_floating_point()):
        raise ValueError(f"sparse_decode: top_acts and W_dec must be floating point, got {top_acts.dtype} "
                         f"and {W_dec.dtype}")
    if top_acts.device != W_dec.device or top_indices.device != W_dec.device:
        raise ValueError(f"sparse_decode: all inputs must be on one device, got {top_acts.device}, "
                         f"{top_indices.device}, {W_dec.device}")


def check_indices_async(top_indices: torch.Tensor, n: int, what: str = "sparse_decode") -> None:
    """Every index in [0, n), checked without a host sync (torch._assert_async): on CUDA a device-side assert
    that fires when the stream reaches it (the CUDA context is then unusable: for debugging), on CPU a
    RuntimeError at once. `kernels` calls it when LLAMA_SAE_CHECK_INDICES=1."""
    if top_indices.numel():
        ok = ((top_indices >= 0) & (top_indices < n)).all()
        torch._assert_async(ok, f"{what}: top_indices must lie in [0, n_latents={n}) (LLAMA_SAE_CHECK_INDICES=1)")


def check_topk_args(x: torch.Tensor, k: int) -> None:
    if x.dim() != 2:
        raise ValueError(f"topk: x must be [B, n], got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"topk: x must be floating point, got {x.dtype}")
    if not 1 <= k <= x.shape[1]:
        raise ValueError(f"topk: k must be in [1, n={x.shape[1]}], got {k}")


def decode_weight_grad(grad_out: torch.Tensor, top_acts: torch.Tensor, top_indices: torch.Tensor,
                       n_latents: int) -> torch.Tensor:
    """[n, d]: row i = sum over (b, j) with top_indices[b, j] == i of top_acts[b, j] * grad_out[b] (rows of
    latents never selected are zero), in grad_out's dtype."""
    B, k = top_indices.shape
    flat = top_indices.reshape(-1).long()
    lat, order = torch.sort(flat, stable=True)  # order: flat positions b * k + j, grouped by latent
    # CSR offsets from the sort (bag i = order[starts[i]:starts[i+1]]); searchsorted, unlike bincount, never
    # reads a value back to the host, so this costs no device sync on CUDA
    starts = torch.searchsorted(lat, torch.arange(n_latents, device=flat.device))
    return F.embedding_bag(order.div(k, rounding_mode="floor"), grad_out, starts,
                           per_sample_weights=top_acts.reshape(-1)[order].to(grad_out.dtype), mode="sum")


class _SparseDecode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, top_acts: torch.Tensor, top_indices: torch.Tensor, W_dec: torch.Tensor) -> torch.Tensor:
        idx = top_indices.long()
        acts = top_acts.to(W_dec.dtype)
        ctx.save_for_backward(acts, idx, W_dec)
        ctx.acts_dtype = top_acts.dtype
        return F.embedding_bag(idx, W_dec, per_sample_weights=acts, mode="sum")

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        acts, idx, W_dec = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_acts = grad_w = None
        if ctx.needs_input_grad[0]:
            B, k = idx.shape
            flat = idx.reshape(-1)
            bags = torch.arange(B * k, device=flat.device).div(k, rounding_mode="floor")
            offsets = torch.arange(0, B * k, k, device=flat.device)
            grad_acts = torch.ops.aten._embedding_bag_per_sample_weights_backward(
                grad_out, W_dec, flat, offsets, bags, 0, -1).view(B, k).to(ctx.acts_dtype)  # mode 0 = sum
        if ctx.needs_input_grad[2]:
            grad_w = decode_weight_grad(grad_out, acts, idx, W_dec.shape[0]).to(W_dec.dtype)
        return grad_acts, None, grad_w


def sparse_decode(top_acts: torch.Tensor, top_indices: torch.Tensor, W_dec: torch.Tensor) -> torch.Tensor:
    """[B, k] values at [B, k] latent indices times W_dec [n, d] -> [B, d] in W_dec's dtype."""
    check_decode_args(top_acts, top_indices, W_dec)
    if top_indices.numel() == 0:  # k = 0 or B = 0 (embedding_bag refuses k = 0): zeros, by the definition
        return sparse_decode_dense(top_acts, top_indices, W_dec)
    return _SparseDecode.apply(top_acts, top_indices, W_dec)


def sparse_decode_dense(top_acts: torch.Tensor, top_indices: torch.Tensor, W_dec: torch.Tensor) -> torch.Tensor:
    """The definition: scatter into a dense [B, n] latent tensor, then matmul (slow; tests and benchmarks)."""
    check_decode_args(top_acts, top_indices, W_dec)
    z = top_acts.new_zeros(top_acts.shape[0], W_dec.shape[0], dtype=W_dec.dtype)
    z = z.scatter_add(1, top_indices.long(), top_acts.to(W_dec.dtype))  # repeated indices add up
    return z @ W_dec


def topk(x: torch.Tensor, k: int) -> TopK:
    """Row-wise top-k of x [B, n]: values sorted largest first and their int64 indices (torch.topk)."""
    check_topk_args(x, k)
    values, indices = torch.topk(x, k, dim=-1, largest=True, sorted=True)
    return TopK(values, indices)
