"""Data-parallel training with torch.distributed, as started by `torchrun`.

Each process takes its share of every global batch; after the backward passes the gradients (and
the step's loss, for the log) are summed across processes in one all-reduce, so every process holds
the same update. Losses are already divided by the global target count, which makes the sum the
gradient one process would compute on the whole batch. Gloo on CPU, NCCL on CUDA.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class ProcessGroup:
    """This process's place: rank among `world` processes, and the device it trains on."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """Only the main process writes checkpoints, logs and the model."""
        return self.rank == 0


def launched_by_torchrun(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether torchrun started this process (it sets WORLD_SIZE and RANK)."""
    return "WORLD_SIZE" in environ and "RANK" in environ


def init(device: torch.device, environ: Mapping[str, str] = os.environ) -> ProcessGroup:
    """Join the process group torchrun set up; one process without torchrun."""
    if not launched_by_torchrun(environ) or int(environ["WORLD_SIZE"]) == 1:
        return ProcessGroup(device=device)
    local = int(environ.get("LOCAL_RANK", 0))
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return ProcessGroup(dist.get_rank(), dist.get_world_size(), device)


def all_reduce_gradients(model: nn.Module, loss: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """Sum the gradients of every trainable parameter and `loss` over all processes, in one call.

    A process with no share of a batch contributes zeros (its gradients may be None)."""
    if group.world == 1:
        return loss
    params = [p for p in model.parameters() if p.requires_grad]
    flat = torch.cat([*(p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel(), device=p.device, dtype=p.dtype)
                        for p in params), loss.reshape(1).to(params[0].dtype)])
    dist.all_reduce(flat)
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset : offset + n].view_as(p).clone()
        offset += n
    return flat[-1]


def broadcast_flag(flag: bool, group: ProcessGroup) -> bool:
    """The main process's decision (stop early, say), made everyone's."""
    if group.world == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=group.device)
    dist.broadcast(t, 0)
    return bool(t.item())


def barrier(group: ProcessGroup) -> None:
    if group.world > 1:
        dist.barrier()


def shutdown(group: ProcessGroup) -> None:
    if group.world > 1 and dist.is_initialized():
        dist.destroy_process_group()
