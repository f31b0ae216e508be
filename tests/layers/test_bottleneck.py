"""The bottleneck adapter layer: y + up(act(down(y))) after a frozen projection, starting as the identity."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lmkernel.layers.bottleneck import BottleneckLinear


def _base() -> nn.Linear:
    base = nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        base.weight.copy_(torch.tensor([[1.0, 0.0, 2.0], [0.0, -1.0, 1.0]]))
    return base


def test_a_new_adapter_leaves_the_output_unchanged_and_freezes_the_base() -> None:
    layer = BottleneckLinear(_base(), size=4, generator=torch.Generator().manual_seed(0))
    x = torch.tensor([[1.0, 2.0, 3.0]])
    assert torch.equal(layer(x), torch.tensor([[7.0, 1.0]]))
    assert (layer.adapter_down.weight.shape, layer.adapter_up.weight.shape) == ((4, 2), (2, 4))
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == [
        "adapter_down.weight", "adapter_down.bias", "adapter_up.weight", "adapter_up.bias"]


@pytest.mark.parametrize(("activation", "expected"), [("relu", [[8.0, 1.0]]), ("silu", [[7.0 + 1 / (1 + torch.e ** -1), 1.0]])])
def test_the_adapter_adds_its_residual_mlp_of_the_base_output(activation: str, expected: list[list[float]]) -> None:
    layer = BottleneckLinear(_base(), size=1, activation=activation)
    with torch.no_grad():  # down reads y[0] - 6 = 1, up writes it to the first output
        layer.adapter_down.weight.copy_(torch.tensor([[1.0, 0.0]]))
        layer.adapter_down.bias.fill_(-6.0)
        layer.adapter_up.weight.copy_(torch.tensor([[1.0], [0.0]]))
    out = layer(torch.tensor([[1.0, 2.0, 3.0]]))
    assert torch.allclose(out, torch.tensor(expected))
    layer.adapter_down.bias.data.fill_(-8.0)  # relu cuts a negative hidden unit to zero
    assert activation != "relu" or torch.equal(layer(torch.tensor([[1.0, 2.0, 3.0]])), torch.tensor([[7.0, 1.0]]))


def test_the_adapter_takes_the_base_dtype_and_mode_and_rejects_size_zero() -> None:
    base = nn.Linear(4, 6).to(torch.float64).eval()
    layer = BottleneckLinear(base, size=2)
    assert (layer.adapter_down.weight.dtype, layer.adapter_up.bias.dtype, layer.training) == (torch.float64, torch.float64, False)
    with pytest.raises(ValueError, match="adapter size must be at least 1; got 0"):
        BottleneckLinear(_base(), size=0)
