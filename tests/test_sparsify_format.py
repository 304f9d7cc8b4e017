"""sae.load reads EleutherAI sparsify's layout: folders written by sparsify's own save code (tests/data/sparsify,
made by make_fixture.py with eai-sparsify 1.3.3) against sparsify's own outputs, and folders built to its
documented layout against the documented maths, spliced into the tiny model at the point the folder name means."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import llama
from llama.cli import UserError
from sae import SAE, SAEConfig, export_sparsify, load, load_many
from sae.formats import hook_from_sparsify, sparsify_hookpoint

DATA = Path(__file__).resolve().parent / "data" / "sparsify"
TINY = Path(__file__).resolve().parents[1] / "weights" / "tiny"


def by_index(acts: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """A TopK code as a dense [B, n] tensor (the order of the k entries is not part of the answer)."""
    n = int(idx.max()) + 1
    return torch.zeros(acts.shape[0], max(n, 1)).scatter(1, idx, acts)


def test_files_written_by_sparsify_itself_give_sparsifys_outputs() -> None:
    ref = load_file(str(DATA / "expected.safetensors"))
    x = ref["x"]
    many = load_many(DATA)
    assert sorted(many) == ["layers.1", "layers.2.mlp"]
    for hook, point in (("layers.1", "blocks.1.hook_resid_post"), ("layers.2.mlp", "blocks.2.hook_mlp_out")):
        sae = load(DATA / hook)
        assert sae.cfg.hook_name == point and sae.cfg.architecture == "topk" and sae.cfg.normalize == "none"
        cfg = json.loads((DATA / hook / "cfg.json").read_text())
        assert sae.cfg.k == cfg["k"] and sae.cfg.d_in == cfg["d_in"] == 16
        acts, idx = sae.encode(x)
        torch.testing.assert_close(by_index(acts, idx), by_index(ref[f"{hook}/top_acts"], ref[f"{hook}/top_indices"]))
        torch.testing.assert_close(sae.decode(acts, idx), ref[f"{hook}/sae_out"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(many[hook].W_dec, sae.W_dec)


def documented_folder(path: Path, d: int, n: int, k: int, seed: int = 0, **cfg) -> dict[str, torch.Tensor]:
    """cfg.json = SparseCoderConfig fields + d_in; sae.safetensors = the module's state dict (sparsify's README)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, d, generator=g) / d ** 0.5
    t = {"encoder.weight": w, "encoder.bias": torch.randn(n, generator=g) * 0.1,
         "W_dec": w / w.norm(dim=1, keepdim=True), "b_dec": torch.randn(d, generator=g) * 0.1}
    path.mkdir(parents=True)
    save_file(t, str(path / "sae.safetensors"))
    (path / "cfg.json").write_text(json.dumps({"activation": "topk", "expansion_factor": n // d,
                                               "normalize_decoder": True, "num_latents": n, "k": k,
                                               "multi_topk": False, "skip_connection": False, "transcode": False,
                                               "d_in": d, **cfg}))
    return t


def test_documented_layout_splices_into_the_model(tmp_path: Path) -> None:
    model = llama.load_model(TINY)
    t = documented_folder(tmp_path / "run" / "layers.1", d=128, n=512, k=16)
    sae = load(tmp_path / "run" / "layers.1")
    assert sae.cfg.hook_name == "blocks.1.hook_resid_post"
    tokens = torch.tensor([llama.Tokenizer.from_file(TINY).encode("Return the next item.", bos=True, eos=False)])
    with torch.no_grad():
        h = model(tokens, capture=[sae.cfg.hook_name]).activations[sae.cfg.hook_name][0]
        pre = torch.relu((h - t["b_dec"]) @ t["encoder.weight"].T + t["encoder.bias"])  # the documented maths
        vals, idx = pre.topk(16)
        want = (vals[..., None] * t["W_dec"][idx]).sum(1) + t["b_dec"]
        acts, got_idx = sae.encode(h)
        torch.testing.assert_close(sae.decode(acts, got_idx), want, rtol=1e-4, atol=1e-4)
        spliced = model(tokens, edit={sae.cfg.hook_name: lambda a: sae.decode(*sae.encode(a)).to(a.dtype)}).logits
        assert spliced.shape == model(tokens).logits.shape and torch.isfinite(spliced).all()


def test_hookpoint_names_and_export_round_trip(tmp_path: Path) -> None:
    for ours, theirs in (("blocks.10.hook_resid_post", "layers.10"), ("blocks.3.hook_mlp_out", "layers.3.mlp"),
                         ("blocks.3.hook_attn_out", "layers.3.self_attn"), ("blocks.0.hook_resid_pre", "embed_tokens")):
        assert sparsify_hookpoint(ours) == theirs and hook_from_sparsify(theirs) == ours
    assert hook_from_sparsify("model.layers.7") == "blocks.7.hook_resid_post"
    assert sparsify_hookpoint("blocks.4.hook_resid_pre") == "layers.3"
    sae = SAE(SAEConfig(d_in=16, n_latents=64, k=4, hook_name="blocks.2.hook_resid_post"), seed=1)
    with torch.no_grad():
        sae.norm_scale.fill_(0.37)
        sae.b_dec.normal_()
    path = export_sparsify(sae, tmp_path / sparsify_hookpoint(sae.cfg.hook_name))
    back = load(path)
    x = torch.randn(20, 16) * 4
    assert back.cfg.hook_name == sae.cfg.hook_name
    torch.testing.assert_close(back.decode(*back.encode(x)), sae.decode(*sae.encode(x)), rtol=1e-5, atol=1e-5)


def test_unsupported_or_broken_sparsify_folders_are_clear_errors(tmp_path: Path) -> None:
    documented_folder(tmp_path / "t" / "layers.1", d=8, n=32, k=4, transcode=True)
    with pytest.raises(UserError, match="transcode"):
        load(tmp_path / "t" / "layers.1")
    documented_folder(tmp_path / "k" / "layers.1", d=8, n=32, k=64)
    with pytest.raises(UserError, match="inconsistent"):
        load(tmp_path / "k" / "layers.1")
    with pytest.raises(UserError, match="load_many"):
        load(DATA)  # the run folder, not a hookpoint folder
