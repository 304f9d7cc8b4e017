"""Model-level behaviour: preset sizes, the residual-stream capture/edit API, stop_early, KV cache, last_only."""
from __future__ import annotations

import pytest
import torch

import llama
from llama.cli import UserError

PUBLISHED = {"llama-3.2-1b": 1_235_814_400, "llama-3.2-3b": 3_212_749_824, "llama-3.1-8b": 8_030_261_248}


@pytest.mark.parametrize("preset", list(PUBLISHED))
def test_preset_parameter_counts_are_the_published_ones(preset: str) -> None:
    with torch.device("meta"):
        model = llama.Transformer(llama.PRESETS[preset]())
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED[preset]  # a tied matrix counts once


@pytest.fixture(scope="module")
def model() -> llama.Transformer:
    torch.manual_seed(0)
    m = llama.Transformer(llama.ModelArgs(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=97, multiple_of=32,
                                          use_scaled_rope=True, rope_factor=32.0, rope_original_max_pos=64))
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0.0, 0.15)
    return m.eval()


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(1))


ALL = [f"blocks.{i}.{p}" for i in range(3) for p in ("hook_resid_pre", "hook_attn_out", "hook_mlp_out",
                                                         "hook_resid_post")]


@torch.no_grad()
def test_capture_points_are_the_residual_stream(model: llama.Transformer, tokens: torch.Tensor) -> None:
    out = model(tokens, capture=ALL)
    a = out.activations
    assert set(a) == set(ALL) and all(t.shape == (2, 24, 64) for t in a.values())
    assert torch.equal(a["blocks.0.hook_resid_pre"], model.tok_embeddings(tokens))
    for i in range(3):
        torch.testing.assert_close(a[f"blocks.{i}.hook_resid_post"], a[f"blocks.{i}.hook_resid_pre"]
                                   + a[f"blocks.{i}.hook_attn_out"] + a[f"blocks.{i}.hook_mlp_out"],
                                   rtol=0, atol=1e-6)
        if i < 2:
            assert torch.equal(a[f"blocks.{i}.hook_resid_post"], a[f"blocks.{i + 1}.hook_resid_pre"])
    torch.testing.assert_close(out.logits, model.output(model.norm(a["blocks.2.hook_resid_post"])), rtol=0, atol=0)
    # attn_out is what attention of the normed stream adds; mlp_out what the FFN of the normed mid-stream adds
    pre, attn = a["blocks.1.hook_resid_pre"], a["blocks.1.hook_attn_out"]
    torch.testing.assert_close(a["blocks.1.hook_mlp_out"],
                               model.layers[1].feed_forward(model.layers[1].ffn_norm(pre + attn)), rtol=0, atol=1e-6)
    assert torch.equal(model(tokens).logits, out.logits)  # capturing changes nothing


@torch.no_grad()
def test_identity_edit_leaves_logits_unchanged(model: llama.Transformer, tokens: torch.Tensor) -> None:
    plain = model(tokens).logits
    edited = model(tokens, edit={name: (lambda x: x) for name in ALL}).logits
    assert torch.equal(plain, edited)


