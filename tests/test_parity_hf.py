"""Logits parity with HF transformers' LlamaForCausalLM (an independent implementation) on random weights.

HF writes the folder with its own `save_pretrained` (its names, its rotate-half q/k layout, its config.json RoPE
fields); we load that folder through `llama.load_model` and compare fp32 logits on sequences of >= 2048 positions,
where llama3 low-frequency RoPE scaling matters. Negative controls show the comparison would catch a wrong RoPE
factor or a q/k permutation left undone.
"""
from __future__ import annotations

import gc
import json
from pathlib import Path


import pytest
import torch

import llama
import llama.checkpoint_files as ckpt
from llama.tiny.random_weights import write_random_safetensors

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

SEQ = 2100  # > 2048 positions: low frequencies rotate by a meaningful angle only far out
VOCAB = 256


def llama3_rope(factor: float, original: int, theta: float = 500000.0) -> dict:
    return {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": original, "rope_theta": theta}


def hf_model(*, n_kv_heads: int, tied: bool, rope: dict, n_heads: int = 4, dim: int = 128, seed: int = 0,
             dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    """Tiny random LlamaForCausalLM. std 0.1 weights and random norm gains so attention is far from uniform."""
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=dim, intermediate_size=320, num_hidden_layers=2,
                      num_attention_heads=n_heads, num_key_value_heads=n_kv_heads, rope_parameters=rope,
                      tie_word_embeddings=tied, max_position_embeddings=4096, rms_norm_eps=1e-5,
                      initializer_range=0.1, attn_implementation="eager")
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0.0, 0.1) if "norm" not in name else p.uniform_(0.5, 1.5)
    return model.to(dtype)


def hf_logits(model: LlamaForCausalLM, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).logits.float()


def our_logits(model: llama.Transformer, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).logits.float()


def assert_parity(ref: torch.Tensor, got: torch.Tensor) -> None:
    scale = ref.abs().max().item()
    diff = (ref - got).abs().max().item()
    assert scale > 1.0, "logits too small to be a meaningful comparison"
    assert diff <= 1e-4 * scale, f"max |diff| {diff:.3g} > 1e-4 x logit scale {scale:.3g}"


