"""Conditioning images (edit models) in the forms callers hand them over."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def to_pil_image(image) -> Image.Image:
    """A PIL image, a uint8 (H, W, 3) array or a float (3, H, W) tensor in [0, 1] -> an RGB PIL image."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3:
        return Image.fromarray(image)
    if isinstance(image, torch.Tensor) and image.ndim == 3 and image.shape[0] == 3:
        array = (image.detach().float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
        return Image.fromarray(array)
    what = f"{type(image).__name__} of shape {tuple(image.shape)}" if hasattr(image, "shape") else type(image).__name__
    raise TypeError(
        f"conditioning images must be PIL images, uint8 (H, W, 3) arrays or (3, H, W) tensors in [0, 1]; got {what}"
    )
