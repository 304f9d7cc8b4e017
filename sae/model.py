"""Sparse autoencoders on the residual stream: TopK (default), BatchTopK and ReLU+L1, behind one class.

    x_n   = normalise(x)                       (dataset scalar s with E||x s||^2 = d_in, or per-token standardise)
    pre   = W_enc (x_n - b_dec) + b_enc         W_enc is stored like nn.Linear.weight: [n_latents, d_in]
    z     = TopK(pre), ReLU'd                   (batchtopk: top k*B over the global batch; at inference pre > threshold)
    x_hat = denormalise(z W_dec + b_dec)        W_dec [n_latents, d_in], each ROW unit norm

Callers pass raw activations and get raw-space reconstructions. The latent code is carried sparse as
(top_acts [B, k], top_indices [B, k]); decoding is `kernels.sparse_decode` (never a dense [B, n_latents] code).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn
from torch import Tensor

from llama.cli import UserError
from sae.batchtopk import LOCAL, Gather, batch_topk, update_threshold
from sae.config import SAEConfig
from sae.loss import Reduce, auxk_loss, fvu, identity, total_variance
from sae.ops import dense_pre_acts, sparse_decode, sparse_encode, topk

STEER_MODES = ("add", "clamp")
TOKEN_EPS = 1e-5  # per-token standardisation: (x - mean) / (std + eps) in, x_hat * std + mean out (SAELens)


class EncodeOutput(NamedTuple):
    top_acts: Tensor  # [B, k] >= 0
    top_indices: Tensor  # [B, k] int64


class SAEOutput(NamedTuple):
    x_hat: Tensor  # raw space, like x
    top_acts: Tensor
    top_indices: Tensor
    pre_acts: Tensor | None  # dense [B, n] only for batchtopk / relu
    fvu: Tensor  # in the SAE's (normalised) space; scalar
    auxk_loss: Tensor  # scalar, 0 when no latent is dead
    l1_loss: Tensor  # relu architecture: sum_i z_i ||W_dec_i|| / total variance; else 0


class SAE(nn.Module):
    def __init__(self, cfg: SAEConfig, device: torch.device | str | None = None, seed: int = 0) -> None:
        super().__init__()
        self.cfg = cfg
        n, d = cfg.n_latents, cfg.d_in
        gen = torch.Generator().manual_seed(seed)
        W_dec = torch.randn(n, d, generator=gen, device="cpu")
        W_dec /= W_dec.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(W_dec.to(device))
        self.W_enc = nn.Parameter(W_dec.clone().to(device))  # = W_dec^T in SAELens' [d_in, d_sae] orientation
        self.b_enc = nn.Parameter(torch.zeros(n, device=device))
        self.b_dec = nn.Parameter(torch.zeros(d, device=device))
        self.register_buffer("norm_scale", torch.ones((), device=device))
        self.register_buffer("threshold", torch.zeros(n, device=device))  # JumpReLU threshold (batchtopk)
        self.steer: dict[int, tuple[float, str]] = {}  # latent -> (value, "add" | "clamp"), applied to the code

    @property
    def device(self) -> torch.device:
        return self.W_dec.device

    # ---- normalisation -------------------------------------------------------------------------------
    def normalize(self, x: Tensor) -> Tensor:
        x = x.to(self.W_dec.dtype)
        if self.cfg.normalize == "scalar":
            return x * self.norm_scale
        if self.cfg.normalize == "token":  # SAELens' layer_norm exactly: unbiased std, eps on the way in only
            mu = x.mean(-1, keepdim=True)
            return (x - mu) / (x.std(-1, keepdim=True) + TOKEN_EPS)
        return x

    def denormalize(self, x_hat_n: Tensor, like: Tensor | None = None) -> Tensor:
        if self.cfg.normalize == "scalar":
            return x_hat_n / self.norm_scale
        if self.cfg.normalize == "token":
            if like is None:
                raise UserError("this SAE standardises each token: pass the input as `like` to decode()")
            like = like.to(x_hat_n.dtype)
            return x_hat_n * like.std(-1, keepdim=True) + like.mean(-1, keepdim=True)
        return x_hat_n

    # ---- encoder / decoder ---------------------------------------------------------------------------
    def pre_acts(self, x_n: Tensor) -> Tensor:
        return dense_pre_acts(x_n - self.b_dec, self.W_enc, self.b_enc)  # the GEMM TopK training uses

    def _select(self, pre: Tensor, gather: Gather = LOCAL) -> Tensor:
        """Dense ReLU'd code for batchtopk / relu (these kinds are dense by nature)."""
        if self.cfg.architecture == "relu":
            return torch.relu(pre)
        if self.training:  # batch TopK: the k*B largest over the whole (global) batch, sae/batchtopk.py
            z, smallest = batch_topk(pre, self.cfg.k, gather)
            update_threshold(self.threshold, smallest)  # running threshold = EMA of the smallest kept value
            return z
        return pre * (pre > self.threshold)  # JumpReLU-style inference

    @staticmethod
    def compact(z: Tensor) -> EncodeOutput:
        """Dense code -> (acts, indices) of width max-L0-in-batch (zeros pad rows with fewer)."""
        width = max(1, int((z > 0).sum(-1).max()))
        vals, idx = z.topk(width, dim=-1, sorted=False)
        return EncodeOutput(vals, idx)

    def _encode_n(self, x_n: Tensor) -> EncodeOutput:
        if self.cfg.architecture == "topk":
            vals, idx = topk(self.pre_acts(x_n), self.cfg.k)
            return EncodeOutput(torch.relu(vals), idx)
        return self.compact(self._select(self.pre_acts(x_n)))

    def encode(self, x: Tensor) -> EncodeOutput:
        """Raw activations [..., d_in] -> sparse code (steering applied)."""
        shape = x.shape[:-1]
        out = self.apply_steer(*self._encode_n(self.normalize(x.reshape(-1, x.shape[-1]))))
        return EncodeOutput(out.top_acts.reshape(*shape, -1), out.top_indices.reshape(*shape, -1))

    def decode(self, top_acts: Tensor, top_indices: Tensor, like: Tensor | None = None) -> Tensor:
        """Sparse code -> raw-space reconstruction (`like` = the input, needed only for per-token norm)."""
        shape = top_acts.shape[:-1]
        a, i = top_acts.reshape(-1, top_acts.shape[-1]), top_indices.reshape(-1, top_indices.shape[-1])
        x_hat_n = sparse_decode(a.to(self.W_dec.dtype), i, self.W_dec) + self.b_dec
        lk = like.reshape(-1, like.shape[-1]) if like is not None else None
        return self.denormalize(x_hat_n, lk).reshape(*shape, -1)

    # ---- steering ------------------------------------------------------------------------------------
    def apply_steer(self, top_acts: Tensor, top_indices: Tensor) -> EncodeOutput:
        """Per-latent bias ("add": z_i += v) or clamp ("clamp": z_i = v) on the code, kept sparse: each steered
        latent gets one extra column; a clamped latent's own entries are zeroed."""
        if not self.steer:
            return EncodeOutput(top_acts, top_indices)
        ids = torch.tensor(list(self.steer), dtype=top_indices.dtype, device=top_indices.device)
        vals = torch.tensor([v for v, _ in self.steer.values()], dtype=top_acts.dtype, device=top_acts.device)
        for mode in {m for _, m in self.steer.values()}:
            if mode not in STEER_MODES:
                raise UserError(f"steer mode must be one of {STEER_MODES}, got {mode!r}")
        clamped = ids[torch.tensor([m == "clamp" for _, m in self.steer.values()], device=ids.device)]
        if clamped.numel():
            top_acts = top_acts.masked_fill(torch.isin(top_indices, clamped), 0.0)
        B = top_acts.shape[0]
        return EncodeOutput(torch.cat([top_acts, vals.expand(B, -1)], 1), torch.cat([top_indices, ids.expand(B, -1)], 1))

    # ---- training forward ----------------------------------------------------------------------------
    def forward(self, x: Tensor, dead_mask: Tensor | None = None, *, reduce: Reduce = identity,
                gather: Gather = LOCAL) -> SAEOutput:
        """x [B, d_in] raw. `dead_mask` [n] bool switches on AuxK. Under DDP `reduce` globalises sums and
        `gather` (sae.dist.all_gather) lets batchtopk select over the global batch."""
        x_n = self.normalize(x)
        zero = x_n.new_zeros(())
        pre, l1 = None, zero
        aux_acts = aux_idx = None
        if self.cfg.architecture == "topk":
            kk = self.aux_k(dead_mask) if dead_mask is not None and self.training else 0
            acts, idx, aux_acts, aux_idx = sparse_encode(x_n, self.b_dec, self.W_enc, self.b_enc, self.cfg.k,
                                                         dead_mask if kk else None, kk)
            acts, idx = self.apply_steer(acts, idx)
        else:
            pre = self.pre_acts(x_n)
            z = self._select(pre, gather)
            acts, idx = self.apply_steer(*self.compact(z))
            if self.cfg.architecture == "relu":
                l1 = self.cfg.l1_coef * (z * self.W_dec.norm(dim=1)).sum() / total_variance(x_n, reduce)
            elif dead_mask is not None and self.training and self.aux_k(dead_mask) > 0:
                av, aux_idx = topk(pre.masked_fill(~dead_mask, float("-inf")), self.aux_k(dead_mask))
                aux_acts = torch.relu(av)
        x_hat_n = sparse_decode(acts.to(self.W_dec.dtype), idx, self.W_dec) + self.b_dec
        loss_fvu = fvu(x_n, x_hat_n, reduce)
        aux = zero
        if aux_acts is not None and aux_acts.shape[1] > 0:
            aux = self.aux_loss(x_n - x_hat_n.detach(), self.aux_decode(aux_acts, aux_idx), reduce)
        return SAEOutput(self.denormalize(x_hat_n, x), acts, idx, pre, loss_fvu, aux, l1)

    # ---- AuxK (DESIGN.md section 4) -----------------------------------------------------------------
    def aux_k(self, dead_mask: Tensor) -> int:
        """AuxK runs whenever ANY latent is dead: k_aux = min(k_aux, n_dead); no floor."""
        return min(self.cfg.k_aux, int(dead_mask.sum()))

    def aux_decode(self, aux_acts: Tensor, aux_idx: Tensor) -> Tensor:
        """The dead latents' reconstruction of the residual: decoded WITHOUT b_dec."""
        return sparse_decode(aux_acts.to(self.W_dec.dtype), aux_idx, self.W_dec)

    def aux_loss(self, e: Tensor, e_hat: Tensor, reduce: Reduce = identity) -> Tensor:
        """||e - e_hat||^2 normalised by the residual's variance (the caller weights it by aux_coef)."""
        return auxk_loss(e, e_hat, reduce)

    # ---- decoder constraint --------------------------------------------------------------------------
    @torch.no_grad()
    def remove_parallel_grads(self) -> None:
        """Drop the part of each W_dec row's gradient parallel to the row (it would only change its norm)."""
        if self.W_dec.grad is not None:  # g -= (<g, w> / <w, w>) w, row by row, with no [n, d] temporary
            g, w = self.W_dec.grad, self.W_dec
            coef = torch.einsum("nd,nd->n", g, w) / torch.einsum("nd,nd->n", w, w).clamp_min(1e-12)
            g.addcmul_(w, coef.unsqueeze(1), value=-1.0)

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Each latent's decoder ROW (along d_in) back to unit norm."""
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)


