"""The two sparse ops the SAE needs, routed through `kernels` (Triton on GPU, reference elsewhere), plus the
sparse encoder: TopK selection whose backward touches only the kept (and AuxK) latents.

`sparse_encode` never builds a dense [B, n_latents] gradient: the encoder's weight gradient is the same op as
sparse_decode's W_dec gradient (sparse^T @ x), so it reuses it; b_dec's gradient through the encoder is one
vector-matrix product (see _SparseEncode).
"""
from __future__ import annotations

import os

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


def _onednn_ok() -> bool:
    if os.environ.get("SAE_ENCODER_GEMM", "onednn").strip().lower() == "blas":
        return False
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


ONEDNN = _onednn_ok()  # read once at import; SAE_ENCODER_GEMM=blas before import turns it off (for comparisons)


def _onednn_here(x_c: Tensor, W_enc: Tensor, b_enc: Tensor) -> bool:
    return (ONEDNN and x_c.device.type == "cpu" and x_c.dtype == W_enc.dtype == b_enc.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu"))


def encoder_linear(x_c: Tensor, W_enc: Tensor, b_enc: Tensor) -> Tensor:
    """pre = x_c W_enc^T + b_enc, the one dense [B, n] product of a step (~80% of a CPU train step at the
    issue's shape). On CPU in fp32 it goes to oneDNN's fp32 GEMM (torch.ops.mkldnn._linear_pointwise, the op
    torch's inductor uses for CPU linears): same fp32 maths, only the blocking/summation order differs from
    MKL's sgemm, and it measured 12-15% faster here (AMD EPYC, AVX-512; bench/sae_train.py). Anything else, or
    SAE_ENCODER_GEMM=blas, or an error from that op: F.linear."""
    if _onednn_here(x_c, W_enc, b_enc):
        try:
            return torch.ops.mkldnn._linear_pointwise(x_c.contiguous(), W_enc.contiguous(), b_enc, "none", [], "")
        except RuntimeError:
            pass
    return F.linear(x_c, W_enc, b_enc)


def sparse_outer(g: Tensor, idx: Tensor, x: Tensor, n_rows: int) -> Tensor:
    """[n_rows, d] with row i = sum over (b, j) with idx[b, j] == i of g[b, j] * x[b]: the W_dec gradient of
    sparse_decode with grad_out = x. On the reference backend it is `kernels.reference.decode_weight_grad` (a
    sorted per-latent segment sum); on Triton we take it from the decode kernel's backward."""
    g = g.detach().to(x.dtype)
    if kernels.backend(g, idx, x) == "reference":
        return kernels.reference.decode_weight_grad(x, g, idx, n_rows)
    with torch.enable_grad():
        W = torch.zeros(n_rows, x.shape[1], dtype=x.dtype, device=x.device, requires_grad=True)
        y = sparse_decode(g, idx, W)
        (gw,) = torch.autograd.grad(y, W, x)
    return gw


def latent_sums(g: Tensor, idx: Tensor, n_rows: int) -> Tensor:
    """[n_rows]: entry i = sum of g[b, j] over the (b, j) with idx[b, j] == i, always added in the same order
    (the sorted per-latent segment sum of `kernels.reference.decode_weight_grad`, with a [B, 1] column of
    ones as grad_out). index_add_ gives the same numbers on CPU, but on CUDA it adds with atomics, in whatever
    order the threads arrive, so the bias gradients (and a resumed run) would differ in the last bits."""
    return kernels.reference.decode_weight_grad(g.new_ones(g.shape[0], 1), g, idx, n_rows)[:, 0]


class _EncoderLinear(torch.autograd.Function):
    """`encoder_linear` with F.linear's backward (the oneDNN op has no autograd formula)."""

    @staticmethod
    def forward(ctx, x_c: Tensor, W_enc: Tensor, b_enc: Tensor) -> Tensor:
        ctx.save_for_backward(x_c, W_enc)
        return encoder_linear(x_c, W_enc, b_enc)

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        x_c, W_enc = ctx.saved_tensors
        n = ctx.needs_input_grad
        return g @ W_enc if n[0] else None, g.t() @ x_c if n[1] else None, g.sum(0) if n[2] else None


def dense_pre_acts(x_c: Tensor, W_enc: Tensor, b_enc: Tensor) -> Tensor:
    """Differentiable pre = x_c W_enc^T + b_enc through the SAME GEMM as the TopK training path
    (`encoder_linear`), so inference (`SAE.encode`) and training compute bit-identical pre-activations
    and pick the same latents even at near-ties."""
    if not _onednn_here(x_c, W_enc, b_enc):
        return F.linear(x_c, W_enc, b_enc)  # encoder_linear would take F.linear too (autocast stays in charge)
    if x_c.dim() != 2:
        return dense_pre_acts(x_c.reshape(-1, x_c.shape[-1]), W_enc, b_enc).reshape(*x_c.shape[:-1], -1)
    return _EncoderLinear.apply(x_c, W_enc, b_enc)


class _SparseEncode(torch.autograd.Function):
    """pre = (x_n - b_dec) W_enc^T + b_enc (one GEMM with the bias, `encoder_linear`); keep TopK (and the AuxK
    pick among dead latents) of the pre-activations, then ReLU only the kept values. The dense [B, n]
    pre-activations live only inside forward.

    Backward with g = grad of the kept values (zero where ReLU cut them), touching only the kept latents:
      grad b_enc = per-latent sum of g                        (`latent_sums`: sorted, no atomics)
      grad W_enc = sparse(g)^T @ (x_n - b_dec)                (per-latent segment sum, as the W_dec grad)
      grad b_dec = -sum_b sparse(g)[b] @ W_enc = -(grad b_enc) @ W_enc   (one [n] x [n, d] product instead of
                                                               decoding all B rows and summing them)
      grad x_n   = sparse_decode(g, idx, W_enc)               (only if x_n itself requires grad)
    """

    @staticmethod
    def forward(ctx, x_n: Tensor, b_dec: Tensor, W_enc: Tensor, b_enc: Tensor, k: int, dead_mask: Tensor | None,
                k_aux: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        x_c = x_n - b_dec
        pre = encoder_linear(x_c, W_enc, b_enc)
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
        need_x, need_bdec, need_W, need_benc = ctx.needs_input_grad[:4]
        grad_x = sparse_decode(g, idx, W_enc) if need_x else None
        grad_W = sparse_outer(g, idx, x_c, W_enc.shape[0]).to(W_enc.dtype) if need_W else None
        grad_b = grad_bdec = None
        if need_benc or need_bdec:
            grad_b = latent_sums(g.float(), idx, W_enc.shape[0])
            if need_bdec:
                grad_bdec = -(grad_b.to(W_enc.dtype) @ W_enc)
            grad_b = grad_b.to(W_enc.dtype) if need_benc else None
        return grad_x, grad_bdec, grad_W, grad_b, None, None, None


def sparse_encode(x_n: Tensor, b_dec: Tensor, W_enc: Tensor, b_enc: Tensor, k: int, dead_mask: Tensor | None = None,
                  k_aux: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """TopK code of x_n - b_dec -> (top_acts [B,k], top_indices [B,k], aux_acts [B,k'], aux_indices [B,k']),
    k' = min(k_aux, n_dead) or 0."""
    return _SparseEncode.apply(x_n, b_dec, W_enc, b_enc, k, dead_mask, k_aux)
