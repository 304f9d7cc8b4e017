"""Logits parity with Meta's reference model (llama_models/llama3/model.py, fairscale layers) on random weights.

Meta's model runs on CPU under a gloo process group of size 1 with fairscale model parallelism of size 1. Its
weights are created uninitialised (`init_method=lambda x: x`), so we fill them; its state dict is saved as a Meta
folder (params.json + consolidated.00.pth) and loaded through `llama.load_model`. Meta's code hard-codes RoPE
factor 8 (right for Llama 3.1), so scaled configs here are factor 8; unscaled configs are compared as well.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import pytest
import torch

import llama

pytest.importorskip("fairscale")
pytest.importorskip("llama_models")

SEQ = 2100  # > 2048: Meta's factor-8 scaling starts at wavelengths > 2048 (8192 / high_freq_factor 4)
VOCAB = 256


@pytest.fixture(scope="module")
def model_parallel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    import torch.distributed as dist
    from fairscale.nn.model_parallel import initialize as fs_init
    started = not dist.is_initialized()
    if started:
        store = tmp_path_factory.mktemp("pg") / "store"
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    fs_init.initialize_model_parallel(1)
    yield
    fs_init.destroy_model_parallel()
    if started:
        dist.destroy_process_group()


def meta_folder(folder: Path, params: dict, max_seq_len: int = SEQ, seed: int = 0) -> torch.nn.Module:
    """Build Meta's Transformer, fill its weights, save it as a Meta-layout folder; return the reference model."""
    from llama_models.llama3.args import ModelArgs as MetaArgs
    from llama_models.llama3.model import Transformer as MetaTransformer
    torch.manual_seed(seed)
    ref = MetaTransformer(MetaArgs(**params, max_seq_len=max_seq_len, max_batch_size=2)).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():  # std 0.1 so attention is far from uniform; random norm gains
            p.normal_(0.0, 0.1) if "norm" not in name else p.uniform_(0.5, 1.5)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(ref.state_dict(), folder / "consolidated.00.pth")
    (folder / "params.json").write_text(json.dumps(params))
    return ref


def params(**kw: object) -> dict:
    base = dict(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=VOCAB, multiple_of=64,
                ffn_dim_multiplier=1.3, norm_eps=1e-5, rope_theta=500000.0, use_scaled_rope=True)
    return {**base, **kw}


def assert_parity(ref: torch.Tensor, got: torch.Tensor) -> None:
    scale = ref.abs().max().item()
    diff = (ref.float() - got.float()).abs().max().item()
    assert scale > 1.0, "logits too small to be a meaningful comparison"
    assert diff <= 1e-4 * scale, f"max |diff| {diff:.3g} > 1e-4 x logit scale {scale:.3g}"


def tokens(batch: int = 2, seq: int = SEQ) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(1))


CASES = {
    "scaled-gqa": params(),
    "scaled-gqa1": params(n_kv_heads=1, multiple_of=256, ffn_dim_multiplier=None),
    "unscaled-mha": params(n_kv_heads=4, use_scaled_rope=False, rope_theta=10000.0),
}


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_meta(case: str, tmp_path: Path, model_parallel: None) -> None:
    ref = meta_folder(tmp_path, CASES[case])
    ours = llama.load_model(tmp_path)
    assert ours.args.rope_factor == 8.0 and not ours.args.tie_embeddings  # Meta's hard-coded factor; output present
    x = tokens()
    with torch.no_grad():
        assert_parity(ref(x, 0), ours(x).logits)


def test_cached_decode_matches_meta(tmp_path: Path, model_parallel: None) -> None:
    """Prefill then token-by-token decode through both KV caches, each step compared."""
    ref = meta_folder(tmp_path, params(), max_seq_len=64)
    ours = llama.load_model(tmp_path)
    ours.setup_caches(max_batch_size=2, max_seq_len=64)
    x = tokens(seq=40)
    with torch.no_grad():
        assert_parity(ref(x[:, :32], 0), ours(x[:, :32], 0).logits)
        for pos in range(32, 40):
            assert_parity(ref(x[:, pos:pos + 1], pos), ours(x[:, pos:pos + 1], pos).logits)


def test_meta_scaling_sensitivity(tmp_path: Path, model_parallel: None) -> None:
    """Negative control: with the wrong RoPE factor our logits leave Meta's, so the parity above means something."""
    ref = meta_folder(tmp_path, params())
    ours = llama.load_model(tmp_path)
    ours.args.rope_factor = 32.0
    x = tokens(batch=1)
    with torch.no_grad():
        want, got = ref(x, 0), ours(x).logits
    assert (want - got).abs().max().item() > 1e-2 * want.abs().max().item()


def test_meta_preset_shapes_get_their_rope_factor() -> None:
    """params.json has no RoPE factor: Llama 3.2 1B/3B shapes get 32, Llama 3.1 8B shapes get 8."""
    from llama.checkpoint_files import meta_args
    for preset, factor in (("llama-3.2-1b", 32.0), ("llama-3.2-3b", 32.0), ("llama-3.1-8b", 8.0)):
        p = llama.PRESETS[preset]()
        meta_params = dict(dim=p.dim, n_layers=p.n_layers, n_heads=p.n_heads, n_kv_heads=p.n_kv_heads,
                           vocab_size=128256, multiple_of=p.multiple_of, ffn_dim_multiplier=p.ffn_dim_multiplier,
                           norm_eps=1e-5, rope_theta=500000.0, use_scaled_rope=True)
        args = meta_args(meta_params, Path("params.json"))
        assert args.rope_factor == factor and args.ffn_hidden_dim == p.ffn_hidden_dim
