"""SD3 / SD3.5 MMDiT backbone (Esser et al. 2024), a port of diffusers' `SD3Transformer2DModel`.

Image tokens (patchified latent + fixed sin-cos positions) and text tokens (CLIP||T5 sequence) keep
separate weights but attend jointly as one [image; text] sequence in every block. A conditioning
vector (timestep + pooled CLIP text) modulates every block through adaLN-zero. SD3.5 adds RMS
qk-norm and, in the first blocks, a second image-only attention ("dual attention").

Module names equal diffusers', so a diffusers state dict loads with the identity key mapping.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from titan_flow.models.common.attention import attention, merge_heads, split_heads
from titan_flow.models.common.embeddings import (
    TextProjection,
    TimestepEmbedding,
    get_2d_sincos_pos_embed,
    timestep_sinusoid,
)
from titan_flow.models.common.layers import FeedForward
from titan_flow.models.common.norms import AdaLayerNormContinuous, AdaLayerNormZero, AdaLayerNormZeroX, RMSNorm
from titan_flow.models.sd3.args import SD3Args


class PatchEmbed(nn.Module):
    """Conv patchify plus the centre crop of a fixed M x M sin-cos table (M = pos_embed_max_size).

    The table is a persistent buffer because the checkpoints carry it; `init_weights` fills it for a
    model built from scratch.
    """

    def __init__(self, patch_size: int, in_channels: int, dim: int, pos_embed_max_size: int, base_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.pos_embed_max_size = pos_embed_max_size
        self.base_size = base_size
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)
        self.register_buffer("pos_embed", torch.empty(1, pos_embed_max_size**2, dim), persistent=True)

    def reset_pos_embed(self) -> None:
        table = get_2d_sincos_pos_embed(
            self.pos_embed.shape[-1], self.pos_embed_max_size, self.base_size, device=self.pos_embed.device
        )
        with torch.no_grad():
            self.pos_embed.copy_(table.unsqueeze(0))

    def cropped_pos_embed(self, h: int, w: int) -> torch.Tensor:
        m = self.pos_embed_max_size
        if h > m or w > m:
            raise ValueError(
                f"latent of {h}x{w} patches exceeds pos_embed_max_size={m}; use a smaller resolution "
                f"(at most {m * self.patch_size} latent pixels per side)"
            )
        top, left = (m - h) // 2, (m - w) // 2
        table = self.pos_embed.reshape(1, m, m, -1)[:, top : top + h, left : left + w, :]
        return table.reshape(1, h * w, -1)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        height, width = latent.shape[-2:]
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(f"latent size {height}x{width} must be divisible by patch_size={self.patch_size}")
        h, w = height // self.patch_size, width // self.patch_size
        x = self.proj(latent).flatten(2).transpose(1, 2)  # (B, h*w, D), row-major tokens
        return (x + self.cropped_pos_embed(h, w)).to(x.dtype).contiguous()


class TimestepTextEmbedding(nn.Module):
    """Conditioning vector: MLP(sinusoid(timestep)) + MLP(pooled text)."""

    def __init__(self, dim: int, pooled_projection_dim: int):
        super().__init__()
        self.timestep_embedder = TimestepEmbedding(256, dim)
        self.text_embedder = TextProjection(pooled_projection_dim, dim)

    def forward(self, timestep: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        t_features = timestep_sinusoid(timestep, 256, flip_sin_to_cos=True, downscale_freq_shift=0.0)
        return self.timestep_embedder(t_features.to(pooled.dtype)) + self.text_embedder(pooled)


class SelfAttention(nn.Module):
    """Multi-head attention over one token stream, with optional RMS qk-norm per head."""

    def __init__(self, dim: int, num_heads: int, head_dim: int, qk_norm: str | None):
        super().__init__()
        self.num_heads = num_heads
        inner = num_heads * head_dim
        self.to_q = nn.Linear(dim, inner)
        self.to_k = nn.Linear(dim, inner)
        self.to_v = nn.Linear(dim, inner)
        self.norm_q = RMSNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.norm_k = RMSNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.to_out = nn.ModuleList([nn.Linear(inner, dim)])  # `to_out.0` in the checkpoints

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q = self.norm_q(split_heads(self.to_q(x), self.num_heads))
        k = self.norm_k(split_heads(self.to_k(x), self.num_heads))
        v = split_heads(self.to_v(x), self.num_heads)
        return q, k, v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.to_out[0](merge_heads(attention(*self.project(x))))


class JointAttention(SelfAttention):
    """Attention over the concatenated [image; text] sequence; each stream has its own projections.

    With `context_pre_only` (the last block) the text output is not needed, so there is no
    `to_add_out` and the text stream ends here.
    """

    def __init__(self, dim: int, num_heads: int, head_dim: int, qk_norm: str | None, context_pre_only: bool):
        super().__init__(dim, num_heads, head_dim, qk_norm)
        inner = num_heads * head_dim
        self.add_q_proj = nn.Linear(dim, inner)
        self.add_k_proj = nn.Linear(dim, inner)
        self.add_v_proj = nn.Linear(dim, inner)
        self.norm_added_q = RMSNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.norm_added_k = RMSNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.to_add_out = None if context_pre_only else nn.Linear(inner, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        q, k, v = self.project(x)
        q_c = self.norm_added_q(split_heads(self.add_q_proj(context), self.num_heads))
        k_c = self.norm_added_k(split_heads(self.add_k_proj(context), self.num_heads))
        v_c = split_heads(self.add_v_proj(context), self.num_heads)
        out = attention(torch.cat([q, q_c], dim=2), torch.cat([k, k_c], dim=2), torch.cat([v, v_c], dim=2))
        out = merge_heads(out)
        n_img = x.shape[1]
        x_out = self.to_out[0](out[:, :n_img])
        if self.to_add_out is None:
            return x_out, None
        return x_out, self.to_add_out(out[:, n_img:])


class JointTransformerBlock(nn.Module):
    """One MMDiT block: adaLN-zero modulation, joint attention and a gated MLP per stream.

    Dual-attention blocks (SD3.5) add a gated image-only attention whose input is modulated from
    the same pre-attention LN(x) but whose output is added after the joint-attention residual.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        head_dim: int,
        context_pre_only: bool,
        qk_norm: str | None,
        use_dual_attention: bool,
    ):
        super().__init__()
        self.context_pre_only = context_pre_only
        self.norm1 = AdaLayerNormZeroX(dim) if use_dual_attention else AdaLayerNormZero(dim)
        self.norm1_context = AdaLayerNormContinuous(dim, dim) if context_pre_only else AdaLayerNormZero(dim)
        self.attn = JointAttention(dim, num_heads, head_dim, qk_norm, context_pre_only)
        self.attn2 = SelfAttention(dim, num_heads, head_dim, qk_norm) if use_dual_attention else None
        self.norm2 = nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)
        self.ff = FeedForward(dim)
        if not context_pre_only:
            self.norm2_context = nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)
            self.ff_context = FeedForward(dim)

    def forward(
        self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, temb: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Returns the updated (image, text) streams; text is None after the last block."""
        x, c = hidden_states, encoder_hidden_states
        if self.attn2 is not None:
            x_attn, gate_msa, shift_mlp, scale_mlp, gate_mlp, x_attn2, gate_msa2 = self.norm1(x, temb)
        else:
            x_attn, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(x, temb)
        if self.context_pre_only:
            c_attn = self.norm1_context(c, temb)
        else:
            c_attn, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(c, temb)

        attn_x, attn_c = self.attn(x_attn, c_attn)
        x = x + gate_msa[:, None] * attn_x
        if self.attn2 is not None:
            x = x + gate_msa2[:, None] * self.attn2(x_attn2)
        x_mlp = self.norm2(x) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        x = x + gate_mlp[:, None] * self.ff(x_mlp)

        if self.context_pre_only:
            return x, None
        c = c + c_gate_msa[:, None] * attn_c
        c_mlp = self.norm2_context(c) * (1 + c_scale_mlp[:, None]) + c_shift_mlp[:, None]
        c = c + c_gate_mlp[:, None] * self.ff_context(c_mlp)
        return x, c


class SD3Transformer(nn.Module):
    """The MMDiT velocity model: latent (B, C, H, W) + text -> velocity (B, C_out, H, W)."""

    def __init__(self, args: SD3Args):
        super().__init__()
        self.args = args
        dim = args.inner_dim
        self.pos_embed = PatchEmbed(
            args.patch_size,
            args.in_channels,
            dim,
            args.pos_embed_max_size,
            base_size=args.sample_size // args.patch_size,
        )
        self.time_text_embed = TimestepTextEmbedding(dim, args.pooled_projection_dim)
        self.context_embedder = nn.Linear(args.joint_attention_dim, args.caption_projection_dim)
        self.transformer_blocks = nn.ModuleList(
            [
                JointTransformerBlock(
                    dim,
                    args.num_attention_heads,
                    args.attention_head_dim,
                    context_pre_only=i == args.num_layers - 1,
                    qk_norm=args.qk_norm,
                    use_dual_attention=i in args.dual_attention_layers,
                )
                for i in range(args.num_layers)
            ]
        )
        self.norm_out = AdaLayerNormContinuous(dim, dim)
        self.proj_out = nn.Linear(dim, args.patch_size**2 * args.out_channels)

    def init_weights(self) -> None:
        """Random init of every parameter and the pos-embed table (e.g. after `to_empty` from meta).

        Xavier-uniform linears and patch conv, zero biases, N(0, 0.02) embedding MLPs (as in DiT),
        unit qk-norm scales. Unlike DiT the adaLN and output layers are *not* zeroed, so a model
        trained from scratch starts with non-trivial velocities and non-zero gradients everywhere.
        """
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, RMSNorm):
                module.reset_parameters()
        for mlp in (self.time_text_embed.timestep_embedder, self.time_text_embed.text_embedder):
            nn.init.normal_(mlp.linear_1.weight, std=0.02)
            nn.init.normal_(mlp.linear_2.weight, std=0.02)
        self.pos_embed.reset_pos_embed()

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        pooled_projections: torch.Tensor,
        timestep: torch.Tensor,
    ) -> torch.Tensor:
        """hidden_states (B, C_in, H, W) latent; encoder_hidden_states (B, L, joint_attention_dim);
        pooled_projections (B, pooled_projection_dim); timestep (B,) = sigma * 1000.

        Inputs are cast to the weights' dtype here, except the timestep, which enters the sinusoid in
        full precision (as diffusers): a bf16 timestep would round 999 to 1000.
        """
        dtype = self.context_embedder.weight.dtype
        hidden_states, encoder_hidden_states = hidden_states.to(dtype), encoder_hidden_states.to(dtype)
        pooled_projections = pooled_projections.to(dtype)
        p = self.args.patch_size
        batch, _, height, width = hidden_states.shape
        h, w = height // p, width // p

        x = self.pos_embed(hidden_states)
        temb = self.time_text_embed(timestep, pooled_projections)
        c = self.context_embedder(encoder_hidden_states)
        for block in self.transformer_blocks:
            x, c = block(x, c, temb)

        x = self.proj_out(self.norm_out(x, temb))  # (B, h*w, p*p*C_out)
        x = x.reshape(batch, h, w, p, p, self.args.out_channels)
        return x.permute(0, 5, 1, 3, 2, 4).reshape(batch, self.args.out_channels, h * p, w * p)
