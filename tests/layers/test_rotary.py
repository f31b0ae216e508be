"""RoPE: cos/sin against the formula, each scaling type against transformers' own inverse frequencies, and
apply_rotary (compiled kernel and PyTorch) against the rotate-half formula."""

from __future__ import annotations

import math

import pytest
import torch

from lmkernel.errors import UnsupportedModelError
from lmkernel.layers import cpu_kernels
from lmkernel.layers.rotary import RotaryEmbedding, apply_rotary

HEAD_DIM, BASE, MAX_POS = 32, 10000.0, 256


def _angles(positions: list[int], inv_freq: list[float]) -> torch.Tensor:
    return torch.tensor([[p * f for f in inv_freq] for p in positions], dtype=torch.float64)


def test_default_cos_sin_follow_the_rope_formula() -> None:
    rope = RotaryEmbedding(HEAD_DIM, BASE, MAX_POS, None)
    assert rope.rope_type == "default" and rope.attention_scaling == 1.0
    inv = [BASE ** (-2 * i / HEAD_DIM) for i in range(HEAD_DIM // 2)]
    torch.testing.assert_close(rope.inv_freq.double(), torch.tensor(inv, dtype=torch.float64), rtol=1e-6, atol=0)
    positions = [0, 1, 7, 100, 255]
    cos, sin = rope.cos_sin(torch.tensor(positions), torch.float32)
    angles = _angles(positions, inv)
    assert cos.shape == (5, HEAD_DIM) and cos.dtype == torch.float32
    # both halves carry the same angles (rotate-half layout)
    torch.testing.assert_close(cos.double(), torch.cat([angles.cos()] * 2, -1), rtol=0, atol=1e-4)
    torch.testing.assert_close(sin.double(), torch.cat([angles.sin()] * 2, -1), rtol=0, atol=1e-4)
    assert torch.equal(cos[0], torch.ones(HEAD_DIM)) and torch.equal(sin[0], torch.zeros(HEAD_DIM))


def test_cos_sin_are_computed_in_float32_and_cast() -> None:
    rope = RotaryEmbedding(HEAD_DIM, BASE, MAX_POS, None)
    positions = torch.tensor([3, 200])
    cos32, sin32 = rope.cos_sin(positions, torch.float32)
    cos16, sin16 = rope.cos_sin(positions, torch.bfloat16)
    assert cos16.dtype == torch.bfloat16 and torch.equal(cos16, cos32.bfloat16()) and torch.equal(sin16, sin32.bfloat16())


def test_linear_scaling_divides_the_positions() -> None:
    plain = RotaryEmbedding(HEAD_DIM, BASE, MAX_POS, None)
    linear = RotaryEmbedding(HEAD_DIM, BASE, MAX_POS, {"type": "linear", "factor": 4.0})  # the older "type" key
    assert linear.rope_type == "linear"
    cos_l, sin_l = linear.cos_sin(torch.tensor([0, 4, 40, 400]), torch.float32)
    cos_p, sin_p = plain.cos_sin(torch.tensor([0, 1, 10, 100]), torch.float32)
    torch.testing.assert_close(cos_l, cos_p, rtol=0, atol=1e-5)
    torch.testing.assert_close(sin_l, sin_p, rtol=0, atol=1e-5)


SCALINGS = [
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 64},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 16, "beta_slow": 2,
     "attention_factor": 1.5},
    {"rope_type": "dynamic", "factor": 2.0},
]


@pytest.mark.parametrize("scaling", SCALINGS, ids=lambda s: s["rope_type"])
def test_scaled_inverse_frequencies_match_transformers(scaling: dict) -> None:
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = transformers.LlamaConfig(hidden_size=2 * HEAD_DIM, num_attention_heads=2, max_position_embeddings=MAX_POS,
                                      rope_parameters={"rope_theta": BASE, **scaling})
    inv, attention = ROPE_INIT_FUNCTIONS[scaling["rope_type"]](config, "cpu")
    rope = RotaryEmbedding(HEAD_DIM, BASE, MAX_POS, scaling)
    torch.testing.assert_close(rope.inv_freq, inv.float(), rtol=1e-6, atol=0)
    assert rope.attention_scaling == pytest.approx(attention)
    if scaling["rope_type"] == "dynamic":  # past the trained length the base grows, as transformers grows it
        longer, _ = ROPE_INIT_FUNCTIONS["dynamic"](config, "cpu", seq_len=600)
        torch.testing.assert_close(rope._dynamic_inv_freq(600), longer.float(), rtol=1e-6, atol=0)


