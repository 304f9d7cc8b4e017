"""Fast SAE ops with one public function each, dispatched at call time.

    kernels.sparse_decode(top_acts [B,k], top_indices [B,k] long, W_dec [n,d]) -> [B,d]
    kernels.topk(x [B,n], k) -> TopK(values [B,k], indices [B,k])
    kernels.decode_weight_grad(grad_out [B,d], top_acts [B,k], top_indices [B,k], n) -> [n,d]

Backend per call (`kernels.backend(*tensors)` says which):
- "reference" (`kernels/reference.py`, pure PyTorch) when LLAMA_SAE_KERNELS=reference, when triton is not
  installed, for float64, or for CPU tensors without the Triton interpreter;
- "triton" on CUDA tensors, and on CPU tensors when TRITON_INTERPRET=1 (tests).
LLAMA_SAE_KERNELS=triton forces Triton and raises if it cannot run. Top-k is the exception: on the "triton" backend
it still runs torch.topk unless LLAMA_SAE_TOPK=triton, until a GPU measures our kernel faster (bench/gpu.py times
both; kernels/topk.py gives its design and cost on paper). TRITON_INTERPRET=1 only works if it is set
before triton is imported (triton's own library is built in that mode at import); kernels imports triton when
kernels itself is imported. Importing prints nothing and works without triton. LLAMA_SAE_CHECK_INDICES=1 range-checks
decode indices without a host sync (off by default: a failed check on CUDA is a device-side assert).
"""
from __future__ import annotations

import os

import torch

from kernels import reference
from kernels.reference import TopK

try:  # the submodules share the public functions' names; these defs below rebind the package attributes
    from kernels import sparse_decode as _triton_decode
    from kernels import topk as _triton_topk
    TRITON_ERROR: str | None = None
except ImportError as e:  # triton not installed (or not importable): the reference serves every call
    _triton_decode = _triton_topk = None  # type: ignore[assignment]
    TRITON_ERROR = f"triton is not importable ({e})"

_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_MODES = ("auto", "reference", "triton")


def _env_on(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def interpreter_ready() -> bool:
    """TRITON_INTERPRET=1 now, and triton was imported in interpreter mode (so kernels can run on CPU)."""
    if TRITON_ERROR is not None or not _env_on("TRITON_INTERPRET"):
        return False
    from triton.runtime.interpreter import InterpretedFunction
    return isinstance(_triton_decode._decode_fwd_kernel, InterpretedFunction)


def _why_not_triton(tensors: tuple[torch.Tensor, ...]) -> str | None:
    if TRITON_ERROR is not None:
        return TRITON_ERROR
    if any(t.is_floating_point() and t.dtype not in _TRITON_DTYPES for t in tensors):
        return f"dtype not in {_TRITON_DTYPES}"
    if all(t.is_cuda for t in tensors):
        return None
    if all(t.device.type == "cpu" for t in tensors):
        if interpreter_ready():
            return None
        if _env_on("TRITON_INTERPRET"):
            return "TRITON_INTERPRET=1 was set after triton was imported (set it before importing kernels)"
        return "CPU tensors need TRITON_INTERPRET=1"
    return "tensors are on mixed or unsupported devices"


def backend(*tensors: torch.Tensor) -> str:
    """"triton" or "reference": what a kernels call on these tensors would use now (see module docstring)."""
    mode = os.environ.get("LLAMA_SAE_KERNELS", "auto").strip().lower() or "auto"
    if mode not in _MODES:
        raise ValueError(f"LLAMA_SAE_KERNELS must be one of {_MODES}, got {mode!r}")
    if mode == "reference":
        return "reference"
    why = _why_not_triton(tensors)
    if why is None:
        return "triton"
    if mode == "triton":
        raise RuntimeError(f"LLAMA_SAE_KERNELS=triton but the Triton kernels cannot run: {why}")
    return "reference"


def sparse_decode(top_acts: torch.Tensor, top_indices: torch.Tensor, W_dec: torch.Tensor) -> torch.Tensor:
    """out[b] = sum_j top_acts[b, j] * W_dec[top_indices[b, j]] -> [B, d] in W_dec's dtype, accumulated in fp32
    on the Triton path. Differentiable in top_acts and W_dec. Indices must lie in [0, n): checked only with
    LLAMA_SAE_CHECK_INDICES=1 (asynchronously, no host sync: `reference.check_indices_async`)."""
    reference.check_decode_args(top_acts, top_indices, W_dec)
    if _env_on("LLAMA_SAE_CHECK_INDICES"):
        reference.check_indices_async(top_indices, W_dec.shape[0])
    if backend(top_acts, top_indices, W_dec) == "triton":
        return _triton_decode.sparse_decode(top_acts, top_indices, W_dec)
    return reference.sparse_decode(top_acts, top_indices, W_dec)


def decode_weight_grad(grad_out: torch.Tensor, top_acts: torch.Tensor, top_indices: torch.Tensor,
                       n_latents: int) -> torch.Tensor:
    """[n, d]: row i = sum over (b, j) with top_indices[b, j] == i of top_acts[b, j] * grad_out[b], in grad_out's
    dtype; rows never selected are exactly zero. The W_dec gradient of sparse_decode, called directly (the
    encoder's weight gradient is the same op with grad_out = its input)."""
    reference.check_decode_args(top_acts, top_indices, grad_out)
    if _env_on("LLAMA_SAE_CHECK_INDICES"):
        reference.check_indices_async(top_indices, n_latents, "decode_weight_grad")
    if backend(grad_out, top_acts, top_indices) == "triton":
        return _triton_decode.decode_backward_w(grad_out.contiguous(), top_acts.contiguous(),
                                                top_indices.contiguous(), n_latents, grad_out.dtype)
    return reference.decode_weight_grad(grad_out, top_acts, top_indices, n_latents)


def topk_backend(x: torch.Tensor) -> str:
    """"triton" only when LLAMA_SAE_TOPK=triton (and Triton can run on x); else "reference" (torch.topk)."""
    general = backend(x)  # validates LLAMA_SAE_KERNELS
    return general if os.environ.get("LLAMA_SAE_TOPK", "").strip().lower() == "triton" else "reference"


def topk(x: torch.Tensor, k: int) -> TopK:
    """Row-wise top-k of x [B, n]: TopK(values [B, k] largest first, indices [B, k] int64); the values are
    differentiable in x like torch.topk (gradient scattered back to the kept positions).

    Runs torch.topk unless LLAMA_SAE_TOPK=triton (see the module docstring). The set of values always equals
    torch.topk's. Ties: the Triton path keeps the lowest indices among equal values (and orders them by index);
    torch.topk's choice among ties is unspecified, so indices may differ from it only where values tie. Both
    rank -0.0 equal to +0.0 and every NaN (whatever its sign bit) above +inf; the returned values are the
    input's own (a -0.0 stays -0.0). The Triton path supports k <= 1024 (AuxK widths up to d/2 at d=2048);
    larger k uses torch.topk. The env switch is read at every call.
    """
    reference.check_topk_args(x, k)
    if topk_backend(x) == "triton" and k <= _triton_topk.MAX_K:
        return TopK(*_triton_topk.topk(x, k))
    return reference.topk(x, k)


__all__ = ["sparse_decode", "decode_weight_grad", "topk", "topk_backend", "TopK", "backend", "interpreter_ready",
           "reference"]
