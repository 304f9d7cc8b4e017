"""Regenerate tests/data/sparsify/ with EleutherAI sparsify's OWN code (eai-sparsify 1.3.3): two hookpoint folders
written by `SparseCoder.save_to_disk`, and sparsify's encode / forward outputs on fixed inputs
(`expected.safetensors`), which tests/test_sparsify_format.py compares sae.load against.

    SPARSIFY_DISABLE_TRITON=1 PYTHONPATH=<folder holding eai-sparsify and its deps> python tests/data/sparsify/make_fixture.py

(sparsify needs accelerate, datasets, simple-parsing, einops, natsort, schedulefree: install them into a separate
venv or `pip install --target` folder, never into the project's venv; torch stays the project's.)
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from sparsify import SparseCoder, SparseCoderConfig

OUT = Path(__file__).resolve().parent
D = 16


def main() -> None:
    torch.manual_seed(0)
    x = torch.randn(32, D) * 3 + 1
    expected = {"x": x}
    coders = {"layers.1": SparseCoderConfig(expansion_factor=4, k=4),
              "layers.2.mlp": SparseCoderConfig(num_latents=48, k=6)}
    for hook, cfg in coders.items():
        sae = SparseCoder(D, cfg)
        with torch.no_grad():  # non-zero biases, so that both are exercised
            sae.b_dec.normal_()
            sae.encoder.bias.normal_(0, 0.1)
        sae.save_to_disk(OUT / hook)
        with torch.no_grad():
            top_acts, top_indices, _ = sae.encode(x)
            out = sae(x)
        expected[f"{hook}/top_acts"] = top_acts.contiguous()
        expected[f"{hook}/top_indices"] = top_indices.contiguous()
        expected[f"{hook}/sae_out"] = out.sae_out.contiguous()
    save_file(expected, str(OUT / "expected.safetensors"))
    print(f"wrote {sorted(p.name for p in OUT.iterdir())}")


if __name__ == "__main__":
    main()