def test_yarn_scales_cos_and_sin_by_its_attention_factor() -> None:
    scaling = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
    rope = RotaryEmbedding(HEAD_DIM, BASE, MAX_POS, scaling)
    assert rope.attention_scaling == pytest.approx(0.1 * math.log(4.0) + 1.0)
    cos, sin = rope.cos_sin(torch.tensor([0, 5]), torch.float32)
    torch.testing.assert_close(cos[0], torch.full((HEAD_DIM,), rope.attention_scaling))
    angles = 5 * rope.inv_freq.double()
    torch.testing.assert_close(sin[1].double(), torch.cat([angles.sin()] * 2) * rope.attention_scaling, rtol=0, atol=1e-5)


def test_dynamic_scaling_changes_only_sequences_past_the_trained_length() -> None:
    rope = RotaryEmbedding(HEAD_DIM, BASE, 16, {"rope_type": "dynamic", "factor": 2.0})
    plain = RotaryEmbedding(HEAD_DIM, BASE, 16, None)
    short, long = torch.arange(8), torch.arange(40)
    positions = torch.cat([short, long])
    cos, sin = rope.cos_sin(positions, torch.float32, cu_seqlens=(0, 8, 48))
    # the short sequence keeps the default frequencies
    torch.testing.assert_close(cos[:8], plain.cos_sin(short, torch.float32)[0])
    # the long one uses the base grown for its 40 positions: base * (f * L / L0 - (f - 1)) ** (d / (d - 2))
    base = BASE * (2.0 * 40 / 16 - 1.0) ** (HEAD_DIM / (HEAD_DIM - 2))
    inv = [base ** (-2 * i / HEAD_DIM) for i in range(HEAD_DIM // 2)]
    angles = _angles(list(range(40)), inv)
    torch.testing.assert_close(sin[8:].double(), torch.cat([angles.sin()] * 2, -1), rtol=0, atol=1e-4)
    assert not torch.allclose(sin[8:], plain.cos_sin(long, torch.float32)[1])
    # without bounds the whole batch is one sequence
    whole_cos, _ = rope.cos_sin(long, torch.float32)
    torch.testing.assert_close(whole_cos, cos[8:])


def test_an_unknown_scaling_type_is_named_with_the_supported_ones() -> None:
    with pytest.raises(UnsupportedModelError, match=r"rope scaling type 'longrope' is not supported; expected one of "
                                                    r"\['default', 'linear', 'dynamic', 'llama3', 'yarn'\]"):
        RotaryEmbedding(HEAD_DIM, BASE, MAX_POS, {"rope_type": "longrope", "factor": 2.0})


def _rotate_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Pairs (i, i + D/2) rotated by the angle: (a cos - b sin, b cos + a sin), in float64."""
    half = x.shape[-1] // 2
    a, b = x[..., :half].double(), x[..., half:].double()
    c, s = cos[:, None, :half].double(), sin[:, None, :half].double()
    return torch.cat([a * c - b * s, b * c + a * s], -1)


@pytest.mark.parametrize("use_kernel", [True, False])
def test_apply_rotary_rotates_each_half_pair(monkeypatch, use_kernel: bool) -> None:
    if use_kernel:
        assert cpu_kernels.build()
    else:
        monkeypatch.setattr(cpu_kernels, "_kernel", lambda: None)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, HEAD_DIM, generator=g)
    cos, sin = RotaryEmbedding(HEAD_DIM, BASE, MAX_POS, None).cos_sin(torch.tensor([0, 1, 2, 50, 200]), torch.float32)
    assert cpu_kernels.rotary_applies(x, cos, sin) == use_kernel
    with torch.no_grad():
        got = apply_rotary(x, cos, sin)
    assert got.shape == x.shape and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), _rotate_reference(x, cos, sin), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[0], x[0])  # position 0: no rotation
    torch.testing.assert_close(got.norm(dim=-1), x.norm(dim=-1))  # a rotation keeps lengths


def test_apply_rotary_bfloat16_and_relative_positions() -> None:
    g = torch.Generator().manual_seed(1)
    rope = RotaryEmbedding(HEAD_DIM, BASE, MAX_POS, None)
    q, k = torch.randn(1, 1, HEAD_DIM, generator=g), torch.randn(1, 1, HEAD_DIM, generator=g)
    # q.k after rotation depends only on the distance between the positions
    dots = []
    for m, n in [(3, 1), (12, 10), (102, 100)]:
        cq, sq = rope.cos_sin(torch.tensor([m]), torch.float32)
        ck, sk = rope.cos_sin(torch.tensor([n]), torch.float32)
        dots.append(float((apply_rotary(q, cq, sq) * apply_rotary(k, ck, sk)).sum()))
    assert dots == pytest.approx([dots[0]] * 3, abs=1e-4)
    cos, sin = rope.cos_sin(torch.tensor([7]), torch.bfloat16)
    got = apply_rotary(q.bfloat16(), cos, sin)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.double(), _rotate_reference(q.bfloat16(), cos, sin), rtol=2e-2, atol=2e-2)
