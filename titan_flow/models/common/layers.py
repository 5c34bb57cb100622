"""Feed-forward layers shared by the DiT backbones (diffusers key names: net.0.proj, net.2)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class GELUProjection(nn.Module):
    """Linear followed by tanh-approximated GELU (diffusers `GELU(approximate="tanh")`)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x), approximate="tanh")


class FeedForward(nn.Module):
    """dim -> inner (default mult*dim) -> dim_out MLP with GELU-tanh, biases on both layers."""

    def __init__(self, dim: int, dim_out: int | None = None, mult: int = 4, inner_dim: int | None = None):
        super().__init__()
        inner = inner_dim or mult * dim
        # net.1 is the dropout slot in diffusers; Identity keeps the checkpoint's key numbering.
        self.net = nn.Sequential(GELUProjection(dim, inner), nn.Identity(), nn.Linear(inner, dim_out or dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
