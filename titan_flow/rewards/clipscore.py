"""CLIPScore: exp(logit_scale) * cos(text, image) / 30 of openai/clip-vit-large-patch14 (= 100 cos / 30).

Layout of `reward.model_paths.clipscore`: the CLIP-L directory as saved by `save_pretrained` (model,
tokenizer and preprocessor config). Images stay float: the processor's resize (short edge,
bilinear, antialiased) -> center crop -> normalize run on the tensor, as in the reference; text is
padded to 77 tokens.
"""

from __future__ import annotations

import torch

from titan_flow.rewards.clip import image_features, load_clip, load_processor, tensor_transform, text_features
from titan_flow.rewards.registry import Reward, model_path_of, register_reward


@register_reward
class CLIPScore(Reward):
    name = "clipscore"
    needs_model = True

    def __init__(self, model_path, device, batch_size: int = 64):
        path = model_path_of(self.name, model_path, must_contain=("config.json",))
        self.device = torch.device(device)
        self.processor = load_processor(path)
        self.transform = tensor_transform(self.processor.image_processor)
        self.model = load_clip(path, self.device)
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(self, images, prompts, metadata, ref_images=None, only_strict=True):
        scores = []
        for start in range(0, len(prompts), self.batch_size):
            sl = slice(start, start + self.batch_size)
            pixels = self.transform(images[sl].detach().float().to(self.device))
            text = self.processor(text=prompts[sl], padding="max_length", truncation=True, return_tensors="pt")
            img = image_features(self.model, pixels)
            txt = text_features(self.model, text["input_ids"].to(self.device), text["attention_mask"].to(self.device))
            scores.append(self.model.logit_scale.exp() * (txt * img).sum(-1) / 30)
        return {"score": torch.cat(scores).float().cpu()}
