"""JPEG (in)compressibility: how many kB the image takes as a quality-95 JPEG.

The reference's `jpeg_compressibility` is -size_kB / 500 (kB = 1000 bytes) of the image rounded to
uint8 and encoded by PIL; `jpeg_incompressibility` is the raw +size_kB (not registered upstream;
registered here because it is the other half of the DDPO pair).
"""

from __future__ import annotations

import io

import torch

from titan_flow.rewards.registry import Reward, register_reward, to_pil


def jpeg_size_kb(images: torch.Tensor) -> torch.Tensor:
    """float64, so -size/500 rounds once to float32 like the reference's numpy result."""
    sizes = []
    for im in to_pil(images):
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=95)
        sizes.append(buf.tell() / 1000)
    return torch.tensor(sizes, dtype=torch.float64)


@register_reward
class JpegIncompressibility(Reward):
    name = "jpeg_incompressibility"

    def __call__(self, images, prompts, metadata, ref_images=None, only_strict=True):
        return {"score": jpeg_size_kb(images).float()}


@register_reward
class JpegCompressibility(Reward):
    name = "jpeg_compressibility"

    def __call__(self, images, prompts, metadata, ref_images=None, only_strict=True):
        return {"score": (-jpeg_size_kb(images) / 500).float()}