def tokens(batch: int = 2, seq: int = SEQ, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


CASES = {  # name: (hf_model kwargs, save_pretrained kwargs)
    "factor32-gqa-tied": (dict(n_kv_heads=2, tied=True, rope=llama3_rope(32.0, 256)), {}),
    "factor8-gqa1-untied-sharded": (dict(n_kv_heads=1, tied=False, rope=llama3_rope(8.0, 512)),
                                    dict(max_shard_size="100KB")),
    "factor32-mha-untied": (dict(n_kv_heads=4, tied=False, rope=llama3_rope(32.0, 128, theta=10000.0)), {}),
    "no-scaling-gqa-tied": (dict(n_kv_heads=2, tied=True, rope={"rope_type": "default", "rope_theta": 10000.0}), {}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_hf(case: str, tmp_path: Path) -> None:
    model_kw, save_kw = CASES[case]
    hf = hf_model(**model_kw)
    hf.save_pretrained(tmp_path, **save_kw)
    if "sharded" in case:
        assert (tmp_path / "model.safetensors.index.json").exists() and len(list(tmp_path.glob("model-*.safetensors"))) > 1
    ours = llama.load_model(tmp_path, dtype=torch.float32)
    assert ours.args.tie_embeddings == model_kw["tied"]
    assert ours.args.n_kv_heads == model_kw["n_kv_heads"]
    x = tokens()
    assert_parity(hf_logits(hf, x), our_logits(ours, x))


def test_legacy_rope_scaling_config(tmp_path: Path) -> None:
    """transformers 4 wrote `rope_scaling` + top-level `rope_theta`; both spellings must load identically."""
    hf = hf_model(n_kv_heads=2, tied=True, rope=llama3_rope(32.0, 256, theta=200000.0))
    hf.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    rope = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rope.pop("rope_theta")
    cfg["rope_scaling"] = rope
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    ours = llama.load_model(tmp_path)
    assert (ours.args.rope_theta, ours.args.rope_factor, ours.args.rope_original_max_pos) == (200000.0, 32.0, 256)
    x = tokens(batch=1)
    assert_parity(hf_logits(hf, x), our_logits(ours, x))


def test_bf16_checkpoint_loads_exactly_as_fp32(tmp_path: Path) -> None:
    """A bf16 file converted to fp32 at load time equals HF's fp32 model of the same (bf16-representable) weights.
    (The reference is a fresh fp32 model given the weights: `.to(bfloat16)` would also round HF's RoPE buffer.)"""
    kw = dict(n_kv_heads=2, tied=False, rope=llama3_rope(32.0, 256))
    hf16 = hf_model(**kw, dtype=torch.bfloat16)
    hf16.save_pretrained(tmp_path)
    ref = hf_model(**kw, seed=123)
    ref.load_state_dict({k: v.float() for k, v in hf16.state_dict().items()})
    ours = llama.load_model(tmp_path, dtype=torch.float32)
    assert ours.tok_embeddings.weight.dtype == torch.float32
    assert_parity(hf_logits(ref, tokens(batch=1)), our_logits(ours, tokens(batch=1)))


def test_capture_points_are_hf_hidden_states(tmp_path: Path) -> None:
    """resid_pre of block i is HF's hidden_states[i] (the stream entering decoder layer i); attn_out and mlp_out
    are the outputs of HF's self_attn and mlp modules (what each adds to the stream)."""
    hf = hf_model(n_kv_heads=2, tied=True, rope=llama3_rope(32.0, 256))
    hf.save_pretrained(tmp_path)
    ours = llama.load_model(tmp_path)
    x = tokens(batch=1, seq=300)
    seen: dict[str, torch.Tensor] = {}
    hooks = []
    for i, layer in enumerate(hf.model.layers):
        hooks.append(layer.self_attn.register_forward_hook(
            lambda m, a, o, i=i: seen.__setitem__(f"blocks.{i}.hook_attn_out", o[0])))
        hooks.append(layer.mlp.register_forward_hook(lambda m, a, o, i=i: seen.__setitem__(f"blocks.{i}.hook_mlp_out", o)))
    with torch.no_grad():
        states = hf(x, output_hidden_states=True).hidden_states
        acts = ours(x, capture=ours.valid_points()).activations
    for h in hooks:
        h.remove()
    for i in range(2):
        torch.testing.assert_close(acts[f"blocks.{i}.hook_resid_pre"], states[i], rtol=1e-5, atol=1e-5)
        for point in ("hook_attn_out", "hook_mlp_out"):
            torch.testing.assert_close(acts[f"blocks.{i}.{point}"], seen[f"blocks.{i}.{point}"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(acts["blocks.0.hook_resid_post"], states[1], rtol=1e-5, atol=1e-5)


def test_negative_controls_wrong_factor_or_no_unpermute_break_parity(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The parity check is sensitive to the two things most easily got wrong: the RoPE factor and the q/k rows."""
    hf = hf_model(n_kv_heads=2, tied=True, rope=llama3_rope(32.0, 256))
    hf.save_pretrained(tmp_path)
    x = tokens(batch=1)
    ref = hf_logits(hf, x)
    scale = ref.abs().max().item()

    wrong_factor = llama.load_model(tmp_path)
    wrong_factor.args.rope_factor = 8.0  # rope tables are computed on the fly from args
    assert (our_logits(wrong_factor, x) - ref).abs().max().item() > 1e-2 * scale

    monkeypatch.setattr(ckpt, "unpermute_rotate_half", lambda w, *a, **k: w)
    not_unpermuted = llama.load_model(tmp_path)
    assert (our_logits(not_unpermuted, x) - ref).abs().max().item() > 1e-2 * scale


@pytest.mark.slow
def test_real_shape_llama_3_2_1b_matches_hf(tmp_path: Path) -> None:
    """Full Llama-3.2-1B dimensions (vocab 128256, dim 2048, 16 layers, 32/8 heads, tied, factor-32 RoPE) with random
    bf16 weights written in HF layout; HF and we each load it in fp32, one after the other (RAM ~6 GB at most)."""
    args = llama.ModelArgs.llama_3_2_1b()
    cfg = LlamaConfig(vocab_size=args.vocab_size, hidden_size=args.dim, intermediate_size=args.ffn_hidden_dim,
                      num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads,
                      num_key_value_heads=args.n_kv_heads, rms_norm_eps=1e-5, tie_word_embeddings=True,
                      max_position_embeddings=131072, rope_parameters=llama3_rope(32.0, 8192),
                      bos_token_id=128000, eos_token_id=128001)
    cfg.save_pretrained(tmp_path)
    shapes = {"model.embed_tokens.weight": (args.vocab_size, args.dim), "model.norm.weight": (args.dim,)}
    q, kv, f = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim, args.ffn_hidden_dim
    for i in range(args.n_layers):
        for name, shape in {"self_attn.q_proj": (q, args.dim), "self_attn.k_proj": (kv, args.dim),
                            "self_attn.v_proj": (kv, args.dim), "self_attn.o_proj": (args.dim, q),
                            "mlp.gate_proj": (f, args.dim), "mlp.up_proj": (f, args.dim),
                            "mlp.down_proj": (args.dim, f), "input_layernorm": (args.dim,),
                            "post_attention_layernorm": (args.dim,)}.items():
            shapes[f"model.layers.{i}.{name}.weight"] = shape
    write_random_safetensors(tmp_path / "model.safetensors", shapes, gain=2.0)
    x = torch.randint(0, args.vocab_size, (1, 12), generator=torch.Generator().manual_seed(1))

    hf, info = LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, attn_implementation="eager",
                                                output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    ref = hf_logits(hf.eval(), x)
    del hf
    gc.collect()

    ours = llama.load_model(tmp_path, dtype=torch.float32)
    assert ours.args.ffn_hidden_dim == 8192 and ours.args.rope_factor == 32.0 and ours.args.tie_embeddings
    assert (ours.args.multiple_of, ours.args.ffn_dim_multiplier) == (256, 1.5)  # read back as the preset's rule
    assert_parity(ref, our_logits(ours, x))
