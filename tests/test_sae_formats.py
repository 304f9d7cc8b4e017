"""SAE files: SAELens folder round trip and its raw-space formula, sparsify export, earlier-project .pth import."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llama.cli import UserError
from sae import SAE, SAEConfig, export_sparsify, import_legacy_pth, load, save


def trained_like(arch: str = "topk", normalize: str = "scalar") -> SAE:
    torch.manual_seed(0)
    m = SAE(SAEConfig(d_in=12, n_latents=40, k=3, architecture=arch, normalize=normalize,
                      hook_name="blocks.1.hook_resid_post", model="weights/tiny"), seed=2)
    with torch.no_grad():
        m.W_enc.add_(0.3 * torch.randn_like(m.W_enc))
        m.b_enc.normal_(0, 0.2)
        m.b_dec.normal_(0, 0.5)
        m.norm_scale.fill_(0.05)  # activations of norm ~ 70 for d=12
        m.threshold.fill_(0.4)
    return m.eval()


def saelens_topk(t: dict[str, torch.Tensor], k: int, x: torch.Tensor) -> torch.Tensor:
    """SAELens' TopK SAE by its formula, straight from the file's tensors (raw activations in and out)."""
    pre = (x - t["b_dec"]) @ t["W_enc"] + t["b_enc"]
    v, i = pre.topk(k, dim=-1)
    z = torch.zeros_like(pre).scatter(-1, i, torch.relu(v))
    return z @ t["W_dec"] + t["b_dec"]


def test_saelens_folder_round_trip_and_formula(tmp_path: Path) -> None:
    m = trained_like()
    x = torch.randn(20, 12) * 20
    save(m, tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert (cfg["architecture"], cfg["d_in"], cfg["d_sae"], cfg["k"]) == ("topk", 12, 40, 3)
    assert cfg["hook_name"] == cfg["metadata"]["hook_name"] == "blocks.1.hook_resid_post"
    assert cfg["normalize_activations"] == "none"
    # shared files name the model, never a path of the machine that trained them; the local path stays for tools
    assert cfg["model_name"] == cfg["metadata"]["model_name"] == "tiny" and cfg["llama_sae"]["model"] == "weights/tiny"
    assert cfg["llama_sae"]["norm_scale"] == pytest.approx(0.05)
    t = load_file(str(tmp_path / "sae_weights.safetensors"))
    assert t["W_enc"].shape == (12, 40) and t["W_dec"].shape == (40, 12)
    torch.testing.assert_close(saelens_topk(t, 3, x), m(x).x_hat, atol=1e-4, rtol=1e-5)  # scale folded in
    back = load(tmp_path)
    assert back.cfg == m.cfg
    torch.testing.assert_close(back.W_dec.norm(dim=1), torch.ones(40))  # unfolded to unit rows again
    torch.testing.assert_close(back(x).x_hat, m(x).x_hat, atol=1e-4, rtol=1e-5)


def test_token_normalisation_is_saelens_layer_norm(tmp_path: Path) -> None:
    """normalize="token" exports as SAELens' `layer_norm`: (x - mean) / (std + 1e-5) in, x_hat * std + mean out,
    with torch's default (unbiased) std (SAELens' run_time_activation_ln_in/out). Our SAE's output must be that
    formula applied to the exported file."""
    m = trained_like(normalize="token")
    x = torch.randn(20, 12) * 20 + 3
    save(m, tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert cfg["normalize_activations"] == "layer_norm" and cfg["apply_b_dec_to_input"]
    t = load_file(str(tmp_path / "sae_weights.safetensors"))
    mu = x.mean(-1, keepdim=True)
    std = (x - mu).std(-1, keepdim=True)
    want = saelens_topk(t, cfg["k"], (x - mu) / (std + 1e-5)) * std + mu
    torch.testing.assert_close(m(x).x_hat, want, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(load(tmp_path)(x).x_hat, want, atol=1e-4, rtol=1e-5)


def test_batchtopk_saves_as_jumprelu(tmp_path: Path) -> None:
    m = trained_like("batchtopk")
    x = torch.randn(20, 12) * 20
    save(m, tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    t = load_file(str(tmp_path / "sae_weights.safetensors"))
    assert cfg["architecture"] == "jumprelu"
    pre = (x - t["b_dec"]) @ t["W_enc"] + t["b_enc"]
    want = (pre * (pre > t["threshold"])) @ t["W_dec"] + t["b_dec"]  # SAELens JumpReLU formula
    torch.testing.assert_close(m(x).x_hat, want, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(load(tmp_path)(x).x_hat, want, atol=1e-4, rtol=1e-5)


def test_sparsify_export(tmp_path: Path) -> None:
    m = trained_like()
    x = torch.randn(20, 12) * 20
    export_sparsify(m, tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert (cfg["num_latents"], cfg["k"], cfg["d_in"]) == (40, 3, 12)
    t = load_file(str(tmp_path / "sae.safetensors"))
    pre = torch.relu((x - t["b_dec"]) @ t["encoder.weight"].T + t["encoder.bias"])  # sparsify's formula
    v, i = pre.topk(3, dim=-1)
    got = torch.zeros_like(pre).scatter(-1, i, v) @ t["W_dec"] + t["b_dec"]
    torch.testing.assert_close(got, m(x).x_hat, atol=1e-4, rtol=1e-5)
    with pytest.raises(UserError, match="sparsify"):
        export_sparsify(trained_like(normalize="token"), tmp_path / "no")


def test_import_earlier_project_pth(tmp_path: Path) -> None:
    torch.manual_seed(0)
    d, n, k = 12, 30, 4
    enc, dec = torch.nn.Linear(d, n), torch.nn.Linear(n, d, bias=False)
    b_pre = torch.randn(d) * 0.1
    sd = {"b_pre": b_pre, "encoder.weight": enc.weight.data, "encoder.bias": enc.bias.data,
          "decoder.weight": dec.weight.data}
    torch.save({"state_dict": sd}, tmp_path / "sae.pth")
    x = torch.randn(10, d) * 5 + 2

    mu, sd_ = x.mean(-1, keepdim=True), x.std(-1, keepdim=True, unbiased=False) + 1e-5
    xs = (x - mu) / sd_  # the earlier project's per-token standardisation, then its TopK SAE
    pre = torch.relu(enc(xs - b_pre))
    v, i = pre.topk(k, dim=-1)
    want = (dec(torch.zeros_like(pre).scatter(-1, i, v)) + b_pre) * sd_ + mu

    m = import_legacy_pth(tmp_path / "sae.pth", k=k, hook_name="blocks.3.hook_resid_post")
    torch.testing.assert_close(m(x).x_hat, want.detach(), atol=1e-5, rtol=1e-5)
    save(m, tmp_path / "ours")
    torch.testing.assert_close(load(tmp_path / "ours")(x).x_hat, want.detach(), atol=1e-5, rtol=1e-5)
    torch.save({"encoder.weight": enc.weight.data}, tmp_path / "bad.pth")
    with pytest.raises(UserError, match="expected keys"):
        import_legacy_pth(tmp_path / "bad.pth", k=k)


def test_bad_folder_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="cfg.json"):
        load(tmp_path)
    save(trained_like(), tmp_path)
    (tmp_path / "cfg.json").write_text("{not json")
    with pytest.raises(UserError, match="JSON"):
        load(tmp_path)
