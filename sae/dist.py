"""torchrun helpers: process group setup (NCCL on GPU, gloo on CPU), global sums, gathers, gradient all-reduce.

Data parallelism here is explicit: every rank computes (local numerator) / (global denominator) losses, so the
SUM of the ranks' gradients, one all-reduce of a flat buffer per step, is exactly the global-batch gradient.
Every collective goes through this file, and each checks that its tensor lives on the process group's device
(`init` records it; NCCL rejects a CPU tensor only at run time, on the GPU): a tensor built without `device=`
fails here with a message naming it, on any machine (tests/test_sae_ddp.py runs the DDP loop with the default
device set to `meta` to catch exactly that).
Multi-node works through torchrun's usual flags (--nnodes, --node-rank, --rdzv-endpoint): this only reads the
environment torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT).
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterable, Iterator, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor


class DistInfo(NamedTuple):
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(pref: str, local_rank: int = 0) -> torch.device:
    if pref == "auto":
        pref = "cuda" if torch.cuda.is_available() else "cpu"
    if pref == "cuda":
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device(pref)


_group_device: torch.device | None = None  # the device every collective's tensors must be on (set by init)


def init(device_pref: str = "auto") -> DistInfo:
    """Join the torchrun process group when launched by torchrun (WORLD_SIZE > 1), else a single process.
    An NCCL group is bound to this rank's GPU (`device_id`), so barriers and collectives never guess it."""
    global _group_device
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_pref, local_rank)
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            dist.init_process_group(backend="nccl", device_id=device)
        else:
            dist.init_process_group(backend="gloo")
    _group_device = device
    rank = dist.get_rank() if dist.is_initialized() else 0
    return DistInfo(rank, dist.get_world_size() if dist.is_initialized() else 1, local_rank, device)


_SOLO = False  # inside solo(): every helper below acts as on one process


@contextmanager
def solo() -> Iterator[None]:
    """Run code that would synchronise ranks (sums, gradient all-reduce, barriers) as if on one process: for a
    module that lives on this rank only (sae.train_many --distribute-saes)."""
    global _SOLO
    prev, _SOLO = _SOLO, True
    try:
        yield
    finally:
        _SOLO = prev


def active() -> bool:
    return not _SOLO and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def check_device(t: Tensor, what: str = "collective") -> None:
    """Raise unless `t` is on the process group's device (a no-op before `init`, and on one process)."""
    if active() and _group_device is not None and t.device != _group_device:
        raise RuntimeError(f"{what}: tensor on {t.device}, but the process group works on {_group_device} "
                           f"(build it on the training device: NCCL rejects CPU tensors)")


def _all_reduce(t: Tensor, op: dist.ReduceOp) -> Tensor:
    """`op` of `t` across ranks (a new tensor; identity on one process)."""
    if not active():
        return t
    check_device(t, "all_reduce")
    t = t.clone()
    dist.all_reduce(t, op=op)
    return t


def all_reduce_sum(t: Tensor) -> Tensor:
    return _all_reduce(t, dist.ReduceOp.SUM)


def all_reduce_max(t: Tensor) -> Tensor:
    return _all_reduce(t, dist.ReduceOp.MAX)


class _AllGather:
    """`all_gather(t)`: every rank's `t` concatenated along dim 0 in rank order (`t` itself on one process);
    `all_gather.world_size` says how many pieces that is. Not differentiable (used for selection only)."""

    @property
    def world_size(self) -> int:
        return world_size()

    def __call__(self, t: Tensor) -> Tensor:
        if not active():
            return t
        check_device(t, "all_gather")
        t = t.detach().contiguous()
        parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, t)
        return torch.cat(parts)


all_gather = _AllGather()


@torch.no_grad()
def all_reduce_grads(params: Iterable[torch.nn.Parameter]) -> None:
    """SUM every parameter's gradient across ranks, in one flat buffer (one collective per step)."""
    if not active():
        return
    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([g.flatten() for g in grads])
    check_device(flat, "all_reduce_grads")
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for g in grads:
        g.copy_(flat[offset: offset + g.numel()].view_as(g))
        offset += g.numel()


@torch.no_grad()
def broadcast_module(module: torch.nn.Module, src: int = 0) -> None:
    """Make every rank's parameters and buffers identical to rank `src`'s."""
    if not active():
        return
    for t in list(module.parameters()) + list(module.buffers()):
        check_device(t, "broadcast_module")
        dist.broadcast(t.data, src)


def barrier() -> None:
    if active():
        dist.barrier()


def cleanup() -> None:
    global _group_device
    _group_device = None
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class StopVote:
    """Agree across ranks on the step after which training stops (a signal may reach some ranks only, or reach
    them at different moments). Each call posts this rank's flag (an async all-reduce MAX on a CPU gloo group:
    no GPU synchronisation) and returns the result posted on the previous call, so every rank stops after the same
    step, one step after the first rank saw the signal. On one process it returns the flag itself."""

    def __init__(self) -> None:
        self.group = dist.new_group(backend="gloo") if active() else None
        self.pending: tuple[dist.Work, Tensor] | None = None
        self.stopped = False

    def __call__(self, local_stop: bool) -> bool:
        if self.group is None:
            self.stopped = bool(local_stop)
            return self.stopped
        if self.pending is not None:
            work, flag = self.pending
            work.wait()
            self.stopped = bool(flag.item())
        flag = torch.tensor([int(bool(local_stop))], dtype=torch.int32, device="cpu")  # the gloo group is CPU
        self.pending = (dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group, async_op=True), flag)
        return self.stopped

    def close(self) -> None:
        """Wait for the vote still in flight (every rank posted it), before the process group goes away."""
        if self.pending is not None:
            self.pending[0].wait()
            self.pending = None
