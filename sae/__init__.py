"""sae: sparse autoencoders on the Llama residual stream (model, training, evaluation, file formats)."""
from sae.config import SAEConfig, TrainConfig
from sae.formats import export_sparsify, import_legacy_pth, load, save
from sae.model import SAE, EncodeOutput, SAEOutput, TopKSAE, build_sae
from sae.source import TensorSource

__all__ = ["SAEConfig", "TrainConfig", "SAE", "TopKSAE", "build_sae", "EncodeOutput", "SAEOutput", "load", "save",
           "export_sparsify", "import_legacy_pth", "TensorSource"]
