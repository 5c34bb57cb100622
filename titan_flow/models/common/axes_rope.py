"""Multi-axis rotary position embedding with interleaved pairs (FLUX; Qwen-Image rotates the same way).

Each token carries one integer position per axis (FLUX: (frame, row, col) with frame 0 for the
image being generated, 1 for a Kontext condition image, and all zeros for text). The head dim is
split into one slice per axis, and the slice of axis a rotates pairs (x[2j], x[2j+1]) by the
angle pos_a * theta^(-2j/d_a). This is not the half-split convention of models/common/rope.py.
"""

from __future__ import annotations

from typing import Sequence

import torch


def axes_rope_cos_sin(ids: torch.Tensor, axes_dims: Sequence[int], theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables (N, sum(axes_dims)) in fp32 for positions `ids` (N, n_axes).

    Frequencies and angles are computed in float64, as diffusers does for FLUX: in fp32 the angle
    pos * freq of a large position is off by more than the 1e-6 a parity test can tolerate.
    """
    if ids.ndim != 2 or ids.shape[1] != len(axes_dims):
        raise ValueError(f"position ids must have shape (tokens, {len(axes_dims)}), got {tuple(ids.shape)}")
    if any(d % 2 for d in axes_dims):
        raise ValueError(f"every RoPE axis needs an even number of dims, got {tuple(axes_dims)}")
    cos, sin = [], []
    positions = ids.to(torch.float64)
    for axis, dim in enumerate(axes_dims):
        freqs = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device=ids.device) / dim)
        angles = torch.outer(positions[:, axis], freqs)
        cos.append(angles.cos().repeat_interleave(2, dim=1))
        sin.append(angles.sin().repeat_interleave(2, dim=1))
    return torch.cat(cos, dim=1).float(), torch.cat(sin, dim=1).float()


def apply_interleaved_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (..., N, head_dim) by tables (N, head_dim): x cos + rot(x) sin with rot(x)_{2j,2j+1} =
    (-x_{2j+1}, x_{2j}). Computed in fp32 and cast back to x's dtype (diffusers' rounding point)."""
    real, imag = x.unflatten(-1, (-1, 2)).unbind(-1)
    rotated = torch.stack([-imag, real], dim=-1).flatten(-2)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)
