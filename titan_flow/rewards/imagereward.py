"""ImageReward v1.0 on transformers' BLIP modules, loaded from the original checkpoint.

The `image-reward` package pins timm/fairscale and downloads at import. Its model is BLIP (a ViT
image encoder and a BERT text encoder that cross-attends to the image), exactly transformers'
`BlipVisionModel` and `BlipTextModel`, plus a linear MLP head on the [CLS] state with the LAION
aesthetic head's shape (`aesthetic.MLPHead`). This file renames the checkpoint's keys onto those
modules and reproduces the package's scoring:

    reward = (mlp(text_encoder(prompt | vit(image))[:, 0]) - 0.16717362830052426) / 1.0333394966054072

Layout of `reward.model_paths.imagereward` (files of the THUDM/ImageReward hub repo plus the
bert-base-uncased tokenizer, which the package fetches at run time):

    imagereward/
      ImageReward.pt        the state dict: blip.visual_encoder.*, blip.text_encoder.*, mlp.layers.*
      med_config.json       BERT config of the text encoder
      vocab.txt, tokenizer_config.json   bert-base-uncased tokenizer

The ViT's size is read from the checkpoint's shapes (64-dim heads, as every BLIP ViT); the image
is resized with PIL bicubic so its short edge is the ViT's image size (224), center-cropped and
CLIP-normalised; the prompt is padded/truncated to 35 tokens.
"""

from __future__ import annotations

import json
import re

import numpy as np
import torch
from PIL import Image

from titan_flow.rewards.aesthetic import MLPHead
from titan_flow.rewards.registry import Reward, model_path_of, register_reward, to_pil

CHECKPOINT = "ImageReward.pt"
MED_CONFIG = "med_config.json"
SCORE_MEAN = 0.16717362830052426
SCORE_STD = 1.0333394966054072
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HEAD_DIM = 64
MAX_TEXT_TOKENS = 35
# Parts of the checkpoint the score does not use (BLIP's contrastive projections, a buffer).
UNUSED = ("blip.vision_proj.", "blip.text_proj.", "blip.text_encoder.embeddings.position_ids")


_VIT_RENAMES = [
    (r"^cls_token$", "embeddings.class_embedding"),
    (r"^pos_embed$", "embeddings.position_embedding"),
    (r"^patch_embed\.proj\.", "embeddings.patch_embedding."),
    (r"^blocks\.(\d+)\.norm1\.", r"encoder.layers.\1.layer_norm1."),
    (r"^blocks\.(\d+)\.norm2\.", r"encoder.layers.\1.layer_norm2."),
    (r"^blocks\.(\d+)\.attn\.qkv\.", r"encoder.layers.\1.self_attn.qkv."),
    (r"^blocks\.(\d+)\.attn\.proj\.", r"encoder.layers.\1.self_attn.projection."),
    (r"^blocks\.(\d+)\.mlp\.", r"encoder.layers.\1.mlp."),
    (r"^norm\.", "post_layernorm."),
]


def split_checkpoint(state: dict[str, torch.Tensor]) -> tuple[dict, dict, dict]:
    """ImageReward.pt keys -> (BlipVisionModel, BlipTextModel, MLPHead) state dicts; unknown keys are an error."""
    vision, text, head, unknown = {}, {}, {}, []
    for key, value in state.items():
        if key.startswith(UNUSED):
            continue
        if key.startswith("blip.visual_encoder."):
            name = key[len("blip.visual_encoder.") :]
            for pattern, repl in _VIT_RENAMES:
                new = re.sub(pattern, repl, name)
                if new != name:
                    vision[new] = value
                    break
            else:
                unknown.append(key)
        elif key.startswith("blip.text_encoder."):
            text[key[len("blip.text_encoder.") :]] = value
        elif key.startswith("mlp."):
            head[key[len("mlp.") :]] = value
        else:
            unknown.append(key)
    if unknown:
        raise KeyError(f"{CHECKPOINT} has keys this ImageReward loader does not know: {unknown[:8]}")
    return vision, text, head


