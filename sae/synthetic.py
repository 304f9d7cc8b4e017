"""Synthetic activations with known ground truth: sparse combinations of unit feature directions in
superposition (more features than dimensions), plus the recovery metric.

    x = sum_i a_i f_i + bias + noise,   a_i = m_i * u_i on the active set (each feature fires with prob. p_i)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor


@dataclass
class SyntheticConfig:
    d: int = 64
    n_features: int = 256
    rows: int = 100_000
    avg_active: float = 4.0  # expected active features per row
    zipf: float = 0.0  # firing probability ~ 1/rank^zipf (0: uniform), renormalised to avg_active
    mag_mean: float = 1.0  # active magnitude ~ mag_mean * U[1 - mag_spread, 1 + mag_spread]
    mag_spread: float = 0.5
    correlated_groups: int = 0  # >0: features in groups; a row picks groups, active features come from them
    noise: float = 0.0  # isotropic Gaussian noise std per dimension
    bias_norm: float = 0.0  # a constant offset (tests b_dec) of this norm
    scale: float = 1.0  # overall scale of the activations (tests input normalisation)
    seed: int = 0


class SyntheticData(NamedTuple):
    x: Tensor  # [rows, d]
    features: Tensor  # [n_features, d], unit rows
    codes: Tensor  # [rows, n_features] sparse ground-truth magnitudes (dense layout)


def generate(cfg: SyntheticConfig) -> SyntheticData:
    g = torch.Generator().manual_seed(cfg.seed)
    f = torch.randn(cfg.n_features, cfg.d, generator=g)
    f /= f.norm(dim=1, keepdim=True)
    p = 1.0 / torch.arange(1, cfg.n_features + 1).float() ** cfg.zipf
    p = (p * cfg.avg_active / p.sum()).clamp(max=1.0)
    if cfg.correlated_groups > 0:  # rows switch groups on; within an active group features fire more often
        group = torch.randperm(cfg.n_features, generator=g) % cfg.correlated_groups
        g_on = torch.rand(cfg.rows, cfg.correlated_groups, generator=g) < 0.5
        boost = g_on[:, group].float() * 2.0  # on-group features fire at 2p, off-group at 0
        active = torch.rand(cfg.rows, cfg.n_features, generator=g) < (p * boost).clamp(max=1.0)
    else:
        active = torch.rand(cfg.rows, cfg.n_features, generator=g) < p
    mags = cfg.mag_mean * (1 + cfg.mag_spread * (2 * torch.rand(cfg.rows, cfg.n_features, generator=g) - 1))
    codes = torch.where(active, mags, torch.zeros(()))
    x = codes @ f
    if cfg.bias_norm > 0:
        b = torch.randn(cfg.d, generator=g)
        x += cfg.bias_norm * b / b.norm()
    if cfg.noise > 0:
        x += cfg.noise * torch.randn(cfg.rows, cfg.d, generator=g)
    return SyntheticData(x * cfg.scale, f, codes)


def recovery(features: Tensor, W_dec: Tensor) -> float:
    """Mean over true features of the max cosine similarity to any learned decoder row."""
    f = features / features.norm(dim=1, keepdim=True)
    w = W_dec.detach().float().cpu()
    w = w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return float((f @ w.T).max(dim=1).values.mean())
