"""(IA)3: the wrapper against y = base(x) * l and y = base(x * l), and the merged layer against the wrapper."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lmkernel.errors import AdapterError
from lmkernel.layers.ia3 import Ia3Linear, ia3_merged
from lmkernel.layers.linear import Dense


def _base(bias: bool, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(12, 8, bias=bias)


def _x() -> torch.Tensor:
    return torch.randn(5, 12, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("feedforward", [False, True])
def test_starts_as_the_identity_with_peft_shapes_and_a_frozen_base(feedforward: bool) -> None:
    base = _base(True)
    layer = Ia3Linear(base, feedforward)
    assert layer.ia3_l.shape == ((1, 12) if feedforward else (8, 1))
    assert torch.equal(layer.ia3_l.data, torch.ones_like(layer.ia3_l))
    assert [p.requires_grad for p in base.parameters()] == [False, False] and layer.ia3_l.requires_grad
    assert (layer.in_features, layer.out_features) == (12, 8)
    with torch.no_grad():
        torch.testing.assert_close(layer(_x()), base(_x()))


def test_attention_form_scales_the_outputs_bias_included() -> None:
    base = _base(True)
    layer = Ia3Linear(base, feedforward=False)
    scale = torch.linspace(0.5, 2.0, 8)
    layer.ia3_l.data.copy_(scale[:, None])
    x = _x()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), (x @ base.weight.T + base.bias) * scale)


def test_feedforward_form_scales_the_inputs_not_the_bias() -> None:
    base = _base(True)
    layer = Ia3Linear(base, feedforward=True)
    scale = torch.linspace(-1.0, 3.0, 12)
    layer.ia3_l.data.copy_(scale[None, :])
    x = _x()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), (x * scale) @ base.weight.T + base.bias)


def test_only_the_vector_gets_a_gradient() -> None:
    layer = Ia3Linear(_base(False), feedforward=False)
    x = _x()
    layer(x).sum().backward()
    # d/dl_j sum_i (x W^T)_ij l_j = sum_i (x W^T)_ij
    torch.testing.assert_close(layer.ia3_l.grad.reshape(-1), (x @ layer.base_layer.weight.T).sum(0).detach())
    assert layer.base_layer.weight.grad is None


@pytest.mark.parametrize("feedforward", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_merged_dense_computes_what_the_wrapper_does(feedforward: bool, bias: bool) -> None:
    layer = Ia3Linear(_base(bias, seed=3), feedforward)
    layer.ia3_l.data.uniform_(0.2, 1.8, generator=torch.Generator().manual_seed(4))
    merged = layer.merged()
    assert type(merged) is Dense and merged.weight.shape == (8, 12) and not merged.weight.requires_grad
    assert (merged.bias is not None) == bias
    x = _x()
    with torch.no_grad():
        torch.testing.assert_close(merged(x), layer(x), rtol=1e-5, atol=1e-5)
    s = layer.ia3_l.detach().reshape(-1)
    w = layer.base_layer.weight.detach()
    torch.testing.assert_close(merged.weight, w * s[None, :] if feedforward else w * s[:, None])


def test_merging_keeps_a_bfloat16_layer_in_bfloat16() -> None:
    base = _base(True).bfloat16()
    scale = torch.full((8, 1), 0.5)
    merged = ia3_merged(base, scale, feedforward=False)
    assert merged.weight.dtype == torch.bfloat16 and merged.bias.dtype == torch.bfloat16
    assert torch.equal(merged.weight, (base.weight.float() * 0.5).bfloat16())  # halving is exact
    assert torch.equal(merged.bias, (base.bias.float() * 0.5).bfloat16())


def test_the_wrapper_takes_its_base_layers_mode() -> None:
    assert Ia3Linear(_base(False).eval(), True).training is False
    assert Ia3Linear(_base(False).train(), True).training is True


def test_merging_into_a_layer_that_is_not_a_float_linear_is_named() -> None:
    with pytest.raises(AdapterError, match=r"^cannot merge \(IA\)3 into 'model.mlp.down_proj': it is a Conv1d, "
                                           r"not a float linear layer$"):
        ia3_merged(nn.Conv1d(2, 2, 1), torch.ones(2), feedforward=True, name="model.mlp.down_proj")