@torch.no_grad()
def test_edit_replaces_the_point(model: llama.Transformer, tokens: torch.Tensor) -> None:
    """Zeroing block 1's attention output: the captured value is the edited one, downstream sees it, logits move."""
    out = model(tokens, capture=["blocks.1.hook_attn_out", "blocks.1.hook_resid_pre", "blocks.1.hook_mlp_out",
                                 "blocks.1.hook_resid_post"], edit={"blocks.1.hook_attn_out": torch.zeros_like})
    a = out.activations
    assert torch.count_nonzero(a["blocks.1.hook_attn_out"]) == 0
    torch.testing.assert_close(a["blocks.1.hook_resid_post"], a["blocks.1.hook_resid_pre"] + a["blocks.1.hook_mlp_out"],
                               rtol=0, atol=1e-6)
    assert not torch.allclose(out.logits, model(tokens).logits)
    # an edit of resid_post in the last block changes the logits exactly as predicted
    shift = torch.randn(64)
    steered = model(tokens, edit={"blocks.2.hook_resid_post": lambda x: x + shift}).logits
    resid = model(tokens, capture=["blocks.2.hook_resid_post"]).activations["blocks.2.hook_resid_post"]
    torch.testing.assert_close(steered, model.output(model.norm(resid + shift)), rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_stop_early_equals_full_run_and_stops(model: llama.Transformer, tokens: torch.Tensor) -> None:
    calls: list[int] = []
    hooks = [layer.register_forward_hook(lambda m, i, o, k=k: calls.append(k)) for k, layer in enumerate(model.layers)]
    hooks.append(model.output.register_forward_hook(lambda m, i, o: calls.append(-1)))
    try:
        want = ["blocks.0.hook_mlp_out", "blocks.1.hook_resid_post"]
        full = model(tokens, capture=want)
        assert calls == [0, 1, 2, -1]
        calls.clear()
        early = model(tokens, capture=want, stop_early=True)
        assert calls == [0, 1] and early.logits is None  # block 2 and the unembedding never ran
    finally:
        for h in hooks:
            h.remove()
    for name in want:
        assert torch.equal(early.activations[name], full.activations[name])


@torch.no_grad()
def test_cached_decode_and_last_only_equal_a_full_forward(model: llama.Transformer, tokens: torch.Tensor) -> None:
    full = model(tokens).logits
    model.setup_caches(max_batch_size=2, max_seq_len=32)
    try:
        steps = [model(tokens[:, :10], 0).logits]
        steps += [model(tokens[:, t:t + 1], t).logits for t in range(10, 24)]
    finally:
        model.clear_caches()
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model(tokens, last_only=True).logits, full[:, -1:], rtol=1e-5, atol=1e-5)
    # without a cache, start_pos shifts RoPE: relative positions are unchanged, so logits are too (RoPE invariance)
    torch.testing.assert_close(model(tokens, 5).logits, full, rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_last_only_prefill_fills_the_same_cache(model: llama.Transformer, tokens: torch.Tensor) -> None:
    """last_only skips the final layer's queries and feed-forward except at the last position; the cache it leaves
    (keys/values of every position in every layer) and everything decoded after it match a full prefill's."""
    full = model(tokens).logits
    caches = []
    for last_only in (False, True):
        model.setup_caches(max_batch_size=2, max_seq_len=32)
        try:
            first = model(tokens[:, :10], 0, last_only=last_only).logits
            chunk = model(tokens[:, 10:15], 10, last_only=last_only).logits  # 5 queries after 10 cached: masked
            rest = [model(tokens[:, t:t + 1], t).logits for t in range(15, 24)]
            caches.append([(layer.attention.cache.k.clone(), layer.attention.cache.v.clone()) for layer in model.layers])
        finally:
            model.clear_caches()
        assert first.shape[1] == (1 if last_only else 10) and chunk.shape[1] == (1 if last_only else 5)
        torch.testing.assert_close(first[:, -1], full[:, 9], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(chunk[:, -1], full[:, 14], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(torch.cat(rest, dim=1), full[:, 15:], rtol=1e-5, atol=1e-5)
    for (k0, v0), (k1, v1) in zip(*caches):
        torch.testing.assert_close(k1, k0, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(v1, v0, rtol=1e-6, atol=1e-6)
    # a capture or edit in the final layer still sees (and changes) every position
    out = model(tokens, capture=["blocks.2.hook_mlp_out"], edit={"blocks.2.hook_resid_pre": lambda h: h * 0.5},
                last_only=True)
    ref = model(tokens, capture=["blocks.2.hook_mlp_out"], edit={"blocks.2.hook_resid_pre": lambda h: h * 0.5})
    assert out.activations["blocks.2.hook_mlp_out"].shape == (2, 24, 64)
    torch.testing.assert_close(out.logits, ref.logits[:, -1:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.activations["blocks.2.hook_mlp_out"], ref.activations["blocks.2.hook_mlp_out"])


def test_unknown_points_are_user_errors(model: llama.Transformer, tokens: torch.Tensor) -> None:
    for bad in ("blocks.3.hook_resid_pre", "blocks.0.hook_resid_mid", "resid_pre", "blocks.x.hook_attn_out"):
        with pytest.raises(UserError, match="blocks.0.hook_resid_post"):
            model(tokens, capture=[bad])
    with pytest.raises(UserError, match="unknown capture point"):
        model(tokens, edit={"blocks.9.hook_mlp_out": lambda x: x})
    assert model.valid_points() == ALL
