"""FLUX.1 rectified-flow transformer (Black Forest Labs 2024), a port of diffusers' `FluxTransformer2DModel`.

Inputs are packed latent tokens (each a 2x2 patch of the VAE latent, packed by the pipeline) and
T5 text tokens. The first `num_layers` blocks are double-stream (MMDiT: separate weights per stream,
one joint attention over [text; image]); the remaining `num_single_layers` blocks run one stream over
the concatenated sequence, with attention and MLP in parallel. Positions enter only through 3-axis
RoPE on q and k (text tokens sit at position 0, so they are not rotated). A conditioning vector
(timestep + distilled guidance scale + pooled CLIP text) modulates every block through adaLN-zero.

FLUX.1-Kontext is the same network: the condition image's tokens are appended after the noisy ones
with their own position ids (frame 1), and the pipeline cuts their outputs off.

Module names equal diffusers', so a diffusers state dict loads with the identity key mapping.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from titan_flow.models.common.attention import attention, merge_heads, split_heads
from titan_flow.models.common.axes_rope import apply_interleaved_rope, axes_rope_cos_sin
from titan_flow.models.common.embeddings import TextProjection, TimestepEmbedding, timestep_sinusoid
from titan_flow.models.common.layers import FeedForward
from titan_flow.models.common.norms import (
    AdaLayerNormContinuous,
    AdaLayerNormZero,
    AdaLayerNormZeroSingle,
    RMSNorm,
)
from titan_flow.models.flux.args import FluxArgs

ROPE_THETA = 10000.0

Rope = tuple[torch.Tensor, torch.Tensor]  # (cos, sin), each (L_text + L_image, head_dim) fp32


class TimestepGuidanceTextEmbedding(nn.Module):
    """Conditioning vector: MLP(sinusoid(1000 t)) [+ MLP(sinusoid(1000 g))] + MLP(pooled CLIP)."""

    def __init__(self, dim: int, pooled_projection_dim: int, guidance_embeds: bool):
        super().__init__()
        self.timestep_embedder = TimestepEmbedding(256, dim)
        self.guidance_embedder = TimestepEmbedding(256, dim) if guidance_embeds else None
        self.text_embedder = TextProjection(pooled_projection_dim, dim)

    def embed(self, mlp: TimestepEmbedding, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return mlp(timestep_sinusoid(t, 256, flip_sin_to_cos=True, downscale_freq_shift=0.0).to(dtype))

    def forward(self, timestep: torch.Tensor, guidance: torch.Tensor | None, pooled: torch.Tensor) -> torch.Tensor:
        emb = self.embed(self.timestep_embedder, timestep, pooled.dtype)
        if self.guidance_embedder is not None:
            emb = emb + self.embed(self.guidance_embedder, guidance, pooled.dtype)
        return emb + self.text_embedder(pooled)


class FluxAttention(nn.Module):
    """Multi-head attention with per-head RMS qk-norm and RoPE on q and k.

    With `context_dim` it is the double-stream joint attention: the text stream has its own
    projections (`add_*_proj`, `to_add_out`) and attends jointly as [text; image]. Without it
    (single-stream blocks) there is no output projection: the block fuses it with the MLP's.
    """

    def __init__(self, dim: int, num_heads: int, head_dim: int, context_dim: int | None = None):
        super().__init__()
        self.num_heads = num_heads
        inner = num_heads * head_dim
        self.to_q = nn.Linear(dim, inner)
        self.to_k = nn.Linear(dim, inner)
        self.to_v = nn.Linear(dim, inner)
        self.norm_q = RMSNorm(head_dim, eps=1e-6, scale_in_fp32=True)
        self.norm_k = RMSNorm(head_dim, eps=1e-6, scale_in_fp32=True)
        if context_dim is not None:
            self.to_out = nn.ModuleList([nn.Linear(inner, dim)])  # `to_out.0` in the checkpoints
            self.add_q_proj = nn.Linear(context_dim, inner)
            self.add_k_proj = nn.Linear(context_dim, inner)
            self.add_v_proj = nn.Linear(context_dim, inner)
            self.norm_added_q = RMSNorm(head_dim, eps=1e-6, scale_in_fp32=True)
            self.norm_added_k = RMSNorm(head_dim, eps=1e-6, scale_in_fp32=True)
            self.to_add_out = nn.Linear(inner, context_dim)

    def qkv(self, x: torch.Tensor, to_q, to_k, to_v, norm_q, norm_k) -> tuple[torch.Tensor, ...]:
        q = norm_q(split_heads(to_q(x), self.num_heads))
        k = norm_k(split_heads(to_k(x), self.num_heads))
        return q, k, split_heads(to_v(x), self.num_heads)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rope: Rope) -> torch.Tensor:
        cos, sin = rope
        q, k = apply_interleaved_rope(q, cos, sin), apply_interleaved_rope(k, cos, sin)
        return merge_heads(attention(q, k, v))

    def forward(self, x: torch.Tensor, rope: Rope) -> torch.Tensor:
        """Single stream: (B, L, D) -> (B, L, H*Dh), no output projection."""
        return self.attend(*self.qkv(x, self.to_q, self.to_k, self.to_v, self.norm_q, self.norm_k), rope)

    def joint(self, x: torch.Tensor, context: torch.Tensor, rope: Rope) -> tuple[torch.Tensor, torch.Tensor]:
        """Double stream: returns (image output, text output), each through its own output projection."""
        q, k, v = self.qkv(x, self.to_q, self.to_k, self.to_v, self.norm_q, self.norm_k)
        q_c, k_c, v_c = self.qkv(
            context, self.add_q_proj, self.add_k_proj, self.add_v_proj, self.norm_added_q, self.norm_added_k
        )
        out = self.attend(torch.cat([q_c, q], dim=2), torch.cat([k_c, k], dim=2), torch.cat([v_c, v], dim=2), rope)
        n_text = context.shape[1]
        # Contiguous slices: a strided GEMM input rounds differently in bf16 (diffusers makes them contiguous).
        return self.to_out[0](out[:, n_text:].contiguous()), self.to_add_out(out[:, :n_text].contiguous())


def clip_fp16(x: torch.Tensor) -> torch.Tensor:
    """fp16 overflows in FLUX's residual stream; diffusers clips to the fp16 range (bf16 is the fix)."""
    return x.clip(-65504, 65504) if x.dtype == torch.float16 else x


