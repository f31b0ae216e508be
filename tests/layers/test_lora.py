"""LoRA layers: the trainable single adapter (forward, init, dropout, gradients, merge) and the serving
layer that picks an adapter per row of a flattened batch."""

from __future__ import annotations

import math

import pytest
import torch

from lmkernel.errors import AdapterError
from lmkernel.layers.linear import Dense, Int8Linear
from lmkernel.layers.lora import LoraLinear, LoraRouting, MultiLoraLinear, init_lora_a, linear_layers, merged_dense


def dense(fan_in: int = 24, fan_out: int = 16, seed: int = 0) -> Dense:
    torch.manual_seed(seed)
    layer = Dense(fan_in, fan_out, bias=True)
    return layer.requires_grad_(False)


def test_forward_is_base_plus_scaled_update_and_only_a_b_learn():
    base = dense()
    layer = LoraLinear(base, r=4, alpha=8.0, generator=torch.Generator().manual_seed(1))
    x = torch.randn(5, 24)
    torch.testing.assert_close(layer(x), base(x), rtol=0, atol=0)  # B starts at zero: the base exactly
    with torch.no_grad():
        layer.lora_B.normal_()
    expected = base(x) + x @ layer.lora_A.T @ layer.lora_B.T * 2.0
    torch.testing.assert_close(layer(x), expected)
    assert layer.scaling == 2.0 and layer.lora_A.shape == (4, 24) and layer.lora_B.shape == (16, 4)
    layer(torch.randn(3, 24, requires_grad=True)).sum().backward()
    assert base.weight.grad is None and base.bias.grad is None and not base.weight.requires_grad
    assert layer.lora_A.grad is not None and layer.lora_B.grad is not None
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["lora_A", "lora_B"]


def test_init_is_peft_s_and_follows_the_callers_generator():
    a1 = LoraLinear(dense(), r=8, alpha=16.0, generator=torch.Generator().manual_seed(7))
    a2 = LoraLinear(dense(), r=8, alpha=16.0, generator=torch.Generator().manual_seed(7))
    a3 = LoraLinear(dense(), r=8, alpha=16.0, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a1.lora_A, a2.lora_A) and not torch.equal(a1.lora_A, a3.lora_A)
    assert torch.count_nonzero(a1.lora_B) == 0
    # Kaiming-uniform with a = sqrt(5): bound sqrt(6 / ((1 + 5) * fan_in)) = 1 / sqrt(fan_in), as nn.Linear's default.
    big = init_lora_a(64, 400, torch.Generator().manual_seed(0))
    assert big.abs().max() <= 1 / math.sqrt(400) and big.abs().max() > 0.95 / math.sqrt(400)
    expected = torch.nn.init.kaiming_uniform_(torch.empty(64, 400), a=math.sqrt(5), generator=torch.Generator().manual_seed(0))
    assert torch.equal(big, expected)


def test_dropout_acts_on_the_lora_input_in_training_only():
    base = dense()
    layer = LoraLinear(base, r=4, alpha=4.0, dropout=0.5, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(64, 24)
    layer.eval()
    torch.testing.assert_close(layer(x), base(x) + x @ layer.lora_A.T @ layer.lora_B.T)
    layer.train()
    torch.manual_seed(0)
    first = layer(x)
    torch.manual_seed(0)
    dropped = torch.nn.functional.dropout(x, 0.5, training=True)  # the same mask: the base path sees x whole
    torch.testing.assert_close(first, base(x) + dropped @ layer.lora_A.T @ layer.lora_B.T)
    torch.manual_seed(1)
    assert not torch.allclose(first, layer(x))


def test_merged_is_a_plain_dense_with_the_same_outputs():
    base = dense()
    layer = LoraLinear(base, r=4, alpha=8.0, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        layer.lora_B.normal_()
    before = base.weight.clone()
    merged = layer.merged()
    x = torch.randn(6, 24)
    assert type(merged) is Dense and merged.bias is base.bias
    torch.testing.assert_close(merged(x), layer(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(merged.weight, before + layer.delta_weight())
    assert torch.equal(base.weight, before)  # merging builds a new weight; the base is not changed
    with pytest.raises(AdapterError, match="int8"):
        merged_dense(Int8Linear.from_float(base), layer.lora_A, layer.lora_B, 2.0, "int8 layer")


def _serving_layer(base: torch.nn.Module) -> tuple[MultiLoraLinear, list[tuple[torch.Tensor, torch.Tensor, float]]]:
    g = torch.Generator().manual_seed(3)
    layer = MultiLoraLinear(base, num_slots=3)
    factors = []
    for slot, r in enumerate((2, 4, 8)):  # adapters may differ in rank
        a, b = torch.randn(r, 24, generator=g), torch.randn(16, r, generator=g)
        layer.set_adapter(slot, a, b, 1.5 + slot)
        factors.append((a, b, 1.5 + slot))
    return layer, factors


@pytest.mark.parametrize("slots", [[0, 0, 1, -1, 2, 0, 1, -1], [1, 1, 1, 1, 1, 1, 1, 1], [-1, -1, 2, 2, 2, 0, 0, -1]])
def test_each_row_gets_its_own_adapter_or_the_base(slots):
    base = dense()
    layer, factors = _serving_layer(base)
    x = torch.randn(len(slots), 24)
    routing = LoraRouting.of(slots, x.device)
    with torch.inference_mode():
        y = layer(x, routing)
        after = layer(x)
    expected = base(x)
    for row, slot in enumerate(slots):
        if slot >= 0:
            a, b, s = factors[slot]
            expected[row] += (x[row] @ a.T @ b.T) * s
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(after, base(x), rtol=0, atol=0)  # without routing every row is base


def test_serving_layer_wraps_quantized_layers_and_skips_adapters_without_this_layer():
    base = Int8Linear.from_float(dense())
    layer = MultiLoraLinear(base, num_slots=2)
    a, b = torch.randn(4, 24), torch.randn(16, 4)
    layer.set_adapter(1, a, b, 0.5)  # slot 0 does not target this layer
    x = torch.randn(4, 24)
    with torch.inference_mode():
        y = layer(x, LoraRouting.of([0, 1, 1, -1], x.device))
    ref = base(x)
    torch.testing.assert_close(y[[0, 3]], ref[[0, 3]], rtol=0, atol=0)
    torch.testing.assert_close(y[1:3], ref[1:3] + x[1:3] @ a.T @ b.T * 0.5, rtol=1e-5, atol=1e-5)
    assert list(linear_layers(torch.nn.Sequential(layer))) == ["0"]  # the wrapped base is not listed again


def test_routing_groups_contiguous_rows_as_slices_and_is_none_for_base_only():
    assert LoraRouting.of([-1, -1], torch.device("cpu")) is None
    routing = LoraRouting.of([1, 1, -1, 0, 1], torch.device("cpu"))
    by_slot = dict(routing.groups)
    assert by_slot[0] == slice(3, 4)
    assert by_slot[1].tolist() == [0, 1, 4]  # not contiguous: an index tensor
