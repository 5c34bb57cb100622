"""Conditioning images as the pipelines receive them (editing families)."""

from __future__ import annotations

import torch
from PIL import Image


def to_pil(image) -> Image.Image:
    """A PIL image, or a (3, H, W) tensor in [0, 1], as an RGB PIL image (rounded to uint8)."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, torch.Tensor) and image.ndim == 3 and image.shape[0] == 3:
        array = (image.detach().float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
        return Image.fromarray(array)
    raise TypeError(f"conditioning images must be PIL images or (3, H, W) tensors in [0, 1], got {type(image).__name__}")