def configs_from_checkpoint(vision_sd: dict, med_config: dict):
    from transformers import BlipTextConfig, BlipVisionConfig

    hidden = vision_sd["embeddings.class_embedding"].shape[-1]
    patch = vision_sd["embeddings.patch_embedding.weight"].shape[-1]
    grid = int(round((vision_sd["embeddings.position_embedding"].shape[1] - 1) ** 0.5))
    depth = len({k.split(".")[2] for k in vision_sd if k.startswith("encoder.layers.")})
    vision_cfg = BlipVisionConfig(
        hidden_size=hidden,
        intermediate_size=vision_sd["encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=depth,
        num_attention_heads=max(1, hidden // HEAD_DIM),
        image_size=grid * patch,
        patch_size=patch,
        layer_norm_eps=1e-6,
        hidden_act="gelu",
    )
    text_cfg = BlipTextConfig(
        vocab_size=med_config["vocab_size"],
        hidden_size=med_config["hidden_size"],
        intermediate_size=med_config["intermediate_size"],
        num_hidden_layers=med_config["num_hidden_layers"],
        num_attention_heads=med_config["num_attention_heads"],
        max_position_embeddings=med_config["max_position_embeddings"],
        layer_norm_eps=med_config.get("layer_norm_eps", 1e-12),
        hidden_act=med_config.get("hidden_act", "gelu"),
        pad_token_id=med_config.get("pad_token_id", 0),
        encoder_hidden_size=hidden,  # BLIP overrides med_config's encoder_width with the ViT width
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return vision_cfg, text_cfg


def preprocess(images: list[Image.Image], size: int) -> torch.Tensor:
    """The package's transform: Resize(size, bicubic) on the short edge, CenterCrop(size), ToTensor, CLIP Normalize."""
    out = []
    for im in images:
        w, h = im.size
        short, long = min(w, h), max(w, h)
        new_long = int(size * long / short)
        new_w, new_h = (size, new_long) if w <= h else (new_long, size)
        im = im.convert("RGB").resize((new_w, new_h), Image.BICUBIC)
        top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
        im = im.crop((left, top, left + size, top + size))
        out.append(torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1))
    x = torch.stack(out)
    return (x - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)


@register_reward
class ImageReward(Reward):
    name = "imagereward"
    needs_model = True

    def __init__(self, model_path, device, batch_size: int = 32):
        from transformers import BertTokenizer, BlipVisionModel
        from transformers.models.blip.modeling_blip_text import BlipTextModel

        path = model_path_of(self.name, model_path, must_contain=(CHECKPOINT, MED_CONFIG, "vocab.txt"))
        self.device = torch.device(device)
        self.batch_size = batch_size
        vision_sd, text_sd, head_sd = split_checkpoint(torch.load(path / CHECKPOINT, map_location="cpu", weights_only=True))
        vision_cfg, text_cfg = configs_from_checkpoint(vision_sd, json.loads((path / MED_CONFIG).read_text()))
        self.image_size = vision_cfg.image_size

        self.vision = BlipVisionModel(vision_cfg)
        self.vision.load_state_dict(vision_sd)
        self.text = BlipTextModel(text_cfg, add_pooling_layer=False)
        self.text.load_state_dict(text_sd)
        self.head = MLPHead(text_cfg.hidden_size)
        self.head.load_state_dict(head_sd)
        for m in (self.vision, self.text, self.head):
            m.eval().requires_grad_(False).to(self.device)

        # BLIP's tokenizer: bert-base-uncased plus its two special tokens (the checkpoint's vocab has them).
        self.tokenizer = BertTokenizer.from_pretrained(str(path))
        self.tokenizer.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})

    @torch.no_grad()
    def __call__(self, images, prompts, metadata, ref_images=None, only_strict=True):
        scores = []
        pil = to_pil(images)
        for start in range(0, len(pil), self.batch_size):
            sl = slice(start, start + self.batch_size)
            text = self.tokenizer(
                prompts[sl], padding="max_length", truncation=True, max_length=MAX_TEXT_TOKENS, return_tensors="pt"
            )
            pixels = preprocess(pil[sl], self.image_size).to(self.device)
            image_embeds = self.vision(pixel_values=pixels).last_hidden_state
            hidden = self.text(
                input_ids=text["input_ids"].to(self.device),
                attention_mask=text["attention_mask"].to(self.device),
                encoder_hidden_states=image_embeds,
                encoder_attention_mask=torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=self.device),
                is_decoder=False,
            ).last_hidden_state
            scores.append((self.head(hidden[:, 0].float()) - SCORE_MEAN) / SCORE_STD)
        return {"score": torch.cat(scores).float().cpu()}