class FluxTransformerBlock(nn.Module):
    """Double-stream block: adaLN-zero per stream, joint attention, a gated MLP per stream."""

    def __init__(self, dim: int, num_heads: int, head_dim: int):
        super().__init__()
        self.norm1 = AdaLayerNormZero(dim)
        self.norm1_context = AdaLayerNormZero(dim)
        self.attn = FluxAttention(dim, num_heads, head_dim, context_dim=dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)
        self.ff = FeedForward(dim)
        self.norm2_context = nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)
        self.ff_context = FeedForward(dim)

    def forward(
        self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, temb: torch.Tensor, rope: Rope
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the updated (image, text) streams."""
        x, c = hidden_states, encoder_hidden_states
        x_attn, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(x, temb)
        c_attn, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(c, temb)
        attn_x, attn_c = self.attn.joint(x_attn, c_attn, rope)

        x = x + gate_msa[:, None] * attn_x
        x_mlp = self.norm2(x) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        x = x + gate_mlp[:, None] * self.ff(x_mlp)

        c = c + c_gate_msa[:, None] * attn_c
        c_mlp = self.norm2_context(c) * (1 + c_scale_mlp[:, None]) + c_shift_mlp[:, None]
        c = c + c_gate_mlp[:, None] * self.ff_context(c_mlp)
        return x, clip_fp16(c)


class FluxSingleTransformerBlock(nn.Module):
    """Single-stream block over h = [text; image]: h += gate * proj_out([attn(h'), gelu(proj_mlp(h'))])."""

    def __init__(self, dim: int, num_heads: int, head_dim: int, mlp_ratio: int = 4):
        super().__init__()
        self.norm = AdaLayerNormZeroSingle(dim)
        self.proj_mlp = nn.Linear(dim, mlp_ratio * dim)
        self.act_mlp = nn.GELU(approximate="tanh")
        self.attn = FluxAttention(dim, num_heads, head_dim)
        self.proj_out = nn.Linear(num_heads * head_dim + mlp_ratio * dim, dim)

    def forward(self, h: torch.Tensor, temb: torch.Tensor, rope: Rope) -> torch.Tensor:
        normed, gate = self.norm(h, temb)
        mlp = self.act_mlp(self.proj_mlp(normed))
        return clip_fp16(h + gate[:, None] * self.proj_out(torch.cat([self.attn(normed, rope), mlp], dim=2)))


class FluxTransformer(nn.Module):
    """The velocity model: packed latent tokens (B, N, in_channels) + text -> velocity (B, N, out_channels)."""

    def __init__(self, args: FluxArgs):
        super().__init__()
        self.args = args
        dim = args.inner_dim
        heads, head_dim = args.num_attention_heads, args.attention_head_dim
        self.time_text_embed = TimestepGuidanceTextEmbedding(dim, args.pooled_projection_dim, args.guidance_embeds)
        self.context_embedder = nn.Linear(args.joint_attention_dim, dim)
        self.x_embedder = nn.Linear(args.in_channels, dim)
        self.transformer_blocks = nn.ModuleList(
            [FluxTransformerBlock(dim, heads, head_dim) for _ in range(args.num_layers)]
        )
        self.single_transformer_blocks = nn.ModuleList(
            [FluxSingleTransformerBlock(dim, heads, head_dim) for _ in range(args.num_single_layers)]
        )
        self.norm_out = AdaLayerNormContinuous(dim, dim)
        self.proj_out = nn.Linear(dim, args.patch_size**2 * args.out_channels)

    def init_weights(self) -> None:
        """Random init of every parameter (e.g. after `to_empty` from meta).

        Xavier-uniform linears, zero biases, N(0, 0.02) embedding MLPs (as in DiT), unit qk-norm
        scales. Unlike DiT the adaLN and output layers are *not* zeroed, so a model trained from
        scratch starts with non-trivial velocities and non-zero gradients everywhere.
        """
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, RMSNorm):
                module.reset_parameters()
        embed = self.time_text_embed
        for mlp in (embed.timestep_embedder, embed.guidance_embedder, embed.text_embedder):
            if mlp is not None:
                nn.init.normal_(mlp.linear_1.weight, std=0.02)
                nn.init.normal_(mlp.linear_2.weight, std=0.02)

    def rope(self, txt_ids: torch.Tensor, img_ids: torch.Tensor) -> Rope:
        return axes_rope_cos_sin(torch.cat([txt_ids, img_ids]), self.args.axes_dims_rope, ROPE_THETA)

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        pooled_projections: torch.Tensor,
        timestep: torch.Tensor,
        img_ids: torch.Tensor,
        txt_ids: torch.Tensor,
        guidance: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """hidden_states (B, N, in_channels) packed latents; encoder_hidden_states (B, L, joint_attention_dim);
        pooled_projections (B, pooled_projection_dim); timestep (B,) = sigma in [0, 1]; img_ids (N, 3) and
        txt_ids (L, 3) position ids shared by the batch; guidance (B,), required iff `guidance_embeds`.

        Inputs are cast to the weights' dtype. As in diffusers, timestep and guidance are rounded to
        that dtype *before* the x1000 (in bf16 a sigma of 0.999 becomes 1.0): bf16 runs then see the
        timesteps the reference's bf16 runs see.
        """
        if (guidance is None) == self.args.guidance_embeds:
            raise ValueError(
                "FLUX forward: this model has guidance_embeds="
                f"{self.args.guidance_embeds}, so `guidance` must be "
                + ("a (batch,) tensor of guidance scales (FLUX.1-dev: 3.5)" if self.args.guidance_embeds else "None")
            )
        for name, ids in (("img_ids", img_ids), ("txt_ids", txt_ids)):
            if ids.ndim != 2 or ids.shape[1] != 3:
                raise ValueError(f"FLUX forward: {name} must have shape (tokens, 3) shared by the batch, got {tuple(ids.shape)}")
        if img_ids.shape[0] != hidden_states.shape[1] or txt_ids.shape[0] != encoder_hidden_states.shape[1]:
            raise ValueError(
                f"FLUX forward: {img_ids.shape[0]} img_ids for {hidden_states.shape[1]} image tokens and "
                f"{txt_ids.shape[0]} txt_ids for {encoder_hidden_states.shape[1]} text tokens; give one id per token"
            )
        dtype = self.x_embedder.weight.dtype
        x = self.x_embedder(hidden_states.to(dtype))
        timestep = timestep.to(dtype) * 1000
        if guidance is not None:
            guidance = guidance.to(dtype) * 1000
        temb = self.time_text_embed(timestep, guidance, pooled_projections.to(dtype))
        c = self.context_embedder(encoder_hidden_states.to(dtype))
        rope = self.rope(txt_ids, img_ids)

        for block in self.transformer_blocks:
            x, c = block(x, c, temb, rope)
        # The single-stream blocks run on one [text; image] sequence (diffusers re-splits it after every
        # block; the values are the same, and no block returns a view of its output).
        h = torch.cat([c, x], dim=1)
        for block in self.single_transformer_blocks:
            h = block(h, temb, rope)
        x = h[:, c.shape[1] :]
        # A 3-D nn.Linear returns a view of its 2-D product; the copy (B x N x C_out, small) keeps FSDP2 from
        # warning that an in-place op on the root's output could skip its pre-backward hook.
        return self.proj_out(self.norm_out(x, temb)).clone()
