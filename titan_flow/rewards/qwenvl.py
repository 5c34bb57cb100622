"""QwenVL (experimental in the reference): Qwen2.5-VL rates aesthetics on a fixed 5-level rubric.

The model is asked for a <Thought> and then `<Score>X</Score>`; the reward is X / 5 for the first
`<Score>` holding an integer, 0 when the answer has none (decimals do not parse, as upstream).

Layout of `reward.model_paths.qwenvl`: the Qwen/Qwen2.5-VL-7B-Instruct directory (model, tokenizer
with its chat template, preprocessor_config.json). The prompt is built with the tokenizer's chat
template and each image placeholder is expanded to the image's merged patch count, which is what
Qwen2_5_VLProcessor does (used directly it needs torchvision for its video half). Options: `dtype`
(bfloat16 as the reference), `max_new_tokens` (2048), `batch_size`.
"""

from __future__ import annotations

import re

import torch

from titan_flow.rewards.registry import Reward, model_path_of, register_reward, to_pil

RUBRIC = """
Your role is to evaluate the aesthetic quality score of given images.
1. Bad: Extremely blurry, underexposed with significant noise, indiscernible
subjects, and chaotic composition.
2. Poor: Noticeable blur, poor lighting, washed-out colors, and awkward
composition with cut-off subjects.
3. Fair: In focus with adequate lighting, dull colors, decent composition but
lacks creativity.
4. Good: Sharp, good exposure, vibrant colors, thoughtful composition with
a clear focal point.
5. Excellent: Exceptional clarity, perfect exposure, rich colors, masterful
composition with emotional impact.

Please first provide a detailed analysis of the evaluation process, including the criteria for judging aesthetic quality, within the <Thought> tag. Then, give a final score from 1 to 5 within the <Score> tag.
<Thought>
[Analyze the evaluation process in detail here]
</Thought>
<Score>X</Score>
"""
IMAGE_PAD = "<|image_pad|>"
_SCORE = re.compile(r"<Score>(\d+)</Score>")


def parse_score(text: str) -> float:
    match = _SCORE.search(text)
    return float(match.group(1)) / 5 if match else 0.0


@register_reward
class QwenVL(Reward):
    name = "qwenvl"
    needs_model = True

    def __init__(self, model_path, device, dtype: str = "bfloat16", max_new_tokens: int = 2048, batch_size: int = 16):
        from transformers import AutoImageProcessor, AutoTokenizer, Qwen2_5_VLForConditionalGeneration

        path = model_path_of(self.name, model_path, must_contain=("config.json",))
        self.device = torch.device(device)
        self.model = (
            Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=getattr(torch, dtype))
            .eval()
            .requires_grad_(False)
            .to(self.device)
        )
        self.tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
        self.image_processor = AutoImageProcessor.from_pretrained(path)
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": RUBRIC}]}]
        self.prompt = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if self.prompt.count(IMAGE_PAD) != 1:
            raise ValueError(f"the chat template of {path} does not place one {IMAGE_PAD} for an image")

    def generate(self, images) -> list[str]:
        vision = self.image_processor(images=images, return_tensors="pt")
        merge = self.image_processor.merge_size**2
        texts = [self.prompt.replace(IMAGE_PAD, IMAGE_PAD * (int(thw.prod()) // merge)) for thw in vision["image_grid_thw"]]
        text = self.tokenizer(texts, padding=True, return_tensors="pt")
        out = self.model.generate(
            input_ids=text["input_ids"].to(self.device),
            attention_mask=text["attention_mask"].to(self.device),
            pixel_values=vision["pixel_values"].to(self.device, self.model.dtype),
            image_grid_thw=vision["image_grid_thw"].to(self.device),
            max_new_tokens=self.max_new_tokens,
        )
        return self.tokenizer.batch_decode(
            out[:, text["input_ids"].shape[1] :], skip_special_tokens=True, clean_up_tokenization_spaces=False
        )

    @torch.no_grad()
    def __call__(self, images, prompts, metadata, ref_images=None, only_strict=True):
        pil = to_pil(images)
        answers = [a for i in range(0, len(pil), self.batch_size) for a in self.generate(pil[i : i + self.batch_size])]
        return {"score": torch.tensor([parse_score(a) for a in answers], dtype=torch.float32)}
