"""Rotary position embeddings (RoPE) with the scaling schemes of Hugging Face configs."""

from __future__ import annotations

import math
from typing import Any

import torch

from lmkernel.errors import UnsupportedModelError
from lmkernel.layers import cpu_kernels

ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")


def _inv_freq(dim: int, base: float) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def _llama3_inv_freq(inv_freq: torch.Tensor, s: dict[str, Any]) -> torch.Tensor:
    factor, low, high = s["factor"], s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
    old_len = s["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


def _yarn_inv_freq(dim: int, base: float, s: dict[str, Any], max_pos: int) -> tuple[torch.Tensor, float]:
    factor = s["factor"]
    old_len = s.get("original_max_position_embeddings") or max_pos
    mscale = s.get("attention_factor")
    if mscale is None:
        mscale = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0
    beta_fast, beta_slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1

    def correction_dim(num_rot: float) -> float:
        return (dim * math.log(old_len / (num_rot * 2 * math.pi))) / (2 * math.log(base))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    inv = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv, float(mscale)


class RotaryEmbedding:
    """Computes cos/sin for given positions and rotates query and key heads (the rotate-half layout)."""

    def __init__(self, head_dim: int, base: float, max_position: int, scaling: dict[str, Any] | None) -> None:
        self.head_dim, self.base, self.max_position = head_dim, base, max_position
        self.scaling = dict(scaling or {})
        self.rope_type = self.scaling.get("rope_type", self.scaling.get("type", "default"))
        if self.rope_type not in ROPE_TYPES:
            raise UnsupportedModelError(
                f"rope scaling type '{self.rope_type}' is not supported; expected one of {list(ROPE_TYPES)}"
            )
        self.attention_scaling = 1.0
        with torch.device("cpu"):
            inv_freq = _inv_freq(head_dim, base)
            if self.rope_type == "linear":
                inv_freq = inv_freq / self.scaling["factor"]
            elif self.rope_type == "llama3":
                inv_freq = _llama3_inv_freq(inv_freq, self.scaling)
            elif self.rope_type == "yarn":
                inv_freq, self.attention_scaling = _yarn_inv_freq(head_dim, base, self.scaling, max_position)
        # A plain attribute, not a buffer: models are built on the meta device and loaded with
        # assign=True, which would leave a buffer without data.
        self.inv_freq = inv_freq

    def _dynamic_inv_freq(self, max_seen: int) -> torch.Tensor:
        """NTK-aware dynamic scaling: the base grows once positions pass the trained length."""
        old_len = self.scaling.get("original_max_position_embeddings") or self.max_position
        if max_seen <= old_len:
            return self.inv_freq
        factor = self.scaling["factor"]
        base = self.base * ((factor * max_seen / old_len) - (factor - 1)) ** (self.head_dim / (self.head_dim - 2))
        return _inv_freq(self.head_dim, base)

    def cos_sin(
        self, positions: torch.Tensor, dtype: torch.dtype, cu_seqlens: tuple[int, ...] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [N, head_dim] for integer positions [N], computed in float32.

        Dynamic scaling depends on each sequence's length, so it needs the sequence bounds.
        """
        if self.rope_type == "dynamic":
            bounds = cu_seqlens or (0, positions.shape[0])
            parts = [self._freqs(positions[s:e], self._dynamic_inv_freq(int(positions[s:e].max()) + 1))
                     for s, e in zip(bounds[:-1], bounds[1:]) if e > s]
            freqs = torch.cat(parts)
        else:
            freqs = self._freqs(positions, self.inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.attention_scaling).to(dtype), (emb.sin() * self.attention_scaling).to(dtype)

    @staticmethod
    def _freqs(positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
        return positions.float()[:, None] * inv_freq.to(positions.device)[None, :]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [N, heads, head_dim] by the angles in cos/sin [N, head_dim]."""
    if cpu_kernels.rotary_applies(x, cos, sin):
        return cpu_kernels.rotary(x, cos, sin)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]
