"""llama/cpu/attention.py against SDPA in float64 (an independent computation of the same attention)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import llama
from llama.cpu.attention import causal_attention


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    Tq, S = q.shape[2], k.shape[2]
    mask = torch.ones(Tq, S, dtype=torch.bool).tril(S - Tq)  # query t at position S-Tq+t sees keys <= its position
    return F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask, enable_gqa=True)


# (B, H, KV, Tq, S, Dh): GQA and plain MHA, one block and several, a ragged last block, a chunk after a cache
SHAPES = [(1, 8, 2, 64, 64, 16), (2, 4, 2, 37, 37, 16), (1, 4, 4, 150, 150, 8), (2, 6, 3, 5, 300, 16),
          (1, 8, 2, 130, 200, 32), (3, 2, 1, 2, 2, 4)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_masked_softmax_attention(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    B, H, KV, Tq, S, Dh = shape
    g = torch.Generator().manual_seed(sum(shape))
    q = torch.randn(B, Tq, H, Dh, generator=g).to(dtype).transpose(1, 2)  # strided like the model's q
    k, v = (torch.randn(B, KV, S, Dh, generator=g).to(dtype) for _ in range(2))
    want = reference(q, k, v)
    got = causal_attention(q, k, v)
    assert got.shape == (B, H, Tq, Dh) and got.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 3e-2  # bf16: scores rounded to bf16 (as Meta's reference does)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=tol)
    if dtype == torch.bfloat16:  # and, on average, within a small factor of SDPA's own bf16 kernel
        mask = torch.ones(Tq, S, dtype=torch.bool).tril(S - Tq)
        sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        assert (got.double() - want).abs().mean() <= 4 * (sdpa.double() - want).abs().mean() + 1e-3


def test_block_size_does_not_change_the_result() -> None:
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 100, 16, generator=g)
    k, v = torch.randn(1, 2, 120, 16, generator=g), torch.randn(1, 2, 120, 16, generator=g)
    outs = [causal_attention(q, k, v, block=b) for b in (1, 7, 64, 256)]
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], rtol=1e-6, atol=1e-6)


def test_model_uses_it_without_grad_and_sdpa_with_grad() -> None:
    """The model's two attention paths (this one for no-grad CPU prompts, SDPA when training) agree."""
    torch.manual_seed(0)
    model = llama.Transformer(llama.ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=50,
                                              multiple_of=32))
    tokens = torch.randint(0, 50, (2, 70))
    with torch.no_grad():
        fast = model(tokens).logits
    sdpa = model(tokens).logits  # grad enabled: SDPA
    assert sdpa.requires_grad
    torch.testing.assert_close(fast, sdpa.detach(), rtol=1e-5, atol=1e-5)
