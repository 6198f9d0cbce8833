"""Rotary embeddings with YaRN (DSA_SPEC §3), and the two pairings the model uses.

MLA rotates ADJACENT channel pairs (x0, x1), (x2, x3), ...; the indexer rotates HALF-SPLIT pairs
(x_i, x_{i + d/2}). Mixing them up runs fine and quietly degrades long-context retrieval, so both
are pinned by hand-computed tests.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..config import ModelConfig


def yarn_inv_freq(config: ModelConfig) -> Tensor:
    """[d/2] float32 inverse frequencies, YaRN-corrected whenever rope_scaling is present (the HF
    convention; DeepSeek's reference corrects only when its run-time max_seq_len exceeds
    original_seq_len, which holds for every practical setting)."""
    d, theta = config.qk_rope_head_dim, config.rope_theta
    inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    y = config.yarn
    if y is None:
        return inv_freq

    def corr(rotations: float) -> float:
        return d * math.log(y.original_seq_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(corr(y.beta_fast)), 0)
    high = min(math.ceil(corr(y.beta_slow)), d - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(d // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    smooth = 1 - ramp
    return inv_freq / y.factor * (1 - smooth) + inv_freq * smooth


def rope_tables(config: ModelConfig, max_seq_len: int,
                device: torch.device | None = None) -> tuple[Tensor, Tensor]:
    """(cos, sin), each [max_seq_len, d/2] float32: angle(t, i) = t * inv_freq_i."""
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), yarn_inv_freq(config))
    return angles.cos().to(device), angles.sin().to(device)


def apply_rope_interleaved(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pairs (x_2i, x_2i+1). x [..., T, H, d] or [T, d]-like with cos/sin [T, d/2]
    broadcast over heads by the caller's shapes; computed in float32."""
    xf = x.float().unflatten(-1, (-1, 2))
    a, b = xf[..., 0], xf[..., 1]
    return torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2).to(x.dtype)


def apply_rope_half(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pairs (x_i, x_{i+d/2}) (the "rotate-half" / NeoX pairing)."""
    xf = x.float()
    a, b = xf.chunk(2, dim=-1)
    return torch.cat((a * cos - b * sin, a * sin + b * cos), dim=-1).to(x.dtype)
