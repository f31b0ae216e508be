"""RMSNorm, OffsetRMSNorm (Gemma's 1 + weight) and layer_norm against their formulas, with and without the CPU kernel."""

from __future__ import annotations

import pytest
import torch

from lmkernel.layers import cpu_kernels
from lmkernel.layers.norm import OffsetRMSNorm, RMSNorm, layer_norm

EPS = 1e-6


def _rms(x: torch.Tensor, scale: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * scale, in float64."""
    h = x.double()
    return h / torch.sqrt((h * h).mean(-1, keepdim=True) + eps) * scale.double()


def _inputs(shape: tuple[int, ...], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * 3, torch.randn(shape[-1], generator=g)


def _bfloat16_run(cls: type, shape: tuple[int, ...], seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A bfloat16 norm of `cls` with random weights on random bfloat16 rows: (output, rows in float32, weight)."""
    x, w = _inputs(shape, seed)
    xb, wb = x.bfloat16(), w.bfloat16()
    norm = cls(shape[-1], EPS).bfloat16()
    norm.weight.data.copy_(wb)
    with torch.no_grad():
        got = norm(xb)
    assert got.dtype == torch.bfloat16 and got.shape == x.shape
    return got, xb.float(), wb


@pytest.fixture(params=["kernel", "torch"])
def kernel(request, monkeypatch) -> str:
    """Each float32 test runs once with the compiled kernel and once with it unavailable."""
    if request.param == "kernel":
        assert cpu_kernels.build()
    else:
        monkeypatch.setattr(cpu_kernels, "_kernel", lambda: None)
    return request.param


@pytest.mark.parametrize("shape", [(1, 64), (5, 96), (2, 3, 32)])
def test_rms_norm_float32_matches_the_formula(kernel: str, shape: tuple[int, ...]) -> None:
    x, w = _inputs(shape, seed=len(shape))
    norm = RMSNorm(shape[-1], EPS)
    norm.weight.data.copy_(w)
    with torch.no_grad():
        assert cpu_kernels.rms_norm_applies(x, norm.weight) == (kernel == "kernel" and x.dim() == 2)
        got = norm(x)
    assert got.dtype == torch.float32 and got.shape == x.shape
    torch.testing.assert_close(got.double(), _rms(x, w), rtol=1e-5, atol=1e-5)


def test_rms_norm_float32_with_autograd_matches_the_formula_and_has_the_weight_gradient() -> None:
    x, w = _inputs((3, 16), seed=7)
    norm = RMSNorm(16, EPS)
    norm.weight.data.copy_(w)
    out = norm(x)
    out.sum().backward()
    torch.testing.assert_close(out.detach().double(), _rms(x, w), rtol=1e-5, atol=1e-5)
    # d(sum(w * xhat)) / dw = sum over rows of xhat
    torch.testing.assert_close(norm.weight.grad.double(), _rms(x, torch.ones(16)).sum(0), rtol=1e-5, atol=1e-5)


def test_rms_norm_bfloat16_normalises_in_float32_then_casts_before_the_weight() -> None:
    got, h, w = _bfloat16_run(RMSNorm, (4, 64), seed=3)
    expected = w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + EPS)).bfloat16()  # the Llama reference
    assert torch.equal(got, expected)
    torch.testing.assert_close(got.double(), _rms(h, w.float()), rtol=2e-2, atol=2e-2)


def test_rms_norm_eps_matters_for_small_rows() -> None:
    x = torch.full((1, 4), 1e-3)
    for eps in (1e-6, 1e-2):
        with torch.no_grad():
            got = RMSNorm(4, eps)(x)
        torch.testing.assert_close(got, torch.full((1, 4), 1e-3 / (1e-6 + eps) ** 0.5))


def test_rms_norm_starts_as_the_identity_scale() -> None:
    norm = RMSNorm(8, EPS)
    assert torch.equal(norm.weight.data, torch.ones(8))


@pytest.mark.parametrize("shape", [(6, 32), (3, 4, 16)])
def test_offset_rms_norm_scales_by_one_plus_weight(kernel: str, shape: tuple[int, ...]) -> None:
    x, w = _inputs(shape, seed=11)
    norm = OffsetRMSNorm(shape[-1], EPS)
    assert torch.equal(norm.weight.data, torch.zeros(shape[-1]))  # the identity: scale 1 + 0
    norm.weight.data.copy_(w)
    with torch.no_grad():
        got = norm(x)
    assert got.shape == x.shape and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), _rms(x, 1 + w), rtol=1e-5, atol=1e-5)


def test_offset_rms_norm_bfloat16_is_gemmas_float32_computation_cast_once() -> None:
    got, h, w = _bfloat16_run(OffsetRMSNorm, (2, 3, 32), seed=5)
    expected = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + EPS) * (1.0 + w.float())).bfloat16()
    assert torch.equal(got, expected)


def test_offset_rms_norm_takes_a_non_contiguous_input() -> None:
    x, w = _inputs((4, 2, 16), seed=2)
    view = x.transpose(0, 1)  # [2, 4, 16], not contiguous
    norm = OffsetRMSNorm(16, EPS)
    norm.weight.data.copy_(w)
    with torch.no_grad():
        got = norm(view)
    torch.testing.assert_close(got.double(), _rms(view, 1 + w), rtol=1e-5, atol=1e-5)


def test_layer_norm_has_weight_bias_and_eps_and_matches_the_formula() -> None:
    ln = layer_norm(12, 1e-12)
    assert isinstance(ln, torch.nn.LayerNorm) and ln.eps == 1e-12 and ln.normalized_shape == (12,)
    x, w = _inputs((3, 12), seed=9)
    b = torch.arange(12.0) / 10
    ln.weight.data.copy_(w)
    ln.bias.data.copy_(b)
    with torch.no_grad():
        got = ln(x)
    h = x.double()
    mean, var = h.mean(-1, keepdim=True), h.var(-1, unbiased=False, keepdim=True)
    torch.testing.assert_close(got.double(), (h - mean) / torch.sqrt(var + 1e-12) * w.double() + b.double(),
                               rtol=1e-5, atol=1e-5)
