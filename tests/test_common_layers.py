"""Shared layers (models/common) against the diffusers / transformers layers they port.

These are exact ports, so results must be bitwise equal, in fp32 and in bf16.
"""

from __future__ import annotations

import pytest
import torch
from diffusers.models.attention import FeedForward as DiffusersFeedForward
from diffusers.models.embeddings import PixArtAlphaTextProjection, get_timestep_embedding
from diffusers.models.embeddings import TimestepEmbedding as DiffusersTimestepEmbedding
from diffusers.models.embeddings import get_2d_sincos_pos_embed as diffusers_pos_embed
from diffusers.models.normalization import AdaLayerNormContinuous as DiffusersAdaLNContinuous
from diffusers.models.normalization import AdaLayerNormZero as DiffusersAdaLNZero
from diffusers.models.normalization import RMSNorm as DiffusersRMSNorm
from diffusers.models.normalization import SD35AdaLayerNormZeroX
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

from titan_flow.models.common.embeddings import (
    TextProjection,
    TimestepEmbedding,
    get_2d_sincos_pos_embed,
    timestep_sinusoid,
)
from titan_flow.models.common.layers import FeedForward
from titan_flow.models.common.norms import AdaLayerNormContinuous, AdaLayerNormZero, AdaLayerNormZeroX, RMSNorm


def randomized(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, 0.5)
    return module


def load_same(ours: torch.nn.Module, ref: torch.nn.Module) -> torch.nn.Module:
    """Loading strictly also asserts the parameter names are diffusers'."""
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours


@pytest.mark.parametrize(
    "dim, flip, shift, scale",
    [(256, True, 0.0, 1.0), (256, False, 1.0, 1.0), (7, True, 0.0, 1.0), (64, True, 0.0, 1000.0)],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_timestep_sinusoid_matches_diffusers(dim, flip, shift, scale, dtype):
    t = torch.tensor([0.0, 0.25, 1.0, 17.5, 999.0]).to(dtype)
    ours = timestep_sinusoid(t, dim, flip_sin_to_cos=flip, downscale_freq_shift=shift, scale=scale)
    ref = get_timestep_embedding(t, dim, flip_sin_to_cos=flip, downscale_freq_shift=shift, scale=scale)
    assert ours.dtype == torch.float32 and torch.equal(ours, ref)
    with pytest.raises(ValueError, match=r"shape \(5, 1\)"):
        timestep_sinusoid(t[:, None])


@pytest.mark.parametrize("embed_dim, grid, base, interp", [(16, 16, 8, 1.0), (1536, 24, 64, 1.0), (32, 10, 4, 2.0)])
def test_2d_sincos_pos_embed_matches_diffusers(embed_dim, grid, base, interp):
    ours = get_2d_sincos_pos_embed(embed_dim, grid, base_size=base, interpolation_scale=interp)
    ref = diffusers_pos_embed(embed_dim, grid, base_size=base, interpolation_scale=interp).float()
    assert ours.shape == (grid * grid, embed_dim) and torch.equal(ours, ref)
    # Layout: row r*grid + c; the first half of the dims depends only on the column c.
    table = ours.reshape(grid, grid, embed_dim)
    assert torch.equal(table[0, :, : embed_dim // 2], table[-1, :, : embed_dim // 2])
    assert torch.equal(table[:, 0, embed_dim // 2 :], table[:, -1, embed_dim // 2 :])


@pytest.mark.parametrize(
    "x_dtype, w_dtype",
    [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32)],
)
def test_rms_norm_variants_match_their_references(x_dtype, w_dtype):
    x = (torch.randn(2, 3, 5, 64, generator=torch.Generator().manual_seed(0)) * 3).to(x_dtype)
    diffusers_ref = randomized(DiffusersRMSNorm(64, eps=1e-6)).to(w_dtype)
    ours = load_same(RMSNorm(64, eps=1e-6), diffusers_ref).to(w_dtype)
    expected = diffusers_ref(x)
    got = ours(x)
    assert got.dtype == expected.dtype and torch.equal(got, expected)

    qwen_ref = randomized(Qwen2RMSNorm(64, eps=1e-6)).to(w_dtype)
    ours = load_same(RMSNorm(64, eps=1e-6, weight_after_cast=True), qwen_ref).to(w_dtype)
    expected = qwen_ref(x)
    got = ours(x)
    assert got.dtype == expected.dtype and torch.equal(got, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_adaptive_norms_and_mlps_match_diffusers(dtype):
    dim = 32
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 9, dim, generator=g).to(dtype)
    emb = torch.randn(2, dim, generator=g).to(dtype)

    pairs = [
        (AdaLayerNormZero(dim), DiffusersAdaLNZero(dim)),
        (AdaLayerNormZeroX(dim), SD35AdaLayerNormZeroX(dim)),
    ]
    for ours, ref in pairs:
        ref = randomized(ref).to(dtype)
        ours = load_same(ours, ref).to(dtype)
        got, expected = ours(x, emb), ref(x, emb=emb)
        assert len(got) == len(expected) and all(torch.equal(a, b) for a, b in zip(got, expected))

    ref = randomized(DiffusersAdaLNContinuous(dim, dim, elementwise_affine=False, eps=1e-6)).to(dtype)
    ours = load_same(AdaLayerNormContinuous(dim, dim), ref).to(dtype)
    assert torch.equal(ours(x, emb), ref(x, emb))

    ref = randomized(DiffusersFeedForward(dim, dim_out=dim, activation_fn="gelu-approximate")).to(dtype)
    ours = load_same(FeedForward(dim), ref).to(dtype)
    assert torch.equal(ours(x), ref(x))

    ref = randomized(DiffusersTimestepEmbedding(256, dim)).to(dtype)
    ours = load_same(TimestepEmbedding(256, dim), ref).to(dtype)
    features = timestep_sinusoid(torch.tensor([3.0, 700.0])).to(dtype)
    assert torch.equal(ours(features), ref(features))

    ref = randomized(PixArtAlphaTextProjection(24, dim, act_fn="silu")).to(dtype)
    ours = load_same(TextProjection(24, dim), ref).to(dtype)
    pooled = torch.randn(2, 24, generator=g).to(dtype)
    assert torch.equal(ours(pooled), ref(pooled))
