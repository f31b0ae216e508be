"""Activations by their Hugging Face names, against PyTorch's own functions and the formulas."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lmkernel.errors import UnsupportedModelError
from lmkernel.layers.activation import get_activation

X = torch.linspace(-6, 6, 97, dtype=torch.float64)


def _tanh_gelu(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


@pytest.mark.parametrize(("name", "formula"), [
    ("silu", lambda x: x * torch.sigmoid(x)),
    ("swish", lambda x: x * torch.sigmoid(x)),
    ("gelu", lambda x: 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))),
    ("gelu_new", _tanh_gelu),
    ("gelu_pytorch_tanh", _tanh_gelu),
    ("gelu_fast", _tanh_gelu),
    ("relu", lambda x: x.clamp(min=0)),
])
def test_each_name_is_its_formula(name, formula) -> None:
    torch.testing.assert_close(get_activation(name)(X), formula(X), rtol=1e-12, atol=1e-12)


def test_exact_and_tanh_gelu_are_different_functions() -> None:
    exact, tanh = get_activation("gelu")(X), get_activation("gelu_pytorch_tanh")(X)
    assert torch.equal(exact, F.gelu(X)) and torch.equal(tanh, F.gelu(X, approximate="tanh"))
    assert 1e-5 < float((exact - tanh).abs().max()) < 1e-2


def test_hf_activations_agree_where_transformers_is_installed() -> None:
    activations = pytest.importorskip("transformers.activations")
    x = X.float()
    for name in ("silu", "swish", "gelu", "gelu_new", "gelu_pytorch_tanh", "relu"):
        torch.testing.assert_close(get_activation(name)(x), activations.ACT2FN[name](x), rtol=1e-6, atol=1e-6)
    # transformers' gelu_fast is its own tanh approximation, within float noise of the same curve
    torch.testing.assert_close(get_activation("gelu_fast")(x), activations.ACT2FN["gelu_fast"](x), rtol=1e-4, atol=1e-4)


def test_an_unknown_name_lists_the_supported_ones() -> None:
    expected = "['gelu', 'gelu_fast', 'gelu_new', 'gelu_pytorch_tanh', 'relu', 'silu', 'swish']"
    with pytest.raises(UnsupportedModelError) as err:
        get_activation("mish")
    assert str(err.value) == f"hidden_act 'mish' is not supported; expected one of {expected}"
    assert err.value.__cause__ is None and err.value.__suppress_context__
