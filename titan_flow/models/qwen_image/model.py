"""Qwen-Image MMDiT (Qwen Team, "Qwen-Image Technical Report", 2025), a port of diffusers'
`QwenImageTransformer2DModel`.

Image tokens (2x2 patches of the VAE latent, packed into channels) and text tokens (Qwen2.5-VL
hidden states) keep separate weights in every dual-stream block and attend jointly as one
[text; image] sequence. Only the timestep conditions the blocks (adaLN-zero; no pooled text, no
guidance embedding). Positions enter through MSRoPE, the "multimodal scalable RoPE": a 3-axis
(frame, row, column) rotary embedding in which image grids are centred on 0 and text tokens sit on
the diagonal just past the largest image, so text and image positions never collide and an image
of any size stays centred.

Editing (Qwen-Image-Edit) feeds the source image's latent tokens after the noisy ones, as a second
image in `img_shapes` (frame position 1); the caller keeps only the first image's outputs.

Module names equal diffusers', so a diffusers state dict loads with the identity key mapping.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn

from titan_flow.models.common.embeddings import TimestepEmbedding, timestep_sinusoid
from titan_flow.models.common.layers import FeedForward, JointAttention, Rotary
from titan_flow.models.common.norms import AdaLayerNormContinuous, RMSNorm
from titan_flow.models.common.rope import rope_angles, rotation
from titan_flow.models.qwen_image.args import QwenImageArgs

ROPE_THETA = 10000.0
# One (frames, rows, columns) entry per image in the sequence, in token order: the target first,
# then condition images (editing).
ImageShapes = Sequence[tuple[int, int, int]]


def image_shapes_of(img_shapes, batch: int) -> list[tuple[int, int, int]]:
    """The per-image (frames, rows, cols) list shared by the whole batch.

    Accepts ours (one list for the batch) or diffusers' (one list per sample). diffusers uses only
    sample 0's and warns if others differ; here they must all be equal, since MSRoPE tables are
    built once for the batch.
    """
    if not img_shapes:
        raise ValueError("img_shapes is required: one (frames, rows, cols) per image, e.g. [(1, 32, 32)]")
    if isinstance(img_shapes[0][0], (tuple, list)):  # diffusers' per-sample form
        if len(img_shapes) != batch:
            raise ValueError(f"img_shapes has {len(img_shapes)} per-sample entries for a batch of {batch}")
        first = [tuple(s) for s in img_shapes[0]]
        if any([tuple(s) for s in shapes] != first for shapes in img_shapes):
            raise ValueError(
                f"img_shapes differ between samples ({img_shapes}); every sample of a batch must have the same "
                "image sizes (MSRoPE is built once per batch)"
            )
        return first
    return [tuple(s) for s in img_shapes]


def msrope_positions(img_shapes: ImageShapes, text_len: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(frame, row, col) positions of the image tokens (N, 3) and of the text tokens (L, 3).

    Image k of `img_shapes` has frame positions k, k+1, ...; its rows run from -(h - h//2) to
    h//2 - 1 and its columns likewise (centred, "scale_rope"). Text token j sits at m + j on all
    three axes, with m = max over the images of max(h//2, w//2). Tokens are row-major per frame.
    """
    positions = []
    offset = 0
    for index, (frames, rows, cols) in enumerate(img_shapes):
        f = torch.arange(frames, device=device) + index
        r = torch.arange(rows, device=device) - (rows - rows // 2)
        c = torch.arange(cols, device=device) - (cols - cols // 2)
        grid = torch.stack(torch.meshgrid(f, r, c, indexing="ij"), dim=-1)
        positions.append(grid.reshape(-1, 3))
        offset = max(offset, rows // 2, cols // 2)
    text = (torch.arange(text_len, device=device) + offset)[:, None].expand(text_len, 3)
    return torch.cat(positions), text


def msrope_tables(positions: torch.Tensor, axes_dims: Sequence[int], theta: float = ROPE_THETA) -> Rotary:
    """Interleaved-RoPE table exp(i angle), (N, sum(axes_dims) / 2) complex64: each axis rotates its own
    slice of the head with its own frequencies theta^(-2i / axis_dim), computed in fp32 (as diffusers)."""
    angles = torch.cat([rope_angles(positions[:, a], dim, theta) for a, dim in enumerate(axes_dims)], dim=-1)
    return rotation(angles)


class TimestepProjEmbeddings(nn.Module):
    """temb = MLP(sinusoid(1000 * t)): sigma in [0, 1] is scaled to diffusers' timestep range inside."""

    def __init__(self, dim: int):
        super().__init__()
        self.timestep_embedder = TimestepEmbedding(256, dim)

    def forward(self, timestep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        # The timestep is first rounded to the model dtype (so bf16 quantises sigma, as diffusers does).
        features = timestep_sinusoid(timestep.to(dtype), 256, flip_sin_to_cos=True, scale=1000.0)
        return self.timestep_embedder(features.to(dtype))


def _modulation(dim: int) -> nn.Sequential:
    """SiLU -> Linear(dim, 6 dim): (shift, scale, gate) for the attention, then for the MLP."""
    return nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))


def _layer_norm(dim: int) -> nn.LayerNorm:
    return nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class QwenImageTransformerBlock(nn.Module):
    """One dual-stream block: per-stream adaLN-zero, joint attention with MSRoPE on both streams,
    per-stream gated MLPs."""

    def __init__(self, dim: int, num_heads: int, head_dim: int):
        super().__init__()
        self.img_mod = _modulation(dim)
        self.img_norm1 = _layer_norm(dim)
        self.attn = JointAttention(dim, num_heads, head_dim, qk_norm="rms_norm", context_first=True)
        self.img_norm2 = _layer_norm(dim)
        self.img_mlp = FeedForward(dim)
        self.txt_mod = _modulation(dim)
        self.txt_norm1 = _layer_norm(dim)
        self.txt_norm2 = _layer_norm(dim)
        self.txt_mlp = FeedForward(dim)

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        temb: torch.Tensor,
        image_rotary: Rotary,
        text_rotary: Rotary,
        text_mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the updated (image, text) streams."""
        x, c = hidden_states, encoder_hidden_states
        x_shift1, x_scale1, x_gate1, x_shift2, x_scale2, x_gate2 = self.img_mod(temb).chunk(6, dim=-1)
        c_shift1, c_scale1, c_gate1, c_shift2, c_scale2, c_gate2 = self.txt_mod(temb).chunk(6, dim=-1)

        attn_x, attn_c = self.attn(
            _modulate(self.img_norm1(x), x_shift1, x_scale1),
            _modulate(self.txt_norm1(c), c_shift1, c_scale1),
            rotary=image_rotary,
            context_rotary=text_rotary,
            context_mask=text_mask,
        )
        x = x + x_gate1[:, None] * attn_x
        c = c + c_gate1[:, None] * attn_c
        x = x + x_gate2[:, None] * self.img_mlp(_modulate(self.img_norm2(x), x_shift2, x_scale2))
        c = c + c_gate2[:, None] * self.txt_mlp(_modulate(self.txt_norm2(c), c_shift2, c_scale2))
        if x.dtype == torch.float16:  # the reference clips both streams in fp16 (use bf16 instead)
            x, c = x.clip(-65504, 65504), c.clip(-65504, 65504)
        return x, c


class QwenImageTransformer(nn.Module):
    """The velocity model: packed latent tokens + text hidden states -> packed velocity tokens."""

    def __init__(self, args: QwenImageArgs):
        super().__init__()
        self.args = args
        dim = args.inner_dim
        self.time_text_embed = TimestepProjEmbeddings(dim)
        self.txt_norm = RMSNorm(args.joint_attention_dim, eps=1e-6)
        self.img_in = nn.Linear(args.in_channels, dim)
        self.txt_in = nn.Linear(args.joint_attention_dim, dim)
        self.transformer_blocks = nn.ModuleList(
            [
                QwenImageTransformerBlock(dim, args.num_attention_heads, args.attention_head_dim)
                for _ in range(args.num_layers)
            ]
        )
        self.norm_out = AdaLayerNormContinuous(dim, dim)
        self.proj_out = nn.Linear(dim, args.patch_size**2 * args.out_channels)

    def init_weights(self) -> None:
        """Random init of every parameter (e.g. after `to_empty` from meta).

        Xavier-uniform linears, zero biases, N(0, 0.02) timestep MLP, unit RMSNorm scales. Unlike
        DiT the modulation and output layers are *not* zeroed, so a model trained from scratch
        starts with non-trivial velocities and non-zero gradients everywhere.
        """
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, RMSNorm):
                module.reset_parameters()
        embedder = self.time_text_embed.timestep_embedder
        nn.init.normal_(embedder.linear_1.weight, std=0.02)
        nn.init.normal_(embedder.linear_2.weight, std=0.02)

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_hidden_states_mask: torch.Tensor | None = None,
        timestep: torch.Tensor | None = None,
        img_shapes=None,
    ) -> torch.Tensor:
        """hidden_states (B, N, in_channels): the packed latent tokens of every image in `img_shapes`,
        in order; encoder_hidden_states (B, L, joint_attention_dim); encoder_hidden_states_mask
        (B, L), 1/True for real text tokens (None: all real); timestep (B,) = sigma in [0, 1];
        img_shapes: [(frames, rows, cols), ...] per image in token order (or diffusers' per-sample
        list of those). Returns (B, N, patch_size**2 * out_channels), for every image token.
        """
        if timestep is None:
            raise ValueError("timestep is required: sigma in [0, 1], shape (batch,)")
        batch, n_tokens, _ = hidden_states.shape
        shapes = image_shapes_of(img_shapes, batch)
        expected = sum(math.prod(s) for s in shapes)
        if expected != n_tokens:
            raise ValueError(
                f"img_shapes {shapes} describe {expected} image tokens, but hidden_states has {n_tokens}"
            )
        text_len = encoder_hidden_states.shape[1]
        if encoder_hidden_states_mask is not None and encoder_hidden_states_mask.shape != (batch, text_len):
            raise ValueError(
                f"encoder_hidden_states_mask has shape {tuple(encoder_hidden_states_mask.shape)}, expected "
                f"(batch, text length) = {(batch, text_len)}"
            )
        dtype = self.img_in.weight.dtype
        x = self.img_in(hidden_states.to(dtype))
        temb = self.time_text_embed(timestep, dtype)
        c = self.txt_in(self.txt_norm(encoder_hidden_states.to(dtype)))

        image_positions, text_positions = msrope_positions(shapes, text_len, device=x.device)
        image_rotary = msrope_tables(image_positions, self.args.axes_dims_rope)
        text_rotary = msrope_tables(text_positions, self.args.axes_dims_rope)
        for block in self.transformer_blocks:
            x, c = block(x, c, temb, image_rotary, text_rotary, encoder_hidden_states_mask)
        # nn.Linear on a 3-D input returns a view, and FSDP2 warns when its root returns one (an in-place op
        # on it would skip the pre-backward hook): the copy is one (B, N, 4 C_out) tensor.
        return self.proj_out(self.norm_out(x, temb)).clone()
