"""Half-split rotary position embedding (the HF Llama/Qwen2 convention, used by Bagel's LLM).

Rotation pairs are (x[j], x[j + d/2]), not the interleaved (x[2j], x[2j+1]) of FLUX / Qwen-Image:
mixing the two conventions up is the classic porting bug, so this file holds only the half-split one.
"""

from __future__ import annotations

import torch


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables of 1-D integer positions, each (N, head_dim) in fp32.

    Frequencies are theta^(-2i/d); the angle table is [freqs | freqs] so that it lines up with
    `rotate_half`. Computed in fp32 whatever the model dtype (as HF does), because bf16 cannot
    represent position * frequency for positions in the hundreds.
    """
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device).float() / head_dim))
    angles = positions.float()[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (N, heads, head_dim) by per-token tables (N, head_dim).

    The tables are cast to x's dtype first and the rotation runs in that dtype, as in HF Qwen2, so
    low-precision runs round where the reference rounds.
    """
    cos = cos.to(x.dtype)[:, None, :]
    sin = sin.to(x.dtype)[:, None, :]
    return x * cos + rotate_half(x) * sin
