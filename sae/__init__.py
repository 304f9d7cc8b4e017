"""sae: sparse autoencoders on the Llama residual stream.

The SAE itself lives at the top: `config.py` (SAEConfig, TrainConfig), `model.py` (TopK, BatchTopK, ReLU SAEs;
`batchtopk.py`: BatchTopK's global-batch selection),
`loss.py` (FVU, AuxK, L0 as pure functions), `ops.py` (the kernel-backed encode/decode), `train.py` (the training
loop) with `dist.py` (torchrun helpers), `evaluate.py` (FVU, L0, dead/dense, CE-loss recovered), `formats.py`
(SAELens / sparsify / legacy files), `synthetic.py` (ground-truth data) and `pipeline.py` (the demo's whole path).
Its three parts have folders of their own: `activations/` (text -> residual stream -> the store on disk; depends on
`llama` only), `steering/` (splice, steering, the measured check, the web UI) and `analysis/` (top contexts,
automated interpretation, the dashboard).
"""
from sae.config import SAEConfig, TrainConfig
from sae.formats import export_sparsify, import_legacy_pth, load, load_many, save
from sae.model import SAE, EncodeOutput, SAEOutput, TopKSAE, build_sae
from sae.activations.source import TensorSource

__all__ = ["SAEConfig", "TrainConfig", "SAE", "TopKSAE", "build_sae", "EncodeOutput", "SAEOutput", "load", "load_many",
           "save", "export_sparsify", "import_legacy_pth", "TensorSource"]
