"""Int8 and int4 linear layers against a float reference of the same quantized weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lmkernel.layers.linear import Int4Linear, Int8Linear


def rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max())


@pytest.mark.parametrize("shape", [(576, 1536), (1536, 576), (100, 300)])  # (in, out); 100 x 300: no multiple of 16
@pytest.mark.parametrize("rows", [1, 3, 7, 40])  # to 16 rows the kernel, four at a time; 40 tile by tile
def test_int8_matches_its_dequantized_weight(shape: tuple[int, int], rows: int) -> None:
    torch.manual_seed(0)
    layer = nn.Linear(*shape, bias=True)
    q = Int8Linear.from_float(layer)
    x = torch.randn(rows, shape[0])
    with torch.inference_mode():
        assert rel_error(q(x), x @ q.dequantized().T + layer.bias) <= 1e-3
        assert rel_error(q(x), layer(x)) < 0.02  # and close to the float layer it came from
    assert q.weight.dtype == torch.int8 and q.weight_scale.shape == (shape[1],)


@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("shape", [(576, 192), (1536, 576), (100, 300)])  # 576 and 100 are padded for g=128
@pytest.mark.parametrize("lead", [(1,), (3,), (3, 2), (5, 8)])  # to 16 rows the compiled kernel, 40 rows tile by tile
def test_int4_matches_its_dequantized_weight(shape: tuple[int, int], group: int, lead: tuple[int, ...]) -> None:
    torch.manual_seed(1)
    layer = nn.Linear(*shape, bias=False)
    q = Int4Linear.from_float(layer, group)
    x = torch.randn(*lead, shape[0])
    with torch.inference_mode():
        y = q(x)
        assert y.shape == (*lead, shape[1])
        assert rel_error(y, x @ q.dequantized().T) <= 1e-3
    w = layer.weight.detach()
    padded = torch.nn.functional.pad(w, (0, q.padded - shape[0])).reshape(shape[1], -1, group)
    low, high = padded.amin(-1, keepdim=True), padded.amax(-1, keepdim=True)
    step = (high - low) / 15
    nearest = (torch.round((padded - low) / step) * step + low).reshape(shape[1], -1)[:, : shape[0]]
    assert ((q.dequantized() - w) ** 2).sum() <= ((nearest - w) ** 2).sum(), "the fit is no worse than the range"
    assert q.qweight.dtype == torch.uint8 and q.qweight.shape == (shape[1], q.padded // 2)


def test_int4_refuses_other_group_sizes() -> None:
    with pytest.raises(ValueError, match="group size"):
        Int4Linear(64, 64, False, group_size=48)
