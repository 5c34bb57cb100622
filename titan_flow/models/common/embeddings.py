"""Timestep, pooled-text and 2-D position embeddings shared by the backbones.

Parameter names follow diffusers (`linear_1`, `linear_2`) so that diffusers checkpoints load with
the identity key mapping.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def timestep_sinusoid(
    t: torch.Tensor,
    dim: int = 256,
    flip_sin_to_cos: bool = True,
    downscale_freq_shift: float = 0.0,
    scale: float = 1.0,
    max_period: float = 10000,
) -> torch.Tensor:
    """Sinusoidal features of a (B,) timestep, (B, dim) in fp32.

    Frequencies are exp(-ln(max_period) * i / (dim/2 - downscale_freq_shift)); the features are
    [cos | sin] when `flip_sin_to_cos` (SD3, Flux, Bagel) and [sin | cos] otherwise. The math is
    done in fp32 whatever the input dtype, because bf16 cannot resolve t*f for t up to 1000.
    """
    if t.ndim != 1:
        raise ValueError(f"timestep must be a 1-D tensor of shape (batch,), got shape {tuple(t.shape)}")
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(exponent / (half - downscale_freq_shift))
    args = scale * (t[:, None].float() * freqs[None, :])
    if flip_sin_to_cos:
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    else:
        emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)
    if dim % 2 == 1:
        emb = F.pad(emb, (0, 1))
    return emb


class TimestepEmbedding(nn.Module):
    """MLP on the sinusoidal timestep features: linear_2(SiLU(linear_1(e)))."""

    def __init__(self, in_channels: int, embed_dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, embed_dim)
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(embed_dim, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class TextProjection(nn.Module):
    """PixArt-alpha projection of a text embedding: linear_2(act(linear_1(y))), act SiLU (SD3's pooled
    text) or tanh-GELU ("gelu_tanh", Wan's UMT5 sequence)."""

    def __init__(self, in_features: int, hidden_size: int, act: str = "silu"):
        super().__init__()
        acts = {"silu": nn.SiLU, "gelu_tanh": lambda: nn.GELU(approximate="tanh")}
        if act not in acts:
            raise ValueError(f"TextProjection: act {act!r} is not one of {sorted(acts)}")
        self.linear_1 = nn.Linear(in_features, hidden_size)
        self.act_1 = acts[act]()
        self.linear_2 = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act_1(self.linear_1(x)))


def _sincos_1d(embed_dim: int, pos: torch.Tensor) -> torch.Tensor:
    """[sin(pos*w) | cos(pos*w)] with w_i = 10000^(-i/(D/2)), in float64."""
    omega = torch.arange(embed_dim // 2, dtype=torch.float64, device=pos.device) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega
    out = torch.outer(pos.reshape(-1).double(), omega)
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def get_2d_sincos_pos_embed(
    embed_dim: int,
    grid_size: int,
    base_size: int,
    interpolation_scale: float = 1.0,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Fixed 2-D sin-cos table for a grid_size x grid_size grid, (grid_size**2, embed_dim) fp32.

    Row r*grid_size + c is the token at row r, column c. The coordinates are
    arange(grid_size) / (grid_size / base_size) / interpolation_scale, so a grid larger than the
    training grid (`base_size`) is mapped onto the same coordinate range [0, base_size). The first half of the
    dims encodes the column and the second half the row (diffusers/MAE layout, which the SD3
    checkpoints store). Frequencies and products are computed in float64 as the reference does; the
    table is assembled from one 1-D table per axis, so building SD3.5's 384x384 grid stays cheap.
    """
    if embed_dim % 4 != 0:
        raise ValueError(f"embed_dim must be divisible by 4 for a 2-D sin-cos table, got {embed_dim}")
    coords = torch.arange(grid_size, dtype=torch.float32, device=device) / (grid_size / base_size) / interpolation_scale
    per_coord = _sincos_1d(embed_dim // 2, coords).float()  # (grid_size, D/2): one row per coordinate value
    cols = per_coord[None, :, :].expand(grid_size, grid_size, -1)
    rows = per_coord[:, None, :].expand(grid_size, grid_size, -1)
    return torch.cat([cols, rows], dim=-1).reshape(grid_size * grid_size, embed_dim)
