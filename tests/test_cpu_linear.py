"""llama/cpu/linear.py: oneDNN linear layers on CPU (bf16 packed, fp32 dense) against F.linear and nn.Linear models."""
from __future__ import annotations

import gc
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import llama
from llama.cpu.linear import OneDNNLinear, PackedLinear, onednn_available, weight_bytes

pytestmark = pytest.mark.skipif(not onednn_available(), reason="this torch build has no oneDNN (mkldnn) linear")

ARGS = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=96, multiple_of=32, ffn_dim_multiplier=None,
            norm_eps=1e-5, rope_theta=500000.0, use_scaled_rope=True)


def small_model(dtype: torch.dtype, tied: bool) -> llama.Transformer:
    torch.manual_seed(0)
    model = llama.Transformer(llama.ModelArgs(**ARGS, tie_embeddings=tied))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.1)
    return model.to(dtype).eval()


def close(got: torch.Tensor, want: torch.Tensor, rel: float) -> None:
    torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=rel * want.float().abs().max().item())


@pytest.mark.parametrize("rows", [(1,), (7,), (2, 3), (1, 1), (130,)])
def test_packed_bf16_and_onednn_fp32_equal_f_linear(rows: tuple[int, ...]) -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(80, 48, generator=g)
    x = torch.randn(*rows, 48, generator=g)
    with torch.no_grad():
        packed = PackedLinear(w.bfloat16())
        assert packed.packed and packed.w.is_mkldnn and torch.equal(packed.weight, w.bfloat16())  # packing loses nothing
        close(packed(x.bfloat16()), F.linear(x.bfloat16(), w.bfloat16()), 1e-2)  # bf16 output rounding
        close(packed(x.bfloat16()), F.linear(x.double(), w.bfloat16().double()), 1e-2)  # and the exact product
        dense = OneDNNLinear(48, 80, bias=False)
        dense.weight.copy_(w)
        close(dense(x), F.linear(x.double(), w.double()), 1e-6)


def test_gradients_fall_back_to_f_linear() -> None:
    w = torch.randn(32, 16)
    x = torch.randn(5, 16, requires_grad=True)
    packed = PackedLinear(w.bfloat16())
    (packed(x.bfloat16()).float() ** 2).sum().backward()
    want = torch.autograd.grad((F.linear(x.bfloat16(), w.bfloat16()).float() ** 2).sum(), x)[0]
    torch.testing.assert_close(x.grad, want)
    dense = OneDNNLinear(16, 32, bias=False)  # weight requires grad: the plain path, with weight gradients
    dense(torch.randn(3, 16)).sum().backward()
    assert dense.weight.grad is not None and dense.weight.grad.shape == (32, 16)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("tied", [False, True])
def test_pack_for_cpu_keeps_the_model(dtype: torch.dtype, tied: bool) -> None:
    plain = small_model(dtype, tied)
    want_state = {k: v.clone() for k, v in plain.state_dict().items()}
    tokens = torch.randint(0, 96, (2, 21), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = plain(tokens).logits
    n_bytes = weight_bytes(plain)
    assert llama.pack_for_cpu(plain) == 2 * 7 + 1  # 7 linear layers per block + the output
    kinds = {type(m) for m in plain.modules()} & {PackedLinear, OneDNNLinear, torch.nn.Linear}
    assert torch.nn.Linear not in {type(m) for m in plain.modules()}
    assert kinds == ({PackedLinear, OneDNNLinear} if dtype == torch.bfloat16 and tied
                     else {PackedLinear} if dtype == torch.bfloat16 else {OneDNNLinear})
    if tied:  # the output still is the embedding's Parameter, dense
        assert plain.output.weight is plain.tok_embeddings.weight
    assert weight_bytes(plain) == n_bytes
    got_state = plain.state_dict()
    assert sorted(got_state) == sorted(want_state) and all(torch.equal(got_state[k], want_state[k])
                                                           for k in want_state)
    with torch.no_grad():
        close(plain(tokens).logits, want, 2e-2 if dtype == torch.bfloat16 else 1e-5)
        plain.setup_caches(2, 24)  # cached decode through packed layers == the full forward
        steps = [plain(tokens[:, :12], 0).logits] + [plain(tokens[:, t:t + 1], t).logits for t in range(12, 21)]
        plain.clear_caches()
        close(torch.cat(steps, 1), plain(tokens).logits, 2e-2 if dtype == torch.bfloat16 else 1e-5)
    with torch.no_grad():  # load_state_dict into packed layers repacks the given weights
        plain.load_state_dict({k: torch.zeros_like(v) for k, v in want_state.items()})
        assert plain(tokens).logits.abs().max() == 0
        plain.load_state_dict(want_state)
        close(plain(tokens).logits, want, 2e-2 if dtype == torch.bfloat16 else 1e-5)
        with pytest.raises(RuntimeError, match="size mismatch"):
            plain.load_state_dict({**want_state, "layers.0.feed_forward.w1.weight": torch.zeros(3, 64)})
    assert llama.unpack_for_cpu(plain) == 2 * 7 + 1
    assert {type(m) for m in plain.modules()} & {PackedLinear, OneDNNLinear} == set()
    if tied:
        assert plain.output.weight is plain.tok_embeddings.weight
    plain.load_state_dict(want_state)
    with torch.no_grad():
        torch.testing.assert_close(plain(tokens).logits, want, rtol=0, atol=0)  # nn.Linear again: bit-identical


def test_a_packed_model_can_be_cast_and_moved() -> None:
    model = small_model(torch.bfloat16, tied=False)
    tokens = torch.randint(0, 96, (1, 11), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = model.float()(tokens).logits  # nn.Linear in fp32
        model.bfloat16()
        llama.pack_for_cpu(model)
        model.float()  # PackedLinear now holds the dense fp32 weight: the same fp32 model
        assert not model.layers[0].attention.wq.packed and model.layers[0].attention.wq.w.dtype == torch.float32
        torch.testing.assert_close(model(tokens).logits, want, rtol=0, atol=0)
        model.to(torch.bfloat16)  # back to bf16 on CPU: packed again
        assert model.layers[0].attention.wq.packed


def test_switch_off_with_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLAMA_CPU_PACK", "0")
    model = small_model(torch.bfloat16, tied=False)
    assert llama.pack_for_cpu(model) == 0
    assert all(type(m) is not PackedLinear for m in model.modules())


def test_load_model_packs_and_releases_the_file(tmp_path: Path) -> None:
    """bf16 load: linears packed, and no page of the checkpoint file stays mapped into the process (the packed
    copies replace the file's weights instead of sitting beside them). pack=False keeps the zero-copy mapping."""
    model = small_model(torch.bfloat16, tied=True)
    state = {k: v for k, v in model.state_dict().items() if k != "output.weight"}
    torch.save(state, tmp_path / "consolidated.00.pth")
    (tmp_path / "params.json").write_text(json.dumps(ARGS))
    maps = Path("/proc/self/maps")
    packed = llama.load_model(tmp_path, dtype=torch.bfloat16)
    gc.collect()
    assert isinstance(packed.layers[0].feed_forward.w1, PackedLinear)
    assert str(tmp_path / "consolidated.00.pth") not in maps.read_text()
    plain = llama.load_model(tmp_path, dtype=torch.bfloat16, pack=False)
    assert type(plain.layers[0].feed_forward.w1) is torch.nn.Linear
    assert str(tmp_path / "consolidated.00.pth") in maps.read_text()  # the control: mapped when not packed
    tokens = torch.randint(0, 96, (1, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        close(packed(tokens).logits, plain(tokens).logits, 2e-2)
