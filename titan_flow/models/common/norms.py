"""RMSNorm and the adaptive layer norms (adaLN) that inject the timestep/text conditioning.

Parameter names follow diffusers (`weight`, `linear`) so diffusers checkpoints load unchanged.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class RMSNorm(nn.Module):
    """RMS normalisation over the last dim with a learned scale, in one of two rounding variants.

    The statistics are always taken in fp32. The variants differ only in where a low-precision
    result is rounded, which matters for bitwise parity with the reference of each backbone:
    - default (diffusers `RMSNorm`): normalise, cast to the weight dtype if that is fp16/bf16,
      then multiply by the weight;
    - `weight_after_cast=True` (HF `Qwen2RMSNorm`, used by Bagel): normalise in fp32, cast back
      to the input dtype, then multiply by the weight;
    - `scale_in_fp32=True` (`torch.nn.RMSNorm`, which diffusers' FLUX uses): normalise and multiply by
      the weight in fp32, round once at the end.
    """

    def __init__(self, dim: int, eps: float = 1e-6, weight_after_cast: bool = False, scale_in_fp32: bool = False):
        super().__init__()
        if weight_after_cast and scale_in_fp32:
            raise ValueError("RMSNorm: choose at most one of weight_after_cast and scale_in_fp32")
        self.eps = eps
        self.weight_after_cast = weight_after_cast
        self.scale_in_fp32 = scale_in_fp32
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scale_in_fp32:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        if self.weight_after_cast:
            x32 = x.float()
            x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
            return self.weight * x32.to(x.dtype)
        variance = x.float().pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return x * self.weight


class FP32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 whatever the input and weight dtypes, returned in the input's dtype.

    For backbones that keep their norms in fp32 under bf16 (Wan's `_keep_in_fp32_modules`): the
    weights (when affine) are read as fp32 even if FSDP hands them over in bf16.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).to(x.dtype)


def _layer_norm(dim: int) -> nn.LayerNorm:
    """The parameter-free LayerNorm every adaLN uses: the modulation supplies scale and shift."""
    return nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)


class AdaLayerNormZero(nn.Module):
    """adaLN-zero: SiLU -> Linear(emb) gives (shift, scale, gate) for attention and for the MLP.

    Returns the modulated LN(x) for attention and the attention gate plus the MLP's
    shift, scale and gate, which the block applies after the attention residual.
    """

    num_chunks = 6

    def __init__(self, dim: int):
        super().__init__()
        self.silu = nn.SiLU()
        self.linear = nn.Linear(dim, self.num_chunks * dim)
        self.norm = _layer_norm(dim)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> tuple[torch.Tensor, ...]:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.linear(self.silu(emb)).chunk(6, dim=1)
        x = self.norm(x) * (1 + scale_msa[:, None]) + shift_msa[:, None]
        return x, gate_msa, shift_mlp, scale_mlp, gate_mlp


class AdaLayerNormZeroSingle(nn.Module):
    """adaLN-zero of a single-stream block (FLUX): (shift, scale, gate) for one residual branch.

    Returns the modulated LN(x) and the gate.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.silu = nn.SiLU()
        self.linear = nn.Linear(dim, 3 * dim)
        self.norm = _layer_norm(dim)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shift, scale, gate = self.linear(self.silu(emb)).chunk(3, dim=1)
        return self.norm(x) * (1 + scale[:, None]) + shift[:, None], gate


class AdaLayerNormZeroX(AdaLayerNormZero):
    """SD3.5 dual-attention adaLN-zero: three more chunks (shift, scale, gate) for the second attention.

    Both attention inputs are modulated from the same LN(x), taken before either residual update.
    Returns (x_attn, gate_msa, shift_mlp, scale_mlp, gate_mlp, x_attn2, gate_msa2).
    """

    num_chunks = 9

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> tuple[torch.Tensor, ...]:
        chunks = self.linear(self.silu(emb)).chunk(9, dim=1)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp, shift_msa2, scale_msa2, gate_msa2 = chunks
        normed = self.norm(x)
        x = normed * (1 + scale_msa[:, None]) + shift_msa[:, None]
        x2 = normed * (1 + scale_msa2[:, None]) + shift_msa2[:, None]
        return x, gate_msa, shift_mlp, scale_mlp, gate_mlp, x2, gate_msa2


class AdaLayerNormContinuous(nn.Module):
    """Final-layer adaLN without gates: LN(x)(1+scale)+shift, with (scale, shift) in that order.

    The original SAI/BFL checkpoints store (shift, scale); the state-dict adapters swap the halves.
    """

    def __init__(self, dim: int, conditioning_dim: int):
        super().__init__()
        self.silu = nn.SiLU()
        self.linear = nn.Linear(conditioning_dim, 2 * dim)
        self.norm = _layer_norm(dim)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        scale, shift = self.linear(self.silu(cond).to(x.dtype)).chunk(2, dim=1)
        return self.norm(x) * (1 + scale[:, None]) + shift[:, None]
