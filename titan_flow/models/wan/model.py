"""Wan2.1 text-to-video diffusion transformer (Wan team 2025), a port of diffusers' `WanTransformer3DModel`.

A video latent (B, C, F, H, W) is cut into (1, 2, 2) patches, one token each, in (frame, row,
column) order. Every block runs self-attention over all the video's tokens with a 3-axis rotary
embedding, cross-attention to the UMT5 text sequence (512 tokens, zero padding included, no mask),
and an MLP. The diffusion time modulates self-attention and MLP through a per-block table:
(shift, scale, gate) x 2 = the block's learned (1, 6, D) table + a projection of the time embedding.
The query and key RMSNorms span all heads jointly (weight [D]), not each head.

Modulation sums, LayerNorms, residual adds, the time sinusoid and the RoPE rotation are computed in
fp32 and cast back where diffusers casts, so a bf16 forward rounds where the reference rounds.
Module names equal diffusers', so a diffusers state dict loads with the identity key mapping.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from titan_flow.models.common.attention import attention, merge_heads, split_heads
from titan_flow.models.common.embeddings import TextProjection, TimestepEmbedding, timestep_sinusoid
from titan_flow.models.common.layers import FeedForward
from titan_flow.models.common.norms import FP32LayerNorm
from titan_flow.models.common.axes_rope import apply_interleaved_rope, axes_rope_cos_sin
from titan_flow.models.wan.args import ROPE_THETA, WanArgs


class WanAttention(nn.Module):
    """Multi-head attention with RMS qk-norm across heads; self-attention (with RoPE) or cross-attention."""

    def __init__(self, dim: int, num_heads: int, eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])  # `to_out.0` in the checkpoints
        # torch's fused RMSNorm over the full width (all heads jointly), as diffusers' Wan: the same rounding
        # in bf16, and its backward keeps only the input and the inverse RMS
        self.norm_q = nn.RMSNorm(dim, eps=eps)
        self.norm_k = nn.RMSNorm(dim, eps=eps)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """x (B, S, D) queries; keys and values from `context` (B, L, D), or from x itself."""
        kv = x if context is None else context
        q = split_heads(self.norm_q(self.to_q(x)), self.num_heads)  # (B, heads, S, head_dim)
        k = split_heads(self.norm_k(self.to_k(kv)), self.num_heads)
        v = split_heads(self.to_v(kv), self.num_heads)
        if rope is not None:
            q, k = apply_interleaved_rope(q, *rope), apply_interleaved_rope(k, *rope)
        return self.to_out[0](merge_heads(attention(q, k, v)).type_as(q))


class WanTransformerBlock(nn.Module):
    """Modulated self-attention, plain cross-attention to the text, modulated MLP; gated residuals."""

    def __init__(self, args: WanArgs):
        super().__init__()
        dim = args.inner_dim
        self.norm1 = FP32LayerNorm(dim, args.eps, elementwise_affine=False)
        self.attn1 = WanAttention(dim, args.num_attention_heads, args.eps)
        self.attn2 = WanAttention(dim, args.num_attention_heads, args.eps)
        self.norm2 = FP32LayerNorm(dim, args.eps, elementwise_affine=True) if args.cross_attn_norm else nn.Identity()
        self.ffn = FeedForward(dim, inner_dim=args.ffn_dim)
        self.norm3 = FP32LayerNorm(dim, args.eps, elementwise_affine=False)
        # (shift, scale, gate) of the self-attention, then of the MLP, added to the time projection
        self.scale_shift_table = nn.Parameter(torch.empty(1, 6, dim))

    def forward(
        self, x: torch.Tensor, context: torch.Tensor, time_proj: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        """x (B, S, D) video tokens, context (B, L, D) text, time_proj (B, 6, D)."""
        modulation = self.scale_shift_table.float() + time_proj.float()
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation.chunk(6, dim=1)

        h = (self.norm1(x.float()) * (1 + scale_msa) + shift_msa).type_as(x)
        x = (x.float() + self.attn1(h, rope=rope) * gate_msa).type_as(x)

        h = self.norm2(x.float()).type_as(x)
        x = x + self.attn2(h, context=context)

        h = (self.norm3(x.float()) * (1 + scale_mlp) + shift_mlp).type_as(x)
        return (x.float() + self.ffn(h).float() * gate_mlp).type_as(x)


class WanConditionEmbedder(nn.Module):
    """Time: sinusoid -> MLP (temb, D) -> SiLU -> Linear (the blocks' 6 x D modulation); text: 2-layer MLP."""

    def __init__(self, args: WanArgs):
        super().__init__()
        dim = args.inner_dim
        self.freq_dim = args.freq_dim
        self.time_embedder = TimestepEmbedding(args.freq_dim, dim)
        self.act_fn = nn.SiLU()
        self.time_proj = nn.Linear(dim, 6 * dim)
        self.text_embedder = TextProjection(args.text_dim, dim, act="gelu_tanh")

    def forward(self, timestep: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(temb (B, D), time projection (B, 6, D), text context (B, L, D))."""
        features = timestep_sinusoid(timestep, self.freq_dim, flip_sin_to_cos=True, downscale_freq_shift=0.0)
        temb = self.time_embedder(features.to(self.time_embedder.linear_1.weight.dtype)).type_as(text)
        time_proj = self.time_proj(self.act_fn(temb)).unflatten(1, (6, -1))
        return temb, time_proj, self.text_embedder(text)


class WanTransformer(nn.Module):
    """The Wan velocity model: video latent (B, C, F, H, W) + UMT5 text -> velocity (B, C_out, F, H, W)."""

    def __init__(self, args: WanArgs):
        super().__init__()
        self.args = args
        dim = args.inner_dim
        self.patch_embedding = nn.Conv3d(args.in_channels, dim, kernel_size=args.patch_size, stride=args.patch_size)
        self.condition_embedder = WanConditionEmbedder(args)
        self.blocks = nn.ModuleList([WanTransformerBlock(args) for _ in range(args.num_layers)])
        self.norm_out = FP32LayerNorm(dim, args.eps, elementwise_affine=False)
        self.proj_out = nn.Linear(dim, args.out_channels * args.patch_size[0] * args.patch_size[1] * args.patch_size[2])
        self.scale_shift_table = nn.Parameter(torch.empty(1, 2, dim))  # (shift, scale) of the output head

    def init_weights(self) -> None:
        """Random init of every parameter (e.g. after `to_empty` from meta).

        Xavier-uniform linears and patch conv with zero biases, N(0, 0.02) time/text MLPs, unit norm
        scales, and the modulation tables N(0, 1/D) as diffusers initialises them. Nothing is zeroed,
        so a model trained from scratch starts with non-trivial velocities and gradients everywhere.
        """
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv3d)):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, (nn.RMSNorm, nn.LayerNorm)):
                module.reset_parameters()
        embedder = self.condition_embedder
        for mlp in (embedder.time_embedder, embedder.text_embedder):
            nn.init.normal_(mlp.linear_1.weight, std=0.02)
            nn.init.normal_(mlp.linear_2.weight, std=0.02)
        dim = self.args.inner_dim
        for table in [self.scale_shift_table, *(block.scale_shift_table for block in self.blocks)]:
            nn.init.normal_(table, std=dim**-0.5)

    def rope(self, frames: int, rows: int, cols: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin (frames*rows*cols, head_dim) of the token grid; positions are plain indices from 0."""
        limit = self.args.rope_max_seq_len
        if max(frames, rows, cols) > limit:
            raise ValueError(
                f"a video of {frames} x {rows} x {cols} tokens (frames x rows x columns) exceeds the RoPE table of "
                f"rope_max_seq_len={limit} positions per axis; use fewer frames or a smaller size"
            )
        grid = torch.meshgrid(*(torch.arange(n, device=device) for n in (frames, rows, cols)), indexing="ij")
        ids = torch.stack([g.reshape(-1) for g in grid], dim=1)  # (tokens, 3): (frame, row, column)
        return axes_rope_cos_sin(ids, self.args.rope_axes_dims, ROPE_THETA)

    def forward(
        self, hidden_states: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor
    ) -> torch.Tensor:
        """hidden_states (B, C_in, F, H, W) latent; timestep (B,) the scheduler's integer timestep
        (0..1000, not sigma); encoder_hidden_states (B, L, text_dim) UMT5 states, padding zeroed.

        Inputs are cast to the weights' dtype here, except the timestep, which enters the sinusoid in
        full precision (as diffusers).
        """
        dtype = self.patch_embedding.weight.dtype
        hidden_states, encoder_hidden_states = hidden_states.to(dtype), encoder_hidden_states.to(dtype)
        batch, _, frames, height, width = hidden_states.shape
        p_t, p_h, p_w = self.args.patch_size
        if frames % p_t or height % p_h or width % p_w:
            raise ValueError(
                f"latent of {frames} x {height} x {width} (frames x height x width) must be divisible by the patch "
                f"size {self.args.patch_size}"
            )
        f, h, w = frames // p_t, height // p_h, width // p_w
        rope = self.rope(f, h, w, hidden_states.device)

        x = self.patch_embedding(hidden_states).flatten(2).transpose(1, 2).contiguous()  # (B, f*h*w, D)
        temb, time_proj, context = self.condition_embedder(timestep, encoder_hidden_states)
        for block in self.blocks:
            x = block(x, context, time_proj, rope)

        shift, scale = (self.scale_shift_table.float() + temb.float()[:, None]).chunk(2, dim=1)
        x = self.proj_out((self.norm_out(x.float()) * (1 + scale) + shift).type_as(x))  # (B, f*h*w, p_t*p_h*p_w*C)
        x = x.reshape(batch, f, h, w, p_t, p_h, p_w, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return x.reshape(batch, -1, f * p_t, h * p_h, w * p_w)
