"""Data-parallel training on torch.distributed: the process group, who this rank is, and the few collectives a step
needs. Launching is torchrun's (or `accelerate launch`'s, which runs torchrun): ranks, world size and the local rank
come from the standard environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT). Without those variables
the world is one process and every function here is the identity, so a single-process run computes exactly what it
did before.

What crosses ranks per step:
  - ZO, batch-sharded (default): each rank runs the 2k perturbation chunks on its slice of the step's batch; one
    all-gather of the chunks' float64 loss sums and counts (2 x 2k scalars per rank), summed in rank order, gives
    every rank the same losses, hence the same d and the same update (z comes from the step seed on every rank).
  - ZO, pair-parallel (`zo_parallel: pairs`): each rank runs the whole batch for the pairs j with j mod N == rank;
    one all-reduce of the 2k float64 losses, zero outside each rank's own pairs (x + 0 is exact), gives every d.
  - First-order: each trained tensor's gradient is all-reduced (summed) the moment it is complete, in its
    post-accumulate hook, before any method reads it (so LOMO's fused update sees the global gradient, as LOMO's own
    distributed path does); each rank's loss is its slice's loss sum over the global count, so the sum is the mean.
  - A stop flag per step (a signal on any rank stops every rank after the same step), the token count at each log
    line, the dev evaluation's sums, and at each checkpoint a float64 checksum per rank of the trained tensors (the
    ranks must hold the same model; a mismatch stops the run rather than saving rank 0's copy as if it were all).
"""
from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def eval_shard(self, items: list) -> list:
        """This rank's part of an evaluation set: contiguous, sizes differing by at most one, all items covered."""
        n, r = len(items), self.rank
        return items[r * n // self.size:(r + 1) * n // self.size]


_WORLD = World()
# bytes this process has sent into collectives (each all-gather / all-reduce counts its input tensor once):
# `qzo2 bench` reports them per step
STATS = {"bytes": 0, "collectives": 0}


def _count(t: torch.Tensor) -> None:
    STATS["bytes"] += t.numel() * t.element_size()
    STATS["collectives"] += 1


def env_world() -> World:
    """The world the launcher describes in the environment (one process when it describes none)."""
    def num(name, default):
        value = os.environ.get(name, "")
        try:
            return int(value) if value.strip() else default
        except ValueError:
            raise ValueError(f"{name}={value!r} is not an integer (set by torchrun / accelerate launch)") from None
    size = num("WORLD_SIZE", 1)
    rank = num("RANK", 0)
    if size < 1 or not 0 <= rank < size:
        raise ValueError(f"RANK={rank} and WORLD_SIZE={size} do not describe a rank of a world")
    return World(rank=rank, size=size, local_rank=num("LOCAL_RANK", rank))


def world() -> World:
    return _WORLD


def initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def init(device: str, timeout_s: float = 1800.0) -> World:
    """Join the process group the environment describes, once per process: nccl when `device` (a run's setting:
    auto, cuda, cpu) computes on a GPU, else gloo. The timeout bounds every collective, so a rank whose peer died
    stops with an error instead of waiting forever (torchrun's agent normally tears the job down first)."""
    global _WORLD
    w = env_world()
    if w.enabled and not initialized():
        backend = "nccl" if device in ("auto", "cuda") and torch.cuda.is_available() else "gloo"
        kwargs = {}
        if backend == "nccl":
            if w.local_rank >= torch.cuda.device_count():
                raise ValueError(f"LOCAL_RANK {w.local_rank} but this node has {torch.cuda.device_count()} GPUs "
                                 f"(start at most that many processes per node)")
            torch.cuda.set_device(w.local_rank)  # this rank's GPU is the current device from here on
            kwargs = {"device_id": torch.device("cuda", w.local_rank)}
        torch.distributed.init_process_group(backend, rank=w.rank, world_size=w.size,
                                             timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
    _WORLD = w
    return w


@contextlib.contextmanager
def group(device: str):
    """init for a block (bench): a process group this block joined is left at its end, after a barrier when the
    block succeeded, so that no rank tears down its connections while a peer still uses them (gloo aborts the
    process then: a rare SIGABRT at exit under torchrun, seen in CI)."""
    owns = not initialized()
    w = init(device)
    try:
        yield w
        if owns:
            barrier()
    finally:
        if owns:
            shutdown()


def shutdown() -> None:
    global _WORLD
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    _WORLD = World()


def _comm_device() -> torch.device:
    backend = torch.distributed.get_backend()
    return torch.device("cuda", _WORLD.local_rank) if backend == "nccl" else torch.device("cpu")


def _all_gather(t: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's `t` (on the communication device), in rank order."""
    parts = [torch.empty_like(t) for _ in range(_WORLD.size)]
    _count(t)
    torch.distributed.all_gather(parts, t)
    return parts


def gather_sum(x: torch.Tensor) -> torch.Tensor:
    """Σ over ranks of x, added in rank order after an all-gather: the same bits on every rank and for any reduction
    algorithm (for the few float64 scalars of a ZO step; gradients use all_sum)."""
    if not _WORLD.enabled:
        return x
    dev = x.device
    parts = _all_gather(x.detach().to(_comm_device()).contiguous())
    total = parts[0].clone()
    for p in parts[1:]:
        total += p
    return total.to(dev)


def all_sum(x: torch.Tensor) -> torch.Tensor:
    """In-place Σ over ranks (gradients, evaluation counts); returns x."""
    if _WORLD.enabled:
        _count(x)
        if x.device == _comm_device():
            torch.distributed.all_reduce(x)
        else:
            y = x.to(_comm_device())
            torch.distributed.all_reduce(y)
            x.copy_(y)
    return x


def check_same(value: float, what: str) -> None:
    """Raise on every rank unless every rank passes the same `value` (float64 bits compared)."""
    if not _WORLD.enabled:
        return
    values = [float(p) for p in _all_gather(torch.tensor([float(value)], dtype=torch.float64,
                                                          device=_comm_device()))]
    if len({repr(v) for v in values}) > 1:  # repr: NaN on every rank counts as the same
        raise ValueError(f"the ranks disagree on {what}: {values} (rank order)")


def max_over_ranks(value: int) -> int:
    """The largest of the ranks' values, on every rank (a stop signal seen by one rank stops all after the same
    step: its number, 0 when none came)."""
    if not _WORLD.enabled:
        return int(value)
    t = torch.tensor([int(value)], dtype=torch.int64, device=_comm_device())
    _count(t)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return int(t.item())


def barrier() -> None:
    if _WORLD.enabled:
        torch.distributed.barrier()