TopKSAE = SAE


def build_sae(cfg: SAEConfig, device: torch.device | str | None = None, seed: int = 0) -> SAE:
    return SAE(cfg, device=device, seed=seed)


@torch.no_grad()
def geometric_median(x: Tensor, iters: int = 100, tol: float = 1e-6) -> Tensor:
    """Weiszfeld's algorithm: the point minimising the sum of Euclidean distances to the rows of x."""
    x = x.double()
    y = x.mean(0)
    for _ in range(iters):
        w = 1.0 / (x - y).norm(dim=1).clamp_min(1e-8)
        y_new = (w[:, None] * x).sum(0) / w.sum()
        if (y_new - y).norm() <= tol * y.norm().clamp_min(1e-8):
            return y_new.float()
        y = y_new
    return y.float()


@torch.no_grad()
def init_from_sample(sae: SAE, sample: Tensor, b_dec_init: str = "median") -> None:
    """Set the dataset scale s (E||x s||^2 = d_in) and b_dec from a raw sample, b_dec IN THE SAE'S INPUT SPACE."""
    sample = sample.float().to(sae.device)
    if sae.cfg.normalize == "scalar":
        sae.norm_scale.fill_((sae.cfg.d_in / sample.pow(2).sum(-1).mean()).sqrt().item())
    x_n = sae.normalize(sample)
    if b_dec_init == "median":
        sae.b_dec.copy_(geometric_median(x_n))
    elif b_dec_init == "mean":
        sae.b_dec.copy_(x_n.mean(0))
    else:
        sae.b_dec.zero_()
