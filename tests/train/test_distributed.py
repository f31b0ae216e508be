"""Data-parallel helpers (lmkernel/train/distributed.py) in one process: without torchrun they do nothing, and
the one flat all-reduce puts every gradient (zeros where there is none) and the loss back in place."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from lmkernel.train import distributed
from lmkernel.train.distributed import ProcessGroup


def test_torchrun_is_recognised_by_world_size_and_rank() -> None:
    assert distributed.launched_by_torchrun({"WORLD_SIZE": "2", "RANK": "1"}) is True
    assert distributed.launched_by_torchrun({"WORLD_SIZE": "2"}) is False
    assert distributed.launched_by_torchrun({"RANK": "0"}) is False
    assert distributed.launched_by_torchrun({}) is False


def test_one_process_gets_rank_zero_of_one_on_its_device() -> None:
    cpu = torch.device("cpu")
    assert distributed.init(cpu, {}) == ProcessGroup(0, 1, cpu)
    assert distributed.init(cpu, {"WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0"}) == ProcessGroup(0, 1, cpu)
    assert not dist.is_initialized()
    assert ProcessGroup().is_main and not ProcessGroup(rank=1, world=2).is_main


def test_one_process_keeps_its_loss_gradients_and_flag() -> None:
    model = nn.Linear(2, 1)
    model.weight.grad = torch.tensor([[1.0, 2.0]])
    loss = torch.tensor(0.5)
    assert distributed.all_reduce_gradients(model, loss, ProcessGroup()) is loss
    assert model.weight.grad.tolist() == [[1.0, 2.0]] and model.bias.grad is None
    assert distributed.broadcast_flag(True, ProcessGroup()) is True
    assert distributed.broadcast_flag(False, ProcessGroup()) is False


def test_the_flat_all_reduce_puts_each_gradient_back_in_place(tmp_path) -> None:
    """A gloo group of one: the sum over processes is this process's own values, so the round trip through
    the flat buffer must return every gradient unchanged, zeros for a parameter with none, and the loss."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
        model[0].bias.requires_grad_(False)
        model[0].weight.grad = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
        model[1].weight.grad = torch.tensor([[5.0, 6.0]])
        model[1].bias.grad = None
        group = ProcessGroup(0, 2, torch.device("cpu"))  # world > 1 takes the all-reduce path
        loss = distributed.all_reduce_gradients(model, torch.tensor(0.75), group)
        assert loss.item() == 0.75
        assert model[0].weight.grad.tolist() == [[1.0, 2.0], [3.0, 4.0]]
        assert model[1].weight.grad.tolist() == [[5.0, 6.0]]
        assert model[1].bias.grad.tolist() == [0.0]
        assert model[0].bias.grad is None  # frozen: not part of the reduction
        assert distributed.broadcast_flag(True, group) is True
        distributed.barrier(group)
    finally:
        distributed.shutdown(ProcessGroup(0, 2))
    assert not dist.is_initialized()
