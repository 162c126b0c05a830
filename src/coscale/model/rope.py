"""Rotary position embedding with YaRN context extension, in DeepSeek's conventions.

- Pairs are interleaved: dimensions (2i, 2i+1) rotate together by angle pos * inv_freq[i]
  (DeepSeek's `apply_rotary_emb` views them as complex numbers; HF's remote code permutes to the
  half-split layout first, which leaves every q.k product unchanged).
- YaRN (arXiv 2309.00071) blends interpolated and extrapolated frequencies with a linear ramp between
  the correction dimensions of `beta_fast` and `beta_slow` rotations, and scales cos/sin by
  mscale(factor, mscale) / mscale(factor, mscale_all_dim); the softmax scale gets mscale_all_dim's
  factor squared (ModelConfig.softmax_scale). As in HF's implementation the scaling is a property of
  the config, applied at every sequence length.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from coscale.config import ModelConfig, yarn_get_mscale
from coscale.model.norm import apply_keeping_float32, upcast


def _correction_dim(num_rotations: float, dim: int, base: float, max_pos: int) -> float:
    return dim * math.log(max_pos / (num_rotations * 2 * math.pi)) / (2 * math.log(base))


def yarn_inv_freq(dim: int, base: float, rope_scaling: dict | None) -> torch.Tensor:
    """inverse frequencies [dim/2] in float32, YaRN-blended when rope_scaling is set."""
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64, device="cpu") / dim))
    if not rope_scaling:
        return inv_freq.float()
    factor = float(rope_scaling["factor"])
    original = int(rope_scaling["original_max_position_embeddings"])
    beta_fast = float(rope_scaling.get("beta_fast", 32))
    beta_slow = float(rope_scaling.get("beta_slow", 1))
    low = max(math.floor(_correction_dim(beta_fast, dim, base, original)), 0)
    high = min(math.ceil(_correction_dim(beta_slow, dim, base, original)), dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float64, device="cpu") - low) / (high - low)).clamp(0, 1)
    extrapolate = 1 - ramp  # 1 for high-frequency dims kept as they are
    inv_freq = inv_freq / factor * (1 - extrapolate) + inv_freq * extrapolate
    return inv_freq.float()


class RotaryEmbedding(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.dim = cfg.qk_rope_head_dim
        self.base = cfg.rope_theta
        self.rope_scaling = cfg.rope_scaling
        rs = cfg.rope_scaling
        self.mscale = 1.0
        if rs:
            factor = float(rs["factor"])
            self.mscale = yarn_get_mscale(factor, float(rs.get("mscale", 1))) / yarn_get_mscale(
                factor, float(rs.get("mscale_all_dim", 0) or 0)
            )
        self.register_buffer("inv_freq", yarn_inv_freq(self.dim, self.base, rs), persistent=False)

    def init_buffers(self) -> None:
        """Recompute inv_freq in place (after `to_empty`, e.g. when a checkpoint streams into a
        model built on the meta device)."""
        with torch.no_grad():
            self.inv_freq.copy_(yarn_inv_freq(self.dim, self.base, self.rope_scaling))

    def _apply(self, fn, recurse=True):
        apply_keeping_float32(self, fn, ("inv_freq",))
        return self

    def forward(self, start_pos: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape [seq_len, dim/2] (float64) for positions start_pos .. start_pos+seq_len-1."""
        return self.at(torch.arange(start_pos, start_pos + seq_len, device=self.inv_freq.device))

    def at(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape [N, dim/2] (float64) for any positions [N] (a batch of sequences)."""
        angles = torch.outer(positions.double(), self.inv_freq.double())  # float64: exact angles at 128K positions
        return angles.cos() * self.mscale, angles.sin() * self.mscale


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of x [B, S, n, d] by cos/sin [S, d/2]; float32 math, x's dtype out."""
    dtype = x.dtype
    x = upcast(x).unflatten(-1, (-1, 2))  # (B, S, n, d/2, 2)
    x_even, x_odd = x[..., 0], x[..., 1]
    cos, sin = cos[None, :, None, :].to(x.dtype), sin[None, :, None, :].to(x.dtype)
    out = torch.stack((x_even * cos - x_odd * sin, x_even * sin + x_odd * cos), dim=-1)
    return out.flatten(-2).to(dtype)
