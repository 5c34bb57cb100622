"""Rotary position embeddings in the two layouts the backbones use.

- Half-split (HF Llama/Qwen2, Bagel's LLM): rotation pairs are (x[j], x[j + d/2]); `rope_cos_sin` +
  `apply_rope`.
- Interleaved (FLUX, Qwen-Image): pairs are (x[2j], x[2j+1]), i.e. x viewed as d/2 complex numbers
  multiplied by exp(i * angle); `rope_angles` (one table per position axis, concatenated by the
  model) -> `rotation` -> `apply_complex_rope`.

Mixing the two layouts up is the classic porting bug, so each function says which one it is.
"""

from __future__ import annotations

import torch


def rope_angles(positions: torch.Tensor, dim: int, theta: float) -> torch.Tensor:
    """Angles position * theta^(-2i/dim), i < dim/2, as an (N, dim/2) fp32 table.

    Computed in fp32 whatever the model dtype (as HF and diffusers' Qwen-Image do), because bf16
    cannot represent position * frequency for positions in the hundreds. Positions may be negative
    (Qwen-Image centres its image grid on 0).
    """
    if dim % 2:
        raise ValueError(f"RoPE needs an even dimension, got {dim}")
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device=positions.device).float() / dim))
    return positions.float()[:, None] * inv_freq[None, :]


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Half-split layout: cos/sin tables of 1-D positions, each (N, head_dim) in fp32, [freqs | freqs]
    so that they line up with `rotate_half`."""
    angles = rope_angles(positions, head_dim, theta)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Half-split layout: rotate x (N, heads, head_dim) by per-token tables (N, head_dim).

    The tables are cast to x's dtype first and the rotation runs in that dtype, as in HF Qwen2, so
    low-precision runs round where the reference rounds.
    """
    cos = cos.to(x.dtype)[:, None, :]
    sin = sin.to(x.dtype)[:, None, :]
    return x * cos + rotate_half(x) * sin


def rotation(angles: torch.Tensor) -> torch.Tensor:
    """Interleaved layout: the complex table exp(i * angles), complex64 (computed as diffusers' torch.polar)."""
    return torch.polar(torch.ones_like(angles), angles)


def apply_complex_rope(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """Interleaved layout: rotate the pairs (x[..., 2j], x[..., 2j+1]) of x (B, L, heads, D) by a per-token
    complex table (L, D/2) from `rotation`.

    The complex product (x_2j + i x_2j+1) * exp(i angle_j) is taken in fp32 and cast back to x's dtype, as
    diffusers' FLUX / Qwen-Image do. The tables are activations computed in the forward, never
    parameters, so no complex tensor reaches FSDP2.
    """
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(pairs * rotation[:, None, :]).flatten(-2).type_as(x)
