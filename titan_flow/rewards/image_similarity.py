"""image_similarity (edit tasks): cosine of CLIP-L image features, generated image vs its input image.

Layout of `reward.model_paths.image_similarity`: the openai/clip-vit-large-patch14 directory (the
same one CLIPScore uses). Both images go through the float tensor transform of clipscore.py; the
reference images may be PIL images of any size (one per generated image) or a tensor.
"""

from __future__ import annotations

import torch

from titan_flow.rewards.clip import image_features, load_clip, load_processor, tensor_transform
from titan_flow.rewards.registry import Reward, as_float_images, model_path_of, register_reward


@register_reward
class ImageSimilarity(Reward):
    name = "image_similarity"
    needs_model = True

    def __init__(self, model_path, device, batch_size: int = 64):
        path = model_path_of(self.name, model_path, must_contain=("config.json",))
        self.device = torch.device(device)
        self.transform = tensor_transform(load_processor(path).image_processor)
        self.model = load_clip(path, self.device)
        self.batch_size = batch_size

    def _features(self, images: list[torch.Tensor]) -> torch.Tensor:
        pixels = torch.cat([self.transform(im[None].to(self.device)) for im in images])
        return torch.cat(
            [image_features(self.model, pixels[i : i + self.batch_size]) for i in range(0, len(pixels), self.batch_size)]
        )

    @torch.no_grad()
    def __call__(self, images, prompts, metadata, ref_images=None, only_strict=True):
        if ref_images is None:
            raise ValueError("image_similarity compares each generated image with its input image: pass ref_images")
        refs = as_float_images(ref_images)
        if len(refs) != len(images):
            raise ValueError(f"image_similarity got {len(images)} images but {len(refs)} ref_images")
        gen = self._features(as_float_images(images))
        ref = self._features(refs)
        return {"score": (gen * ref).sum(-1).float().cpu()}
