"""GPTQ's pieces on synthetic layers: error against rounding to nearest, the blocked second moment."""

from __future__ import annotations

import torch

from lmkernel.compress.gptq import gptq_int4, second_moment
from lmkernel.layers.linear import Int4Linear


def test_gptq_beats_rounding_to_nearest_on_the_calibration_inputs() -> None:
    torch.manual_seed(0)
    layer = torch.nn.Linear(256, 64, bias=True)
    mix = torch.randn(256, 256) / 16
    x = torch.randn(2048, 256) @ mix * torch.linspace(0.1, 3.0, 256)  # correlated inputs of uneven strength
    gram = x.T @ x / x.shape[0]
    with torch.no_grad():
        reference = layer(x)
        nearest = Int4Linear.from_float(layer, 128)(x)
        quantized = gptq_int4(layer, gram, 128)
        ours = quantized(x)
    err_nearest = (nearest - reference).pow(2).mean()
    err_gptq = (ours - reference).pow(2).mean()
    assert err_gptq < 0.5 * err_nearest, (float(err_gptq), float(err_nearest))
    assert torch.equal(quantized.bias, layer.bias)


def test_second_moment_equals_the_full_product() -> None:
    x = torch.randn(300, 600)
    torch.testing.assert_close(second_moment(x), x.T @ x)
