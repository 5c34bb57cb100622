"""PickScore: exp(logit_scale) * cos(text, image) / 26 of the PickScore_v1 CLIP-H model.

Layout of `reward.model_paths.pickscore`: one directory holding both the processor of
laion/CLIP-ViT-H-14-laion2B-s32B-b79K and the model yuvalkirstain/PickScore_v1, e.g.

    AutoProcessor.from_pretrained("laion/CLIP-ViT-H-14-laion2B-s32B-b79K").save_pretrained(d)
    AutoModel.from_pretrained("yuvalkirstain/PickScore_v1").save_pretrained(d)

Images go through the processor's PIL path (uint8 = round(255 x)); text is padded to the longest
prompt and truncated at 77 tokens; fp32 as in the reference. /26 maps typical scores near 1.
"""

from __future__ import annotations

import torch

from titan_flow.rewards.clip import image_features, load_clip, load_processor, text_features
from titan_flow.rewards.registry import Reward, model_path_of, register_reward, to_pil


@register_reward
class PickScore(Reward):
    name = "pickscore"
    needs_model = True

    def __init__(self, model_path, device, batch_size: int = 64):
        path = model_path_of(self.name, model_path, must_contain=("config.json",))
        self.device = torch.device(device)
        self.processor = load_processor(path)
        self.model = load_clip(path, self.device)
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(self, images, prompts, metadata, ref_images=None, only_strict=True):
        scores = []
        for start in range(0, len(prompts), self.batch_size):
            sl = slice(start, start + self.batch_size)
            pixels = self.processor(images=to_pil(images[sl]), return_tensors="pt")["pixel_values"]
            text = self.processor(
                text=prompts[sl], padding=True, truncation=True, max_length=77, return_tensors="pt"
            )
            img = image_features(self.model, pixels.to(self.device))
            txt = text_features(self.model, text["input_ids"].to(self.device), text["attention_mask"].to(self.device))
            scores.append(self.model.logit_scale.exp() * (txt * img).sum(-1) / 26)
        return {"score": torch.cat(scores).float().cpu()}
