"""CLIP pieces shared by PickScore, CLIPScore, Aesthetic and image_similarity.

Features are computed as projection(tower(x).pooler_output), which is what `get_image_features` /
`get_text_features` compute in every transformers version (their return type changed in 5.x).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def load_clip(path, device, dtype=torch.float32):
    from transformers import CLIPModel

    return CLIPModel.from_pretrained(path, dtype=dtype).eval().requires_grad_(False).to(device)


def load_processor(path):
    from transformers import CLIPProcessor

    return CLIPProcessor.from_pretrained(path)


def image_features(model, pixel_values: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    feats = model.visual_projection(model.vision_model(pixel_values=pixel_values).pooler_output)
    return feats / feats.norm(p=2, dim=-1, keepdim=True) if normalize else feats


def text_features(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, normalize: bool = True):
    feats = model.text_projection(model.text_model(input_ids=input_ids, attention_mask=attention_mask).pooler_output)
    return feats / feats.norm(p=2, dim=-1, keepdim=True) if normalize else feats


def _size(size) -> int | tuple[int, int]:
    if isinstance(size, int):
        return size
    if "height" in size and "width" in size:
        return (size["height"], size["width"])
    if "shortest_edge" in size:
        return size["shortest_edge"]
    raise ValueError(f"unsupported image-processor size {size!r}; expected an int, height/width or shortest_edge")


def resize(x: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """torchvision `Resize(size)` on a float NCHW tensor: bilinear, antialiased; an int resizes the short edge."""
    h, w = x.shape[-2:]
    if isinstance(size, int):
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = size, int(size * long / short)
        out = (new_long, new_short) if w <= h else (new_short, new_long)
    else:
        out = size
    if tuple(out) == (h, w):
        return x
    return F.interpolate(x, size=out, mode="bilinear", align_corners=False, antialias=True)


def center_crop(x: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    th, tw = (size, size) if isinstance(size, int) else size
    h, w = x.shape[-2:]
    if th > h or tw > w:
        raise ValueError(f"center crop {th}x{tw} is larger than the resized image {h}x{w}")
    top, left = int(round((h - th) / 2.0)), int(round((w - tw) / 2.0))
    return x[..., top : top + th, left : left + tw]


def tensor_transform(image_processor):
    """The image processor's resize -> center crop -> normalize, applied to float [0, 1] tensors.

    CLIPScore and image_similarity of the reference feed the generated float images through these
    tensor ops (no uint8 rounding, bilinear resize) instead of the processor's PIL path.
    """
    cfg = image_processor.to_dict()
    mean = torch.tensor(image_processor.image_mean).view(1, -1, 1, 1)
    std = torch.tensor(image_processor.image_std).view(1, -1, 1, 1)

    def transform(x: torch.Tensor) -> torch.Tensor:
        if cfg.get("do_resize"):
            x = resize(x, _size(cfg["size"]))
        if cfg.get("do_center_crop"):
            x = center_crop(x, _size(cfg["crop_size"]))
        if cfg.get("do_normalize"):
            x = (x - mean.to(x)) / std.to(x)
        return x

    return transform
