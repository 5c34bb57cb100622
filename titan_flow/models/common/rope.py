"""Rotary position embeddings in the two pairings the backbones use; mixing them up is the classic porting bug.

- half-split (`rope_cos_sin`, `apply_rope`): pairs (x[j], x[j + d/2]), the HF Llama/Qwen2 convention
  of Bagel's LLM;
- interleaved, per axis (`axial_rope_cos_sin`, `apply_interleaved_rope`): pairs (x[2j], x[2j+1]),
  the head dim split into one band per position axis (Wan: frame | row | column), as diffusers'
  `get_1d_rotary_pos_embed(..., repeat_interleave_real=True)` builds them for FLUX, Qwen-Image and Wan.
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


def axial_rope_cos_sin(
    axis_positions: list[torch.Tensor], axes_dims: list[int], theta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables for tokens on a grid, each (N, sum(axes_dims)) fp32, interleaved pairs.

    `axis_positions[a]` is the (N,) coordinate of every token along axis a; axis a gets a band of
    `axes_dims[a]` dims with frequencies theta^(-2i/d_a). Angles are formed in float64 (as diffusers
    does), because fp32 cannot hold position * frequency exactly for positions in the hundreds.
    """
    if len(axis_positions) != len(axes_dims):
        raise ValueError(f"{len(axis_positions)} position axes for {len(axes_dims)} RoPE bands {axes_dims}")
    cos, sin = [], []
    for pos, dim in zip(axis_positions, axes_dims):
        if dim % 2:
            raise ValueError(f"every RoPE band needs an even width, got {axes_dims}")
        inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device=pos.device) / dim)
        angles = torch.outer(pos.to(torch.float64), inv_freq)
        cos.append(angles.cos().repeat_interleave(2, dim=1))
        sin.append(angles.sin().repeat_interleave(2, dim=1))
    return torch.cat(cos, dim=1).float(), torch.cat(sin, dim=1).float()


def apply_interleaved_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[2j], x[2j+1]) of x (..., N, heads, head_dim) by tables (N, head_dim).

    The rotation runs in fp32 (the tables' dtype) and is cast back to x's dtype once, where
    diffusers rounds.
    """
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    c = cos[:, None, 0::2]
    s = sin[:, None, 1::2]
    out = torch.stack([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1).flatten(-2)
    return out.type_as(x)
