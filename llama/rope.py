"""Rotary position embeddings (RoPE) with Llama 3's frequency scaling. Tables are always float32."""
from __future__ import annotations

import math

import torch

from llama.config import ModelArgs


def rope_frequencies(args: ModelArgs, device: torch.device | str | None = None) -> torch.Tensor:
    """Per-pair rotation speeds: theta_i = rope_theta^(-2i/Dh), i < Dh/2, then llama3 scaling if enabled. -> [Dh/2]"""
    dh = args.head_dim
    freqs = 1.0 / (args.rope_theta ** (torch.arange(0, dh, 2, device=device, dtype=torch.int64).float() / dh))
    if args.use_scaled_rope:
        freqs = scale_frequencies(freqs, args)
    return freqs


def scale_frequencies(freqs: torch.Tensor, args: ModelArgs) -> torch.Tensor:
    """llama3 scaling: keep high frequencies, divide low ones by `factor`, blend smoothly in between."""
    factor, lo, hi, old_len = (args.rope_factor, args.rope_low_freq_factor, args.rope_high_freq_factor,
                               args.rope_original_max_pos)
    wavelen = 2 * math.pi / freqs
    low_freq_wavelen, high_freq_wavelen = old_len / lo, old_len / hi
    smooth = (old_len / wavelen - lo) / (hi - lo)  # 0 at the low-frequency edge, 1 at the high one
    blended = (1 - smooth) * freqs / factor + smooth * freqs
    scaled = torch.where(wavelen > low_freq_wavelen, freqs / factor, blended)
    return torch.where(wavelen < high_freq_wavelen, freqs, scaled)


def rope_tables(args: ModelArgs, start_pos: int, seqlen: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of angle = position * theta_i for positions [start_pos, start_pos+T). -> two [T, Dh/2] fp32 tables.

    Computed on the fly (a [T, Dh/2] outer product is negligible next to attention), so no buffer can ever be
    rounded by a `.to(bfloat16)` and nothing needs materialising after building the model on the meta device."""
    freqs = rope_frequencies(args, device)
    t = torch.arange(start_pos, start_pos + seqlen, device=device, dtype=torch.float32)
    angles = torch.outer(t, freqs)  # [T, Dh/2]
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each (even, odd) pair of x by its angle, as Meta does with complex numbers. x: [B, T, H, Dh]."""
    B, T, H, Dh = x.shape
    pairs = torch.view_as_complex(x.float().reshape(B, T, H, Dh // 2, 2))  # (B, T, H, Dh) -> (B, T, H, Dh/2) complex
    rot = torch.complex(cos, sin)[None, :, None, :]  # (T, Dh/2) -> (1, T, 1, Dh/2): e^(i angle)
    # (x0 + i x1) * (cos + i sin) = (x0 cos - x1 sin) + i (x0 sin + x1 cos): one fused complex multiply
    return torch.view_as_real(pairs * rot).reshape(B, T, H, Dh).type_as(x)  # back to interleaved real pairs
