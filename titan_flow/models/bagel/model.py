"""Bagel-7B-MoT: a Qwen2 language model whose every decoder layer holds two experts.

Text and ViT tokens go through the understanding ("und") expert, VAE latent tokens through the
generation ("gen") expert. Routing is by token index, not learned: each expert has its own
attention projections, q/k norms, layer norms and MLP, but all tokens of a sample attend to each
other in one shared attention. The model denoises an image by appending a block
[<|vision_start|>, latent tokens, <|vision_end|>] to a prompt context and reading the velocity off
the latent tokens.

Samples are packed into one 1-D token sequence (no batch dimension). Each sample is a list of
splits, each split one of:
  - text (`TextSplit`): causal, positions r .. r+L-1;
  - an image (`LatentSplit` for VAE latents, `VitSplit` for ViT patches) framed by the two image
    markers: bidirectional inside, every token at the single position r. A noised latent image (the
    generation target) is invisible to all other splits and does not advance r.

Two ways to run the same network:
  - `forward(samples)`: the whole packed sequence at once, with a dense per-sample mask (the
    reference's training path);
  - `extend(cache, ...)` then `denoise(cache, ...)`: the context is prefilled once into a KV cache
    and each denoising step runs only the image block against it (the reference's inference path,
    and what RL rollouts and training use). Both give the same velocities (tests/test_bagel_model.py).

Attention runs on one of the packed kernels of models/common/attention.py (flash-attn varlen,
FlexAttention or an SDPA loop), chosen by each entry point's `attention` argument. Where bf16 results
are rounded follows the reference in each path (MoTDecoderLayer).

Parameter names are ours; state_dict_adapter.py maps them to the released `ema.safetensors`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from titan_flow.models.bagel.args import BagelArgs, VitArgs
from titan_flow.models.common.attention import PackedAttention, PackedLayout
from titan_flow.models.common.embeddings import TimestepEmbedding, get_2d_sincos_pos_embed, timestep_sinusoid
from titan_flow.models.common.norms import RMSNorm
from titan_flow.models.common.rope import apply_rope, rope_cos_sin

# ---------------------------------------------------------------------------------------------
# Latent patching and position ids


def patchify_latents(latents: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) VAE latents -> (B, (H/p)(W/p), p*p*C) tokens, row-major over the token grid.

    Each token's channels are ordered (patch row, patch col, channel), Bagel's order; Flux and
    Qwen-Image pack (channel, patch row, patch col) instead.
    """
    b, c, height, width = latents.shape
    p = patch_size
    if height % p or width % p:
        raise ValueError(f"latent size {height}x{width} is not divisible by the latent patch size {p}")
    x = latents.reshape(b, c, height // p, p, width // p, p)
    return torch.einsum("bchpwq->bhwpqc", x).reshape(b, (height // p) * (width // p), p * p * c)


def unpatchify_latents(tokens: torch.Tensor, height: int, width: int, patch_size: int) -> torch.Tensor:
    """Inverse of `patchify_latents`: (B, h*w, p*p*C) tokens on an h x w grid -> (B, C, h*p, w*p)."""
    b, n, d = tokens.shape
    p = patch_size
    if n != height * width:
        raise ValueError(f"got {n} latent tokens for a {height}x{width} token grid")
    x = tokens.reshape(b, height, width, p, p, d // (p * p))
    return torch.einsum("bhwpqc->bchpwq", x).reshape(b, d // (p * p), height * p, width * p)


def grid_position_ids(height: int, width: int, max_per_side: int) -> torch.Tensor:
    """Row-major ids into a max_per_side x max_per_side table (Bagel "extrapolate" layout): row * side + col."""
    if height > max_per_side or width > max_per_side:
        raise ValueError(
            f"a {height}x{width} token grid does not fit the {max_per_side}x{max_per_side} position table; "
            "lower the image resolution"
        )
    rows = torch.arange(height)[:, None] * max_per_side
    return (rows + torch.arange(width)[None, :]).flatten()


# ---------------------------------------------------------------------------------------------
# Packed inputs


@dataclass
class TextSplit:
    """Text tokens (the caller adds <|im_start|> / <|im_end|> if wanted); causal, und expert."""

    ids: list[int]


@dataclass
class LatentSplit:
    """A VAE latent image as patched tokens (h*w, p*p*C) on an h x w grid, at flow time `timestep`.

    Clean context images use timestep 0 and are seen by later splits; a `noised` image is the
    generation target: no other split sees it and it does not advance the position.
    """

    tokens: torch.Tensor
    height: int
    width: int
    timestep: float = 0.0
    noised: bool = False


@dataclass
class VitSplit:
    """ViT input patches (h*w, p*p*3) on an h x w patch grid, pixels normalised to [-1, 1]."""

    patches: torch.Tensor
    height: int
    width: int


Split = Union[TextSplit, LatentSplit, VitSplit]


def patchify_vit_image(image: torch.Tensor, patch_size: int) -> VitSplit:
    """(3, H, W) image in [-1, 1] -> ViT patches in SigLIP's (patch row, patch col, channel) order."""
    c, height, width = image.shape
    p = patch_size
    if height % p or width % p:
        raise ValueError(f"ViT image size {height}x{width} is not divisible by the ViT patch size {p}")
    x = image.reshape(c, height // p, p, width // p, p)
    patches = torch.einsum("chpwq->hwpqc", x).reshape(-1, p * p * c)
    return VitSplit(patches, height // p, width // p)


@dataclass
class PackedSequence:
    """Samples' splits flattened into one token sequence, with the index plumbing the model needs."""

    text_ids: torch.Tensor  # (n_text,) ids of text tokens and image markers
    text_index: torch.Tensor  # their positions in the packed sequence
    latent_tokens: torch.Tensor  # (n_latent, p*p*C)
    latent_index: torch.Tensor
    latent_timesteps: torch.Tensor  # (n_latent,) flow time of each latent token
    latent_position_ids: torch.Tensor  # (n_latent,) rows of the latent position table
    vit_patches: torch.Tensor  # (n_vit, p*p*3)
    vit_index: torch.Tensor
    vit_position_ids: torch.Tensor
    vit_seqlens: list[int]  # patches per ViT image
    position_ids: torch.Tensor  # (N,) RoPE positions
    sample_lens: list[int]
    split_lens: list[list[int]]  # per sample
    split_modes: list[list[str]]  # per sample: "causal" | "full" | "noise"
    next_positions: list[int]  # per sample: the RoPE position a following split would start at
    latent_split_lens: list[int]  # tokens of each LatentSplit, in packing order

    @property
    def num_tokens(self) -> int:
        return int(self.position_ids.numel())

    def to(self, device: torch.device | str) -> PackedSequence:
        moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in vars(self).items()}
        return PackedSequence(**moved)


def pack(samples: list[list[Split]], args: BagelArgs, start_positions: list[int] | None = None) -> PackedSequence:
    """Lay the samples' splits out one after another (Bagel's `pack_sequence` / `prepare_*`)."""
    start_positions = start_positions or [0] * len(samples)
    text_ids, text_index = [], []
    lat_tokens, lat_index, lat_t, lat_pos, lat_lens = [], [], [], [], []
    vit_patches, vit_index, vit_pos, vit_seqlens = [], [], [], []
    position_ids, sample_lens, split_lens, split_modes, next_positions = [], [], [], [], []
    curr = 0
    for splits, r in zip(samples, start_positions):
        start, lens, modes = curr, [], []
        for split in splits:
            if isinstance(split, TextSplit):
                n = len(split.ids)
                if n == 0:
                    raise ValueError("a TextSplit must hold at least one token")
                text_ids += list(split.ids)
                text_index += range(curr, curr + n)
                position_ids += range(r, r + n)
                r += n
                lens.append(n)
                modes.append("causal")
                curr += n
                continue
            if isinstance(split, LatentSplit):
                n = split.height * split.width
                if split.tokens.shape != (n, args.patch_latent_dim):
                    raise ValueError(
                        f"LatentSplit tokens have shape {tuple(split.tokens.shape)}, expected ({n}, {args.patch_latent_dim}) "
                        f"for a {split.height}x{split.width} grid"
                    )
                lat_tokens.append(split.tokens)
                lat_index += range(curr + 1, curr + 1 + n)
                lat_t += [float(split.timestep)] * n
                lat_pos.append(grid_position_ids(split.height, split.width, args.max_latent_size))
                lat_lens.append(n)
                mode = "noise" if split.noised else "full"
            elif isinstance(split, VitSplit):
                if args.vit is None:
                    raise ValueError("this Bagel model has no ViT (args.vit is None); it cannot take a VitSplit")
                n = split.height * split.width
                vit_patches.append(split.patches)
                vit_index += range(curr + 1, curr + 1 + n)
                vit_pos.append(grid_position_ids(split.height, split.width, args.vit_max_num_patch_per_side))
                vit_seqlens.append(n)
                mode = "full"
            else:
                raise TypeError(f"unknown split type {type(split).__name__}; use TextSplit, LatentSplit or VitSplit")
            text_ids += [args.start_of_image_id, args.end_of_image_id]
            text_index += [curr, curr + n + 1]
            position_ids += [r] * (n + 2)
            if mode != "noise":
                r += 1
            lens.append(n + 2)
            modes.append(mode)
            curr += n + 2
        sample_lens.append(curr - start)
        split_lens.append(lens)
        split_modes.append(modes)
        next_positions.append(r)

    def long(values) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long)

    def rows(chunks: list[torch.Tensor], width: int) -> torch.Tensor:
        return torch.cat(chunks) if chunks else torch.zeros(0, width)

    vit_width = args.vit.num_channels * args.vit.patch_size**2 if args.vit is not None else 0
    return PackedSequence(
        text_ids=long(text_ids),
        text_index=long(text_index),
        latent_tokens=rows(lat_tokens, args.patch_latent_dim),
        latent_index=long(lat_index),
        latent_timesteps=torch.tensor(lat_t, dtype=torch.float32),
        latent_position_ids=torch.cat(lat_pos) if lat_pos else long([]),
        vit_patches=rows(vit_patches, vit_width),
        vit_index=long(vit_index),
        vit_position_ids=torch.cat(vit_pos) if vit_pos else long([]),
        vit_seqlens=vit_seqlens,
        position_ids=long(position_ids),
        sample_lens=sample_lens,
        split_lens=split_lens,
        split_modes=split_modes,
        next_positions=next_positions,
        latent_split_lens=lat_lens,
    )


def inverse_permutation(order: torch.Tensor) -> torch.Tensor:
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return inverse


def scatter_rows(values: list[torch.Tensor], indexes: list[torch.Tensor]) -> torch.Tensor:
    """Out-of-place `out[indexes[j]] = values[j]` for index sets that partition 0..N-1.

    One gather instead of in-place writes into a buffer, so it is safe for autograd (the in-place
    writes of the reference break it) and cheap.
    """
    return torch.cat(values)[inverse_permutation(torch.cat(indexes))]


# ---------------------------------------------------------------------------------------------
# Expert routing and attention plans


class Routing:
    """Which packed tokens go through the und expert and which through the gen expert."""

    def __init__(self, gen_mask: torch.Tensor):
        self.und = (~gen_mask).nonzero().squeeze(1)
        self.gen = gen_mask.nonzero().squeeze(1)
        self.inverse = inverse_permutation(torch.cat([self.und, self.gen]))

    def apply(self, und_fn: Callable, gen_fn: Callable, x: torch.Tensor):
        """und_fn on the und tokens and gen_fn on the gen tokens, results back in packed order.

        The functions may return a tensor or a tuple of tensors (one row per token).
        """
        if self.gen.numel() == 0:
            return und_fn(x)
        if self.und.numel() == 0:
            return gen_fn(x)
        und_out, gen_out = und_fn(x[self.und]), gen_fn(x[self.gen])
        if isinstance(und_out, tuple):
            return tuple(torch.cat([u, g])[self.inverse] for u, g in zip(und_out, gen_out))
        return torch.cat([und_out, gen_out])[self.inverse]


@dataclass
class KVCache:
    """Keys and values of C packed contexts for every decoder layer.

    Context c holds `lens[c]` tokens (rows offsets[c] .. offsets[c] + lens[c] of each layer's
    tensors) and the next split appended to it starts at RoPE position `positions[c]`. Contexts may
    be empty (the text-unconditional CFG branch of text-to-image). A cache is never modified:
    `extend` returns a new one, so one prompt context serves every denoising step and every member
    of its group.
    """

    keys: list[torch.Tensor] | None  # per layer (sum(lens), kv_heads, head_dim); None if every context is empty
    values: list[torch.Tensor] | None
    lens: list[int]
    positions: list[int]

    @staticmethod
    def empty(num_contexts: int) -> KVCache:
        return KVCache(None, None, [0] * num_contexts, [0] * num_contexts)

    @property
    def num_contexts(self) -> int:
        return len(self.lens)

    @property
    def offsets(self) -> list[int]:
        out, total = [], 0
        for n in self.lens:
            out.append(total)
            total += n
        return out

    def token_index(self, contexts: list[int]) -> torch.Tensor:
        """Rows of the chosen contexts, concatenated in the given order (repeats allowed)."""
        offsets = self.offsets
        rows = [torch.arange(offsets[c], offsets[c] + self.lens[c]) for c in contexts]
        return torch.cat(rows) if rows else torch.zeros(0, dtype=torch.long)

    def select(self, contexts: list[int]) -> KVCache:
        """A cache holding the chosen contexts (repeats allowed), e.g. to share a prefix between branches."""
        for c in contexts:
            if not 0 <= c < self.num_contexts:
                raise IndexError(f"context {c} is out of range for a cache of {self.num_contexts} contexts")
        lens = [self.lens[c] for c in contexts]
        positions = [self.positions[c] for c in contexts]
        if self.keys is None or sum(lens) == 0:
            return KVCache(None, None, lens, positions)
        index = self.token_index(contexts).to(self.keys[0].device)
        return KVCache([k[index] for k in self.keys], [v[index] for v in self.values], lens, positions)

    def cat(self, other: KVCache) -> KVCache:
        """Contexts of self followed by those of other."""
        lens, positions = self.lens + other.lens, self.positions + other.positions
        if self.keys is None:
            return KVCache(other.keys, other.values, lens, positions)
        if other.keys is None:
            return KVCache(self.keys, self.values, lens, positions)
        keys = [torch.cat([a, b]) for a, b in zip(self.keys, other.keys)]
        values = [torch.cat([a, b]) for a, b in zip(self.values, other.values)]
        return KVCache(keys, values, lens, positions)


class CachedAttention:
    """Query segment i attends to the cached keys of context `contexts[i]` followed by its own keys.

    This is flash-attn varlen's layout (one key segment per query segment); `causal` is
    bottom-right aligned, so causal text appended to a context sees the whole context.
    """

    def __init__(
        self,
        cache: KVCache,
        contexts: list[int],
        query_lens: list[int],
        causal: bool,
        device: torch.device,
        dtype: torch.dtype,
        backend: str,
    ):
        if len(contexts) != len(query_lens):
            raise ValueError(f"got {len(contexts)} contexts for {len(query_lens)} query segments")
        self.cache = cache
        key_lens = [cache.lens[c] + n for c, n in zip(contexts, query_lens)]
        self.gather = None
        if cache.keys is not None and sum(cache.lens[c] for c in contexts) > 0:
            # rows of cat([cached keys, new keys]) in the order [context 0, queries 0, context 1, ...]
            pieces, q_start = [], sum(cache.lens)
            for c, n in zip(contexts, query_lens):
                pieces += [cache.token_index([c]), torch.arange(q_start, q_start + n)]
                q_start += n
            self.gather = torch.cat(pieces).to(device)
        self.kernel = PackedAttention(PackedLayout.varlen(query_lens, key_lens, causal), backend, device, dtype)

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        if self.gather is not None:
            k = torch.cat([self.cache.keys[layer].to(k.dtype), k])[self.gather]
            v = torch.cat([self.cache.values[layer].to(v.dtype), v])[self.gather]
        return self.kernel(q, k, v), k, v


class SplitAttention:
    """Each packed sample attends within itself under Bagel's split rules (the full-sequence training path)."""

    def __init__(self, seq: PackedSequence, device: torch.device, dtype: torch.dtype, backend: str):
        self.kernel = PackedAttention(PackedLayout.from_splits(seq.split_lens, seq.split_modes), backend, device, dtype)

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        return self.kernel(q, k, v), k, v


# ---------------------------------------------------------------------------------------------
# Language model


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Expert(nn.Module):
    """Everything one expert owns in one decoder layer; the attention itself is shared."""

    def __init__(self, args: BagelArgs):
        super().__init__()
        dim, head_dim, eps = args.hidden_size, args.head_dim, args.rms_norm_eps
        self.head_dim = head_dim
        self.input_norm = RMSNorm(dim, eps, weight_after_cast=True)
        self.q_proj = nn.Linear(dim, args.num_heads * head_dim, bias=True)
        self.k_proj = nn.Linear(dim, args.num_kv_heads * head_dim, bias=True)
        self.v_proj = nn.Linear(dim, args.num_kv_heads * head_dim, bias=True)
        self.q_norm = RMSNorm(head_dim, eps, weight_after_cast=True)
        self.k_norm = RMSNorm(head_dim, eps, weight_after_cast=True)
        self.o_proj = nn.Linear(args.num_heads * head_dim, dim, bias=False)
        self.post_attention_norm = RMSNorm(dim, eps, weight_after_cast=True)
        self.mlp = SwiGLU(dim, args.intermediate_size)

    def qkv(self, x: torch.Tensor, fp32_qk: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k (normed) and v per head; `fp32_qk` norms q and k in fp32 (generation mode, see MoTDecoderLayer)."""
        h = self.input_norm(x)
        q = self.q_proj(h).unflatten(-1, (-1, self.head_dim))
        k = self.k_proj(h).unflatten(-1, (-1, self.head_dim))
        v = self.v_proj(h).unflatten(-1, (-1, self.head_dim))
        if fp32_qk:
            q, k = q.float(), k.float()
        return self.q_norm(q), self.k_norm(k), v

    def feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.post_attention_norm(x))


class MoTDecoderLayer(nn.Module):
    """Pre-norm Qwen2 layer with per-expert weights (Bagel's `Qwen2MoTDecoderLayer`).

    Where low-precision results are rounded follows the reference, whose published weights were
    tuned under these numerics. Its hard-coded bfloat16 casts are read here as casts to the
    activation dtype: identities in fp32 (the fp32 parity), the reference bit for bit in bf16.
      - understanding mode (text and ViT prefill; the full-sequence training path, `forward_train`,
        for every token): q/k norms take the activation dtype and round their normalised value before
        the weight multiply; RoPE runs in the activation dtype, rounding after each operation;
      - generation mode (the image block of every denoising step, and prefilling a clean VAE image:
        the reference's mode "gen", for every token of the call, markers included): q and k go to fp32
        before their norms, RoPE runs in fp32 with tables rounded to the activation dtype, and q and k
        are rounded once, right before attention.
    """

    def __init__(self, args: BagelArgs, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.und = Expert(args)
        self.gen = Expert(args)

    def forward(
        self, x: torch.Tensor, routing: Routing, cos: torch.Tensor, sin: torch.Tensor, attend, gen_mode: bool = False
    ):
        """Returns the new hidden states and this layer's keys/values as attended (context included)."""
        q, k, v = routing.apply(partial(self.und.qkv, fp32_qk=gen_mode), partial(self.gen.qkv, fp32_qk=gen_mode), x)
        if gen_mode:
            cos, sin = cos.to(x.dtype), sin.to(x.dtype)
            q, k = apply_rope(q, cos, sin).to(x.dtype), apply_rope(k, cos, sin).to(x.dtype)
        else:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out, keys, values = attend(self.layer_id, q, k, v)
        x = x + routing.apply(self.und.o_proj, self.gen.o_proj, out.flatten(1))
        x = x + routing.apply(self.und.feed_forward, self.gen.feed_forward, x)
        return x, keys, values


# ---------------------------------------------------------------------------------------------
# SigLIP vision encoder (NaViT packing: images of any size, attention within each image)


class VitAttention(nn.Module):
    def __init__(self, args: VitArgs):
        super().__init__()
        dim = args.hidden_size
        self.head_dim = dim // args.num_heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, attend: PackedAttention) -> torch.Tensor:
        q, k, v = (proj(x).unflatten(-1, (-1, self.head_dim)) for proj in (self.q_proj, self.k_proj, self.v_proj))
        return self.out_proj(attend(q, k, v).flatten(1))


class VitMLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class VitLayer(nn.Module):
    def __init__(self, args: VitArgs):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(args.hidden_size, eps=args.layer_norm_eps)
        self.self_attn = VitAttention(args)
        self.layer_norm2 = nn.LayerNorm(args.hidden_size, eps=args.layer_norm_eps)
        self.mlp = VitMLP(args.hidden_size, args.intermediate_size)

    def forward(self, x: torch.Tensor, attend: PackedAttention) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), attend)
        return x + self.mlp(self.layer_norm2(x))


class VitEmbeddings(nn.Module):
    def __init__(self, args: VitArgs):
        super().__init__()
        # A linear layer on flattened patches: the released weights store SigLIP's conv this way.
        self.patch_embedding = nn.Linear(args.num_channels * args.patch_size**2, args.hidden_size)
        self.position_embedding = nn.Embedding(args.patches_per_side**2, args.hidden_size)

    def forward(self, patches: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        return self.patch_embedding(patches) + self.position_embedding(position_ids)


class VisionTransformer(nn.Module):
    """SigLIP-so400m without its last layer, with a learned absolute position table and no RoPE."""

    def __init__(self, args: VitArgs):
        super().__init__()
        self.embeddings = VitEmbeddings(args)
        self.layers = nn.ModuleList(VitLayer(args) for _ in range(args.num_layers))
        self.post_layernorm = nn.LayerNorm(args.hidden_size, eps=args.layer_norm_eps)

    def forward(
        self, patches: torch.Tensor, position_ids: torch.Tensor, seqlens: list[int], attention: str = "auto"
    ) -> torch.Tensor:
        """Patches of several images packed (sum(seqlens), p*p*3); each image attends within itself."""
        x = self.embeddings(patches.to(self.embeddings.patch_embedding.weight.dtype), position_ids)
        attend = PackedAttention(PackedLayout.varlen(seqlens), attention, x.device, x.dtype)
        for layer in self.layers:
            x = layer(x, attend)
        return self.post_layernorm(x)


class Connector(nn.Module):
    """ViT width -> LLM width MLP."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, out_dim)
        self.fc2 = nn.Linear(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


# ---------------------------------------------------------------------------------------------
# The model


class Bagel(nn.Module):
    def __init__(self, args: BagelArgs):
        super().__init__()
        self.args = args
        dim = args.hidden_size
        self.embed_tokens = nn.Embedding(args.vocab_size, dim)
        self.layers = nn.ModuleList(MoTDecoderLayer(args, i) for i in range(args.num_layers))
        self.norm = nn.ModuleDict({"und": RMSNorm(dim, args.rms_norm_eps, True), "gen": RMSNorm(dim, args.rms_norm_eps, True)})
        # Text head: unused by image generation, kept so a loaded checkpoint saves back complete.
        self.lm_head = nn.Linear(dim, args.vocab_size, bias=False)

        self.time_embedder = TimestepEmbedding(256, dim)
        self.vae2llm = nn.Linear(args.patch_latent_dim, dim)
        self.llm2vae = nn.Linear(dim, args.patch_latent_dim)
        # Fixed 2-D sin-cos tables, frozen buffers (filled by init_weights or loaded with the checkpoint).
        self.register_buffer("latent_pos_embed", torch.empty(args.max_latent_size**2, dim))

        self.vit = None
        if args.vit is not None:
            if args.vit.patches_per_side != args.vit_max_num_patch_per_side:
                raise ValueError(
                    f"vit_max_num_patch_per_side {args.vit_max_num_patch_per_side} must equal the ViT's patches per side "
                    f"{args.vit.patches_per_side} (image_size / patch_size): both index the same position grid"
                )
            self.vit = VisionTransformer(args.vit)
            self.connector = Connector(args.vit.hidden_size, dim)
            self.register_buffer("vit_pos_embed", torch.empty(args.vit_max_num_patch_per_side**2, dim))

    @torch.no_grad()
    def init_weights(self) -> None:
        """Qwen2-style init (N(0, 0.02) weights, zero biases, unit norms) and the exact sin-cos tables.

        llm2vae is random here, not zero as when Bagel trains from a plain Qwen: a random-init model
        then predicts non-zero velocities, so debug runs have gradients to follow.
        """
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, (RMSNorm, nn.LayerNorm)):
                module.reset_parameters()
        a = self.args
        self.latent_pos_embed.copy_(get_2d_sincos_pos_embed(a.hidden_size, a.max_latent_size, a.max_latent_size))
        if self.vit is not None:
            side = a.vit_max_num_patch_per_side
            self.vit_pos_embed.copy_(get_2d_sincos_pos_embed(a.hidden_size, side, side))

    def gen_expert_parameters(self) -> list[nn.Parameter]:
        """The generation expert (what flow_grpo trains): every layer's gen weights and the gen final norm."""
        params = [p for layer in self.layers for p in layer.gen.parameters()]
        return params + list(self.norm["gen"].parameters())

    # -- embeddings ---------------------------------------------------------------------------

    def embed_time(self, t: torch.Tensor) -> torch.Tensor:
        """Flow time t in [0, 1] (no x1000) -> (len(t), dim)."""
        features = timestep_sinusoid(t, 256, flip_sin_to_cos=True)
        return self.time_embedder(features.to(self.time_embedder.linear_1.weight.dtype))

    def embed_latents(self, tokens: torch.Tensor, time_emb: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """vae2llm(x) + time embedding + fixed position table row; shapes broadcast ((..., n, .) with (n,) ids)."""
        dtype = self.vae2llm.weight.dtype
        return self.vae2llm(tokens.to(dtype)) + time_emb + self.latent_pos_embed[position_ids].to(dtype)

    def embed_vit(
        self, patches: torch.Tensor, position_ids: torch.Tensor, seqlens: list[int], attention: str = "auto"
    ) -> torch.Tensor:
        if self.vit is None:
            raise ValueError("this Bagel model was built without a ViT (args.vit is None); it cannot encode images")
        x = self.connector(self.vit(patches, position_ids, seqlens, attention))
        return x + self.vit_pos_embed[position_ids].to(x.dtype)

    def embed(self, seq: PackedSequence, attention: str = "auto") -> tuple[torch.Tensor, Routing]:
        """Token embeddings of a packed sequence, and its expert routing (gen = every VAE latent token)."""
        values = [self.embed_tokens(seq.text_ids)]
        indexes = [seq.text_index]
        if seq.latent_index.numel():
            time_emb = self.embed_time(seq.latent_timesteps)
            values.append(self.embed_latents(seq.latent_tokens, time_emb, seq.latent_position_ids))
            indexes.append(seq.latent_index)
        if seq.vit_index.numel():
            values.append(self.embed_vit(seq.vit_patches, seq.vit_position_ids, seq.vit_seqlens, attention))
            indexes.append(seq.vit_index)
        dtype = values[0].dtype
        x = scatter_rows([v.to(dtype) for v in values], indexes)
        gen_mask = torch.zeros(seq.num_tokens, dtype=torch.bool, device=x.device)
        gen_mask[seq.latent_index] = True
        return x, Routing(gen_mask)

    # -- the decoder --------------------------------------------------------------------------

    def decode(self, x: torch.Tensor, routing: Routing, position_ids: torch.Tensor, attend, gen_mode: bool = False):
        """All decoder layers and the per-expert final norm; also returns each layer's attended keys/values.

        `gen_mode` selects the reference's generation-mode rounding (MoTDecoderLayer).
        """
        cos, sin = rope_cos_sin(position_ids, self.args.head_dim, self.args.rope_theta)
        keys, values = [], []
        for layer in self.layers:
            x, k, v = layer(x, routing, cos, sin, attend, gen_mode)
            keys.append(k)
            values.append(v)
        return routing.apply(self.norm["und"], self.norm["gen"], x), keys, values

    def forward(self, samples: list[list[Split]], attention: str = "auto") -> list[torch.Tensor]:
        """Full-sequence pass over packed samples; returns the velocity of every LatentSplit, in order.

        Each sample attends only to itself, under Bagel's split mask. Velocities of clean
        (context) latent splits are returned too; only those of noised splits are meaningful.
        Rounding is the reference's training path (understanding mode for every token).
        `attention` is the packed-attention backend (models/common/attention.py).
        """
        device = self.embed_tokens.weight.device
        seq = pack(samples, self.args).to(device)
        x, routing = self.embed(seq, attention)
        h, _, _ = self.decode(x, routing, seq.position_ids, SplitAttention(seq, device, x.dtype, attention))
        return list(self.llm2vae(h[seq.latent_index]).split(seq.latent_split_lens))

    @torch.no_grad()
    def extend(self, cache: KVCache, contexts: list[int], splits: list[Split], attention: str = "auto") -> KVCache:
        """Append splits[i] to context contexts[i]; returns a cache with one context per split.

        One call takes one kind of split: text (causal, understanding mode), ViT images
        (understanding mode) or clean VAE images (generation mode, as the reference prefills them);
        noised latents cannot be cached (nothing may attend to them). Runs without grad: the context
        is frozen conditioning.
        """
        kinds = {type(s) for s in splits}
        if len(kinds) != 1:
            raise ValueError(
                f"extend: got {sorted(k.__name__ for k in kinds)} in one call; pass one kind of split per call "
                "(text attends causally, and VAE images prefill in generation mode, ViT images in understanding mode)"
            )
        if any(isinstance(s, LatentSplit) and s.noised for s in splits):
            raise ValueError("extend: a noised LatentSplit is a generation target and cannot become context; use denoise")
        device = self.embed_tokens.weight.device
        seq = pack([[s] for s in splits], self.args, [cache.positions[c] for c in contexts]).to(device)
        x, routing = self.embed(seq, attention)
        attend = CachedAttention(cache, contexts, seq.sample_lens, kinds == {TextSplit}, device, x.dtype, attention)
        _, keys, values = self.decode(x, routing, seq.position_ids, attend, gen_mode=kinds == {LatentSplit})
        lens = [cache.lens[c] + n for c, n in zip(contexts, seq.sample_lens)]
        return KVCache(keys, values, lens, seq.next_positions)

    def denoise(
        self,
        cache: KVCache,
        contexts: list[int],
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        grid: tuple[int, int],
        attention: str = "auto",
    ) -> torch.Tensor:
        """Velocities (R, h*w, p*p*C) of noised latents (R, h*w, p*p*C) at flow times (R,), row i against context contexts[i].

        Each row is the image block [<|vision_start|>, h*w latent tokens, <|vision_end|>] at its
        context's next position; the markers go through the und expert, the latents through gen,
        all in generation mode (the reference's `_forward_flow`).
        """
        rows, n, _ = latents.shape
        height, width = grid
        if n != height * width:
            raise ValueError(f"denoise: {n} latent tokens do not fill a {height}x{width} grid")
        device = latents.device
        position_ids = grid_position_ids(height, width, self.args.max_latent_size).to(device)
        markers = self.embed_tokens(torch.tensor([self.args.start_of_image_id, self.args.end_of_image_id], device=device))
        image = self.embed_latents(latents, self.embed_time(timesteps)[:, None], position_ids)
        x = torch.cat([markers[0].expand(rows, 1, -1), image.to(markers.dtype), markers[1].expand(rows, 1, -1)], dim=1)
        block = n + 2
        gen_mask = torch.ones(rows, block, dtype=torch.bool, device=device)
        gen_mask[:, 0] = gen_mask[:, -1] = False
        positions = torch.tensor([cache.positions[c] for c in contexts], device=device).repeat_interleave(block)
        attend = CachedAttention(cache, contexts, [block] * rows, False, device, x.dtype, attention)
        h, _, _ = self.decode(x.flatten(0, 1), Routing(gen_mask.flatten()), positions, attend, gen_mode=True)
        # llm2vae on the packed 2-D sequence, then the latent rows, as the reference: a GEMM's rounding may
        # depend on the layout of its input, and a strided 3-D slice takes another kernel. The rows are copied
        # out: a view returned through FSDP's forward hooks would lose its pre-backward hook to an in-place op.
        return self.llm2vae(h).unflatten(0, (rows, block))[:, 1:-1].contiguous()
