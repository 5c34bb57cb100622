"""DeQA-Score on the reference's reward server (yifan123/reward-server `app_deqa.py`, default :18086).

The server runs zhiyuanyou/DeQA-Score-Mix3 and answers `{"outputs": [score / 5]}` for JPEG images;
that value is the reward.
"""

from __future__ import annotations

from titan_flow.rewards import protocol
from titan_flow.rewards.registry import Reward, register_reward, scores_tensor, to_uint8
from titan_flow.rewards.remote import RetryPolicy, post_pickle


@register_reward
class DeQA(Reward):
    name = "deqa"
    remote = True

    def __init__(self, url: str = "http://127.0.0.1:18086", policy: RetryPolicy = RetryPolicy(),
                 chunk_size: int = protocol.CHUNK_SIZE):
        self.url, self.policy, self.chunk_size = url, policy, chunk_size

    def __call__(self, images, prompts, metadata, ref_images=None, only_strict=True):
        blobs = protocol.encode_images(to_uint8(images), "JPEG")
        outputs = []
        for sl in protocol.chunk_slices(len(blobs), self.chunk_size):
            outputs += post_pickle(self.url, {"images": blobs[sl]}, self.policy, required=("outputs",))["outputs"]
        return {"score": scores_tensor(outputs, self.name, len(blobs))}
