"""UnifiedReward-7b-v1.5 through an OpenAI-compatible chat server (sglang, default :17140).

Server, as the reference runs it:

    python -m sglang.launch_server --model-path CodeGoat24/UnifiedReward-7b-v1.5 --api-key flowgrpo \
        --port 17140 --chat-template chatml-llava --enable-p2p-check --mem-fraction-static 0.85

One chat request per image (all in flight at once, up to `max_concurrency`), temperature 0: the
image resized to 512x512 as a base64 PNG data URL, then the rating question with the prompt as the
caption. The reward is the first `Final Score: X` (X in 1..5) divided by 5, 0 when the answer has
none. `url` is the API base (".../v1"); requests go to <url>/chat/completions.
"""

from __future__ import annotations

import base64
import io
import json
import re
from concurrent.futures import ThreadPoolExecutor

import torch
from PIL import Image

from titan_flow.rewards.registry import Reward, register_reward, to_pil
from titan_flow.rewards.remote import RetryPolicy, RewardServerError, post

QUESTION = (
    "<image>\nYou are given a text caption and a generated image based on that caption. Your task is to evaluate "
    "this image based on two key criteria:\n1. Alignment with the Caption: Assess how well this image aligns with "
    "the provided caption. Consider the accuracy of depicted objects, their relationships, and attributes as "
    "described in the caption.\n2. Overall Image Quality: Examine the visual quality of this image, including "
    "clarity, detail preservation, color accuracy, and overall aesthetic appeal.\nBased on the above criteria, "
    "assign a score from 1 to 5 after 'Final Score:'.\nYour task is provided as follows:\nText Caption: [{prompt}]"
)
_FINAL_SCORE = re.compile(r"Final Score:\s*([1-5](?:\.\d+)?)")


def parse_final_score(text: str) -> float:
    match = _FINAL_SCORE.search(text)
    return float(match.group(1)) if match else 0.0


def png_data_url(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image;base64," + base64.b64encode(buf.getvalue()).decode("utf-8")


@register_reward
class UnifiedReward(Reward):
    name = "unifiedreward"
    remote = True

    def __init__(self, url: str = "http://127.0.0.1:17140/v1", policy: RetryPolicy = RetryPolicy(),
                 api_key: str = "flowgrpo", model: str = "UnifiedReward-7b-v1.5", max_concurrency: int = 64):
        self.endpoint = url.rstrip("/") + "/chat/completions"
        self.policy, self.api_key, self.model, self.max_concurrency = policy, api_key, model, max_concurrency

    def ask(self, image: Image.Image, prompt: str) -> str:
        request = {
            "model": self.model,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": png_data_url(image)}},
                        {"type": "text", "text": QUESTION.format(prompt=prompt)},
                    ],
                }
            ],
            "temperature": 0,
        }
        body = post(
            self.endpoint, json.dumps(request).encode("utf-8"), self.policy, content_type="application/json",
            headers={"Authorization": f"Bearer {self.api_key}"},
        )
        try:
            return json.loads(body)["choices"][0]["message"]["content"] or ""
        except (ValueError, KeyError, IndexError, TypeError):
            raise RewardServerError(f"{self.endpoint} answered something that is not a chat completion: {body[:500]!r}") from None

    def __call__(self, images, prompts, metadata, ref_images=None, only_strict=True):
        pil = [im.resize((512, 512)) for im in to_pil(images)]
        with ThreadPoolExecutor(max_workers=max(1, min(self.max_concurrency, len(pil)))) as pool:
            answers = list(pool.map(self.ask, pil, prompts))
        return {"score": torch.tensor([parse_final_score(a) / 5 for a in answers], dtype=torch.float32)}
