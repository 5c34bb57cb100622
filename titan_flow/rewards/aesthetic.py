"""LAION improved aesthetic predictor: a linear MLP head on L2-normalised CLIP-L image features.

Layout of `reward.model_paths.aesthetic`: the openai/clip-vit-large-patch14 directory (as saved by
`save_pretrained`) with LAION's head `sac+logos+ava1-l14-linearMSE.pth` copied into it:

    aesthetic/
      config.json, model.safetensors, preprocessor_config.json, tokenizer files   (CLIP-L)
      sac+logos+ava1-l14-linearMSE.pth                                              (MLP head)

The head is 768 -> 1024 -> 128 -> 64 -> 16 -> 1 with dropouts and no nonlinearities (so it is one
affine map, kept as layers to load the checkpoint's keys `layers.{0,2,4,6,7}`). The raw predicted
score (about 1..10) is the reward; images go through the processor's PIL path from round(255 x).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from titan_flow.rewards.clip import image_features, load_clip, load_processor
from titan_flow.rewards.registry import Reward, model_path_of, register_reward, to_pil

HEAD_FILE = "sac+logos+ava1-l14-linearMSE.pth"


class MLPHead(nn.Module):
    """in -> 1024 -> 128 -> 64 -> 16 -> 1 with dropouts and no nonlinearities (ImageReward reuses it)."""

    def __init__(self, in_features: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(in_features, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embed: torch.Tensor) -> torch.Tensor:
        return self.layers(embed).squeeze(-1)


@register_reward
class Aesthetic(Reward):
    name = "aesthetic"
    needs_model = True

    def __init__(self, model_path, device, batch_size: int = 64):
        path = model_path_of(self.name, model_path, must_contain=("config.json", HEAD_FILE))
        self.device = torch.device(device)
        self.processor = load_processor(path)
        self.clip = load_clip(path, self.device)
        state = torch.load(path / HEAD_FILE, map_location="cpu", weights_only=True)
        self.head = MLPHead(self.clip.config.projection_dim)
        self.head.load_state_dict(state)
        self.head.eval().requires_grad_(False).to(self.device)
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(self, images, prompts, metadata, ref_images=None, only_strict=True):
        scores = []
        for start in range(0, len(images), self.batch_size):
            pixels = self.processor(images=to_pil(images[start : start + self.batch_size]), return_tensors="pt")
            embed = image_features(self.clip, pixels["pixel_values"].to(self.device))
            scores.append(self.head(embed))
        return {"score": torch.cat(scores).float().cpu()}
