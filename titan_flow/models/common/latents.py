"""Latent noise and the 2x2 latent packing of the token-based pipelines (FLUX, Qwen-Image).

Packing turns a (B, C, h, w) VAE latent into (B, h/2 * w/2, 4C) tokens, row-major over the 2x2
patches, each token's channels ordered (c, patch row, patch col): channel index c*4 + py*2 + px.
"""

from __future__ import annotations

from typing import Sequence

import torch


def draw_noise(
    n: int,
    shape: Sequence[int],
    generator: torch.Generator | Sequence[torch.Generator] | None,
    device: torch.device | str,
) -> torch.Tensor:
    """(n, *shape) standard normal, drawn on the generator's device as diffusers' `randn_tensor` does
    (one draw of shape (1, *shape) per generator when given one per sample), then moved to `device`."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != n:
            raise ValueError(f"initial_noise: got {len(generator)} generators for {n} samples; pass one per sample")
        noise = torch.cat([torch.randn((1, *shape), generator=g, device=g.device) for g in generator])
    else:
        noise = torch.randn((n, *shape), generator=generator, device=generator.device if generator else device)
    return noise.to(device)


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h/2 * w/2, 4C)."""
    b, c, h, w = latents.shape
    if h % 2 or w % 2:
        raise ValueError(f"latents of {h}x{w} cannot be packed in 2x2 patches; both sides must be even")
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, h/2 * w/2, 4C) -> (B, C, h, w), the inverse of `pack_latents`."""
    b, n, c4 = tokens.shape
    if n != (h // 2) * (w // 2):
        raise ValueError(f"{n} tokens do not tile a {h}x{w} latent in 2x2 patches ({(h // 2) * (w // 2)} expected)")
    x = tokens.view(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c4 // 4, h, w)


def grid_ids(rows: int, cols: int, frame: int = 0, device: torch.device | str = "cpu") -> torch.Tensor:
    """(rows*cols, 3) float position ids (frame, row, col) of a token grid, row-major."""
    ids = torch.zeros(rows, cols, 3, device=device)
    ids[..., 0] = frame
    ids[..., 1] = torch.arange(rows, device=device)[:, None]
    ids[..., 2] = torch.arange(cols, device=device)[None, :]
    return ids.reshape(rows * cols, 3)
