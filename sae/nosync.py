"""Training steps that never make the host wait for the GPU, and a CPU-side check that they do not.

A CUDA step is fast only while the host runs ahead of the device, queueing kernels. Anything that reads a
device value on the host (`.item()`, `bool(t)`, `int(t)`, `float(t)`, `.tolist()`), or that needs one to size
its output (boolean-mask indexing, `nonzero`, `bincount`, `unique`, `repeat_interleave` without output_size), or
a blocking copy from host memory (`torch.tensor(python_list, device=cuda)`) stalls the queue until the device
catches up. A non-logging training step has none of these (bench/gpu.py checks it on the card with
`torch.cuda.set_sync_debug_mode("error")`); logging steps convert the step's statistics once.

- `DeadLatentBound`: a host-side upper bound on the number of dead latents, so that AuxK is sized without
  reading the dead mask (see SAE.forward's `n_dead_bound`).
- `HostSyncGuard`: a TorchDispatchMode that raises HostSyncError at every op that would sync on CUDA, so a test
  on CPU can prove a code path sync-free (tests/test_nosync.py).
- `host_reads_free(t)`: True for CPU tensors (reading them costs nothing, e.g. to skip a no-op multiply), False
  on a GPU and while a HostSyncGuard is active, so the guard walks the GPU's code path.
"""
from __future__ import annotations

import bisect
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten


class DeadLatentBound:
    """Upper bound on how many latents have tokens_since_fired >= dead_tokens, known on the host.

    Counters only grow by each batch's tokens or reset to 0, so t tokens after a `refresh`, a latent can be dead
    only if its counter then was >= dead_tokens - t. `refresh` reads the counters (one device sync: call it on
    logging steps), `advance` adds a step's tokens, `bound()` counts with a bisection on the host."""

    def __init__(self, dead_tokens: int, counters: Tensor) -> None:
        self.dead_tokens = dead_tokens
        self.refresh(counters)

    def refresh(self, counters: Tensor) -> None:
        self.sorted = sorted(counters.tolist())
        self.tokens = 0

    def advance(self, tokens: int) -> None:
        self.tokens += tokens

    def bound(self) -> int:
        return len(self.sorted) - bisect.bisect_left(self.sorted, self.dead_tokens - self.tokens)


class HostSyncError(RuntimeError):
    pass


_active_guards = 0


def host_reads_free(t: Tensor) -> bool:
    return t.device.type == "cpu" and _active_guards == 0


_ALWAYS_SYNC = {
    "aten::_local_scalar_dense": ".item() / bool() / int() / float() of a tensor reads it on the host",
    "aten::item": ".item() reads a tensor on the host",
    "aten::nonzero": "nonzero needs the count on the host to size its output",
    "aten::masked_select": "masked_select needs the count on the host",
    "aten::bincount": "bincount reads min/max on the host",
    "aten::_unique2": "unique sizes its output on the host",
    "aten::unique_dim": "unique sizes its output on the host",
    "aten::unique_consecutive": "unique sizes its output on the host",
    "aten::equal": "torch.equal returns a Python bool",
    "aten::is_nonzero": "bool() of a tensor reads it on the host",
    "aten::allclose": "allclose returns a Python bool",
    "aten::lift_fresh": "torch.tensor(python data) is a blocking host-to-device copy",
}


def _sync_reason(func: Any, args: tuple, kwargs: dict) -> str | None:
    name = func._schema.name
    if name in _ALWAYS_SYNC:
        return _ALWAYS_SYNC[name]
    if name in ("aten::index", "aten::index_put", "aten::index_put_", "aten::_index_put_impl_"):
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        if any(isinstance(i, Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices if i is not None):
            return "boolean-mask indexing calls nonzero (use masked_fill / torch.where)"
    if (name == "aten::repeat_interleave" and func._schema.overload_name in ("Tensor", "self_Tensor")
            and kwargs.get("output_size") is None):
        return "repeat_interleave without output_size reads the total on the host"
    return None


class HostSyncGuard(TorchDispatchMode):
    """`with HostSyncGuard(): ...` raises HostSyncError at the first op that would make the host wait for a CUDA
    device (on any device: it inspects the ops, so it works on CPU). Also refuses `.tolist()` and `.numpy()`."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        why = _sync_reason(func, args, kwargs)
        if why is not None:
            raise HostSyncError(f"{func._schema.name}: {why}")
        return func(*args, **kwargs)

    def __enter__(self):
        global _active_guards
        _active_guards += 1
        self._saved = {name: getattr(Tensor, name) for name in ("tolist", "numpy")}
        for name in self._saved:
            setattr(Tensor, name, _refuse(name))
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        global _active_guards
        _active_guards -= 1
        for name, fn in self._saved.items():
            setattr(Tensor, name, fn)
        return super().__exit__(*exc)


def _refuse(name: str):
    def refuse(self: Tensor, *args: Any, **kwargs: Any):
        raise HostSyncError(f"Tensor.{name}() copies the tensor to the host")
    return refuse
