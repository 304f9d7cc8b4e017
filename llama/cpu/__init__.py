"""llama.cpu: CPU inference fast paths, kept apart from the model a student reads.

What lives here: `linear.py` (linear layers on oneDNN, bf16 weights packed once as they load), `attention.py`
(block-causal grouped-query attention for no-grad CPU prompts) and `malloc.py` (glibc thresholds so activations are
not re-mapped every forward). The seam is narrow: `llama/model.py` calls `causal_attention` at one line and
`llama/checkpoint.py` calls `pack_for_cpu` / `PackedLinear` / `keep_freed_memory` when it loads on CPU; the maths
is the plain PyTorch of model.py, and each fast path is tested against it. May import torch and `llama.cli` only.
Switches: LLAMA_CPU_PACK=0, LLAMA_CPU_MALLOC=0.
"""
from llama.cpu.attention import causal_attention
from llama.cpu.linear import OneDNNLinear, PackedLinear, onednn_available, pack_for_cpu, unpack_for_cpu, weight_bytes
from llama.cpu.malloc import keep_freed_memory

__all__ = ["causal_attention", "OneDNNLinear", "PackedLinear", "onednn_available", "pack_for_cpu", "unpack_for_cpu",
           "weight_bytes", "keep_freed_memory"]
