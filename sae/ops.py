"""The two sparse ops the SAE needs, routed through `kernels` (Triton on GPU, reference elsewhere), plus the
sparse encoder: TopK selection whose backward touches only the kept (and AuxK) latents.

`sparse_encode` never builds a dense [B, n_latents] gradient: the encoder's weight gradient is the same op as
sparse_decode's W_dec gradient (sparse^T @ x), so it reuses it; the input gradient is a sparse decode of W_enc.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

import kernels


def sparse_decode(top_acts: Tensor, top_indices: Tensor, W_dec: Tensor) -> Tensor:
    """sum_j top_acts[b, j] * W_dec[top_indices[b, j]] -> [B, d] (differentiable in top_acts and W_dec)."""
    if top_indices.shape[-1] == 0:
        return top_acts.new_zeros(top_acts.shape[0], W_dec.shape[1]) + 0 * W_dec.sum()
    return kernels.sparse_decode(top_acts, top_indices, W_dec)


def topk(x: Tensor, k: int) -> tuple[Tensor, Tensor]:
    vals, idx = kernels.topk(x, k)
    return vals, idx


def sparse_outer(g: Tensor, idx: Tensor, x: Tensor, n_rows: int) -> Tensor:
    """[n_rows, d] with row i = sum over (b, j) with idx[b, j] == i of g[b, j] * x[b]: the W_dec gradient of
    sparse_decode with grad_out = x, so we take it from that op's backward."""
    with torch.enable_grad():
        W = torch.zeros(n_rows, x.shape[1], dtype=x.dtype, device=x.device, requires_grad=True)
        y = sparse_decode(g.to(x.dtype).detach(), idx, W)
        (gw,) = torch.autograd.grad(y, W, x)
    return gw


class _SparseEncode(torch.autograd.Function):
    """pre = x_c W_enc^T + b_enc; keep TopK (and the AuxK pick among dead latents); ReLU the kept values."""

    @staticmethod
    def forward(ctx, x_c: Tensor, W_enc: Tensor, b_enc: Tensor, k: int, dead_mask: Tensor | None,
                k_aux: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        pre = F.linear(x_c, W_enc, b_enc)
        vals, idx = topk(pre, k)
        if dead_mask is not None and bool(dead_mask.any()):
            kk = min(k_aux, int(dead_mask.sum()))
            aux_vals, aux_idx = topk(pre.masked_fill_(~dead_mask, float("-inf")), kk)
        else:
            aux_vals = vals.new_zeros(vals.shape[0], 0)
            aux_idx = idx.new_zeros(idx.shape[0], 0)
        del pre
        vals, aux_vals = vals.float(), aux_vals.float()
        ctx.save_for_backward(x_c, W_enc, torch.cat([idx, aux_idx], 1), torch.cat([vals > 0, aux_vals > 0], 1))
        ctx.k = k
        return torch.relu(vals), idx, torch.relu(aux_vals), aux_idx

    @staticmethod
    def backward(ctx, g_acts: Tensor | None, _gi: None, g_aux: Tensor | None, _ga: None):  # type: ignore[override]
        x_c, W_enc, idx, pos = ctx.saved_tensors
        B, k = x_c.shape[0], ctx.k
        ga = g_acts if g_acts is not None else x_c.new_zeros(B, k)
        gx = g_aux if g_aux is not None else x_c.new_zeros(B, idx.shape[1] - k)
        g = (torch.cat([ga.float(), gx.float()], 1) * pos).to(x_c.dtype)
        grad_x = sparse_decode(g, idx, W_enc) if ctx.needs_input_grad[0] else None
        grad_W = sparse_outer(g, idx, x_c, W_enc.shape[0]).to(W_enc.dtype) if ctx.needs_input_grad[1] else None
        grad_b = None
        if ctx.needs_input_grad[2]:
            grad_b = torch.zeros(W_enc.shape[0], dtype=torch.float32, device=g.device)
            grad_b = grad_b.index_add_(0, idx.flatten(), g.flatten().float()).to(W_enc.dtype)
        return grad_x, grad_W, grad_b, None, None, None


def sparse_encode(x_c: Tensor, W_enc: Tensor, b_enc: Tensor, k: int, dead_mask: Tensor | None = None,
                  k_aux: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> (top_acts [B,k], top_indices [B,k], aux_acts [B,k'], aux_indices [B,k']), k' = min(k_aux, n_dead) or 0."""
    return _SparseEncode.apply(x_c, W_enc, b_enc, k, dead_mask, k_aux)
