"""GenEval on the reference's reward server (yifan123/reward-server `app_geneval.py`, default :18085).

The RL reward is the server's partial-credit `scores` (per `include` item: 1 - |c - n| / c for the
count, then colour/position terms; it can be negative when n > 2c). Extras, per image:
`strict_accuracy` (exact counts) and `{tag}_strict_accuracy`, and with `only_strict=False`
(evaluation) also `accuracy` and `{tag}_accuracy` (standard GenEval). Tag columns hold -10 for the
images of other tags (`multi.masked_mean` skips them; `multi.geneval_breakdown` gives the per-task
table). In training the server skips the non-strict check and answers zeros for it, so those keys
are dropped rather than logged as a false 0% accuracy.
"""

from __future__ import annotations

from titan_flow.rewards import protocol
from titan_flow.rewards.registry import Reward, register_reward, scores_tensor, to_uint8
from titan_flow.rewards.remote import RetryPolicy, post_pickle


@register_reward
class GenEval(Reward):
    name = "geneval"
    remote = True

    def __init__(self, url: str = "http://127.0.0.1:18085", policy: RetryPolicy = RetryPolicy(),
                 chunk_size: int = protocol.CHUNK_SIZE):
        self.url, self.policy, self.chunk_size = url, policy, chunk_size

    def __call__(self, images, prompts, metadata, ref_images=None, only_strict=True):
        n = len(prompts)
        blobs = protocol.encode_images(to_uint8(images), "JPEG")
        columns: dict[str, list] = {"score": [], "strict_accuracy": []}
        if not only_strict:
            columns["accuracy"] = []
        for sl in protocol.chunk_slices(n, self.chunk_size):
            answer = post_pickle(
                self.url, {"images": blobs[sl], "meta_datas": list(metadata[sl]), "only_strict": only_strict},
                self.policy,
                required=("scores", "rewards", "strict_rewards", "group_rewards", "group_strict_rewards"),
            )
            columns["score"] += answer["scores"]
            columns["strict_accuracy"] += answer["strict_rewards"]
            groups = {f"{tag}_strict_accuracy": v for tag, v in answer["group_strict_rewards"].items()}
            if not only_strict:
                columns["accuracy"] += answer["rewards"]
                groups.update({f"{tag}_accuracy": v for tag, v in answer["group_rewards"].items()})
            for key, values in groups.items():
                columns.setdefault(key, []).extend(values)
        return {key: scores_tensor(values, f"geneval/{key}", n) for key, values in columns.items()}
