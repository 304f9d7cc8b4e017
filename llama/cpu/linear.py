"""The CPU inference form of nn.Linear: y = x W^T through oneDNN, with bf16 weights pre-arranged ("packed") once.

Why: on CPU, `F.linear` in bf16 re-arranges W into the blocked, pair-interleaved layout that the bf16 dot-product
instructions read, on every call. For a prompt (many rows) that copy hides behind the arithmetic; for decode (one
row per step) it adds about half again to the product. Packing W once at load time removes it: the bf16 product of a
[1, 2048] row with an [8192, 2048] weight drops from 2.2 ms to 1.5 ms (bench/llama_forward.py shows the whole-model
effect). In fp32, oneDNN's GEMM (plain layout, nothing to pack) is itself faster than the default BLAS path.
The results are the same products: bf16 outputs matched F.linear's bit for bit when measured (tests allow bf16
rounding), fp32 agrees to float rounding.

`pack_for_cpu(model)` swaps the nn.Linear layers of a model, in place:
  - bf16 weights -> PackedLinear: the packed weight replaces the dense one (no second copy); `.weight` gives a
    dense copy back, `state_dict()` / `load_state_dict()` use dense weights under the usual names, and `.to(...)`
    works (the weight is repacked, or held dense off CPU bf16). For inference: gradients fall back to F.linear on
    a dense copy.
  - fp32 weights, and a tied output (it shares the embedding's Parameter, which the lookup needs dense) ->
    OneDNNLinear: an nn.Linear, same Parameter, whose CPU forward calls oneDNN. Nothing else changes.
LLAMA_CPU_PACK=0 turns all of it off (load_model then leaves plain nn.Linear layers).
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn


def onednn_available() -> bool:
    """oneDNN linear present in this torch build (CPU wheels have it) and not switched off by LLAMA_CPU_PACK=0."""
    if os.environ.get("LLAMA_CPU_PACK", "1").strip() == "0":
        return False
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise") \
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


def _onednn_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")  # (..., in) -> (..., out)


class OneDNNLinear(nn.Linear):
    """nn.Linear (no bias) whose forward on CPU, without autograd, runs oneDNN's GEMM on the dense weight."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.device.type != "cpu" or self.bias is not None \
                or (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)):
            return F.linear(x, self.weight, self.bias)
        return _onednn_linear(x, self.weight)


class PackedLinear(nn.Module):
    """y = x W^T (no bias) with a CPU bf16 W held packed in oneDNN's layout: the CPU inference form of nn.Linear.
    Moved or cast elsewhere (`.to`, `.float()`, `.cuda()`) it holds the dense weight and is a plain linear."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self._hold(weight.detach())

    def _hold(self, w: torch.Tensor) -> None:
        # A plain attribute, not a Parameter: a packed tensor is oneDNN's opaque layout, not a strided tensor.
        packable = w.device.type == "cpu" and w.dtype == torch.bfloat16 and onednn_available()
        self.w = torch.ops.mkldnn._reorder_linear_weight(w, 1) if packable else w  # 1: laid out for decode rows

    @property
    def packed(self) -> bool:
        return self.w.is_mkldnn

    @property
    def weight(self) -> torch.Tensor:
        """The dense [out, in] weight (a fresh copy when packed)."""
        return self.w.to_dense() if self.packed else self.w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed and not (torch.is_grad_enabled() and x.requires_grad):  # the oneDNN op has no backward
            return _onednn_linear(x, self.w)
        return F.linear(x, self.weight)

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        self._hold(fn(self.weight))  # .to(...) and friends act on the dense weight; repacked if still CPU bf16
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:  # type: ignore[no-untyped-def]
        destination[prefix + "weight"] = self.weight

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,  # type: ignore
                              unexpected_keys, error_msgs) -> None:
        key = prefix + "weight"
        if key not in state_dict:
            missing_keys.append(key)
        elif tuple(state_dict[key].shape) != (self.out_features, self.in_features):
            error_msgs.append(f"size mismatch for {key}: copying a param with shape {tuple(state_dict[key].shape)}, "
                              f"the shape in current model is {(self.out_features, self.in_features)}.")
        else:
            old = self.weight
            self._hold(state_dict[key].detach().to(device=old.device, dtype=old.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed={self.packed}"


def _swap(model: nn.Module, kind: type) -> list[tuple[nn.Module, str, nn.Module]]:
    return [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
            if type(child) is kind]


def _linear_like(weight: torch.Tensor, cls: type[nn.Linear]) -> nn.Linear:
    with torch.device("meta"):
        linear = cls(weight.shape[1], weight.shape[0], bias=False)
    linear.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight)
    return linear


def pack_for_cpu(model: nn.Module) -> int:
    """Swap the bias-free nn.Linear layers of a CPU bf16/fp32 model as described above, in place; return how many
    were swapped (0 when oneDNN is unavailable or LLAMA_CPU_PACK=0)."""
    if not onednn_available():
        return 0
    shared = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    swaps = [(p, n, c) for p, n, c in _swap(model, nn.Linear) if c.bias is None
             and c.weight.device.type == "cpu" and c.weight.dtype in (torch.bfloat16, torch.float32)]
    for parent, name, child in swaps:  # one at a time: each dense weight is freed as its packed copy appears
        packable = child.weight.dtype == torch.bfloat16 and id(child.weight) not in shared
        setattr(parent, name, PackedLinear(child.weight) if packable else _linear_like(child.weight, OneDNNLinear))
    return len(swaps)


def unpack_for_cpu(model: nn.Module) -> int:
    """Undo pack_for_cpu: plain nn.Linear layers with dense weights (a tied output keeps its shared Parameter)."""
    swaps = _swap(model, PackedLinear) + _swap(model, OneDNNLinear)
    for parent, name, child in swaps:
        setattr(parent, name, _linear_like(child.weight, nn.Linear))
    return len(swaps)


def weight_bytes(model: nn.Module) -> int:
    """Bytes of all weights, packed ones included (a shared Parameter counted once)."""
    packed = sum(m.in_features * m.out_features * m.w.element_size() for m in model.modules()
                 if isinstance(m, PackedLinear))
    return sum(p.numel() * p.element_size() for p in model.parameters()) + packed
