"""Feed-forward and attention layers shared by the DiT backbones (SD3, Qwen-Image, ...).

Module names follow diffusers (`net.0.proj`, `net.2`; `to_q`, `add_q_proj`, `norm_added_q`,
`to_out.0`, `to_add_out`), so diffusers checkpoints load with the identity key mapping.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from titan_flow.models.common.attention import attention
from titan_flow.models.common.norms import RMSNorm
from titan_flow.models.common.rope import apply_complex_rope

QK_NORMS = (None, "rms_norm")


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


def heads_after_tokens(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, L, H*Dh) -> (B, L, H, Dh), a view: heads stay after tokens (as diffusers), so qk-norm, RoPE and the
    concatenation of streams work on contiguous memory; only `attend` transposes, as views."""
    return x.unflatten(-1, (num_heads, -1))


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Attention over (B, L, H, Dh) queries/keys/values -> (B, L, H*Dh)."""
    out = attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask=mask)
    return out.transpose(1, 2).flatten(2)


# The complex table exp(i * angle) of the interleaved rotary embedding, (L, head_dim / 2), for one token
# stream (models.common.rope.rotation); applied to (B, L, H, head_dim) queries and keys.
Rotary = torch.Tensor


def _rotate(q: torch.Tensor, k: torch.Tensor, rotary: Rotary | None) -> tuple[torch.Tensor, torch.Tensor]:
    if rotary is None:
        return q, k
    return apply_complex_rope(q, rotary), apply_complex_rope(k, rotary)


class SelfAttention(nn.Module):
    """Multi-head attention over one token stream, with optional RMS qk-norm per head."""

    def __init__(self, dim: int, num_heads: int, head_dim: int, qk_norm: str | None):
        super().__init__()
        if qk_norm not in QK_NORMS:
            raise ValueError(f"qk_norm={qk_norm!r} is not supported; use one of {QK_NORMS}")
        self.num_heads = num_heads
        inner = num_heads * head_dim
        self.to_q = nn.Linear(dim, inner)
        self.to_k = nn.Linear(dim, inner)
        self.to_v = nn.Linear(dim, inner)
        self.norm_q = RMSNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.norm_k = RMSNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.to_out = nn.ModuleList([nn.Linear(inner, dim)])  # `to_out.0` in the checkpoints

    def project(self, x: torch.Tensor, rotary: Rotary | None = None) -> tuple[torch.Tensor, ...]:
        """Per-head (B, L, H, Dh) queries, keys and values: projected, qk-normed, then rotated."""
        q = self.norm_q(heads_after_tokens(self.to_q(x), self.num_heads))
        k = self.norm_k(heads_after_tokens(self.to_k(x), self.num_heads))
        q, k = _rotate(q, k, rotary)
        return q, k, heads_after_tokens(self.to_v(x), self.num_heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.to_out[0](attend(*self.project(x)))


class JointAttention(SelfAttention):
    """Two token streams, image x and text (context) c, each with its own projections and qk-norms,
    attending as one concatenated sequence.

    `context_first` puts the text first ([c; x]: FLUX, Qwen-Image) rather than last ([x; c]: SD3).
    Each stream may carry its own rotary tables (`rotary` / `context_rotary`), applied after the
    qk-norm. `context_mask` (B, L_c), True for real text tokens, removes padded text tokens as keys;
    every query row still attends to all image tokens, so no row is empty. With `context_pre_only`
    (SD3's last block) the text output is not needed: there is no `to_add_out` and None is returned
    for the text stream.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        head_dim: int,
        qk_norm: str | None,
        context_pre_only: bool = False,
        context_first: bool = False,
    ):
        super().__init__(dim, num_heads, head_dim, qk_norm)
        inner = num_heads * head_dim
        self.context_first = context_first
        self.add_q_proj = nn.Linear(dim, inner)
        self.add_k_proj = nn.Linear(dim, inner)
        self.add_v_proj = nn.Linear(dim, inner)
        self.norm_added_q = RMSNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.norm_added_k = RMSNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.to_add_out = None if context_pre_only else nn.Linear(inner, dim)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor,
        rotary: Rotary | None = None,
        context_rotary: Rotary | None = None,
        context_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        q, k, v = self.project(x, rotary)
        q_c = self.norm_added_q(heads_after_tokens(self.add_q_proj(context), self.num_heads))
        k_c = self.norm_added_k(heads_after_tokens(self.add_k_proj(context), self.num_heads))
        q_c, k_c = _rotate(q_c, k_c, context_rotary)
        v_c = heads_after_tokens(self.add_v_proj(context), self.num_heads)

        streams = ((q_c, k_c, v_c), (q, k, v)) if self.context_first else ((q, k, v), (q_c, k_c, v_c))
        joint_q, joint_k, joint_v = (torch.cat(pair, dim=1) for pair in zip(*streams))
        mask = None
        if context_mask is not None:
            image_keys = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
            keys = (context_mask.bool(), image_keys) if self.context_first else (image_keys, context_mask.bool())
            mask = torch.cat(keys, dim=1)[:, None, None, :]  # (B, 1, 1, S): a key-padding mask
        out = attend(joint_q, joint_k, joint_v, mask=mask)

        n_ctx, n_img = context.shape[1], x.shape[1]
        out_c, out_x = out.split([n_ctx, n_img], dim=1) if self.context_first else out.split([n_img, n_ctx], dim=1)[::-1]
        x_out = self.to_out[0](out_x)
        if self.to_add_out is None:
            return x_out, None
        return x_out, self.to_add_out(out_c)
