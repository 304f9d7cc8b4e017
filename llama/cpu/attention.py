"""Causal GQA attention for prompts on CPU, as a few large matrix products instead of many small ones.

    y = softmax(q k^T / sqrt(Dh) + causal mask) v     for the Tq newest of S positions (S - Tq already cached)

PyTorch's CPU scaled_dot_product_attention works head by head, so the H/KV query heads that read the same key/value
head each multiply it separately, in small blocks. Here the G = H/KV query heads of a group are stacked into one
matrix and multiply their shared keys once (one bmm per block of queries), and each block of queries only meets the
keys it may see (the causal half is skipped block-wise). For a 512-token Llama-3.2-1B layer this takes 6.5 ms
against SDPA's 15 ms in bf16, 10 ms against 14 ms in fp32 (2 cores; blocks of 64 queries beat 128 and 256).
Scores are rounded to the input dtype before the softmax (computed in fp32 inside the kernel), as in Meta's
reference model: `torch.matmul(xq, keys.transpose(2, 3))` in bf16, then `softmax(scores.float())`.
Used without autograd only (model.py keeps SDPA for training and for decode steps, where Tq = 1).
"""
from __future__ import annotations

import torch


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block: int = 64) -> torch.Tensor:
    """q (B, H, Tq, Dh), k and v (B, KV, S, Dh) with S >= Tq -> (B, H, Tq, Dh); query t sits at position S-Tq+t."""
    B, H, Tq, Dh = q.shape
    KV, S = k.shape[1], k.shape[2]
    G, past = H // KV, S - Tq
    qg = (q * Dh ** -0.5).reshape(B * KV, G, Tq, Dh)  # (B, H, Tq, Dh) -> (B*KV, G, Tq, Dh): heads grouped by KV head
    k, v = k.reshape(B * KV, S, Dh), v.reshape(B * KV, S, Dh)  # (B, KV, S, Dh) -> (B*KV, S, Dh)
    out = torch.empty(B * KV, G, Tq, Dh, dtype=q.dtype, device=q.device)
    hidden = torch.full((block, block), float("-inf"), dtype=q.dtype, device=q.device).triu(1)  # -inf above diagonal
    for s in range(0, Tq, block):
        e = min(s + block, Tq)
        n, seen = e - s, past + e  # n queries; together they see keys [0, seen)
        qb = qg[:, :, s:e].reshape(B * KV, G * n, Dh)  # (B*KV, G, n, Dh) -> (B*KV, G*n, Dh)
        scores = torch.bmm(qb, k[:, :seen].transpose(1, 2)).view(B * KV, G, n, seen)  # q k^T / sqrt(Dh)
        scores[..., past + s:seen] += hidden[:n, :n]  # query t may not see keys after position past+s+t
        probs = torch.softmax(scores, dim=-1).view(B * KV, G * n, seen)  # bf16 in and out, computed in fp32
        out[:, :, s:e] = torch.bmm(probs, v[:, :seen]).view(B * KV, G, n, Dh)  # weighted sum of values
    return out.view(B, H, Tq, Dh)  # (B*KV, G, Tq, Dh) -> (B, H, Tq, Dh): head h = kv*G + g, as in GQA
