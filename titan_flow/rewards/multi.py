"""MultiReward: the weighted sum of named rewards, scored locally, on reward servers, or both.

    reward_fn = MultiReward({"pickscore": 1.0, "ocr": 0.0}, model_paths, device, urls=..., ...)
    out = reward_fn(images, prompts, metadata)          # {name: (B,), extras..., "avg": (B,)}
                                                        # images (B, 3, H, W) or videos (B, F, 3, H, W)
    future = reward_fn.submit(images, prompts, metadata)  # same, on a worker thread
    ... next rollout ...
    out = future.result()

"avg" = sum_k w_k r_k (plain weighted sum, as the reference); weight-0 rewards are still scored
and returned so they can be logged. Each rank scores only the images it is given (nothing is
gathered here). Where each reward runs:
  * geneval, deqa, unifiedreward: always on their servers, at `urls[name]` (default: the
    reference's 127.0.0.1:18085 / :18086 / :17140/v1);
  * any other name listed in `urls`: on titan_flow's reward server at that URL (e.g.
    http://127.0.0.1:18090/pickscore), started with `python -m titan_flow.rewards.serve`;
  * the rest: in this process, on `device`, from `model_paths[name]`.
Server calls run concurrently with each other and with the local rewards. Videos go as they are to
the rewards that take them (and to titan_flow's server); image rewards score their frames
(registry.call_reward).
"""

from __future__ import annotations

import math
import threading
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from titan_flow.rewards.registry import build_reward, call_reward, get_reward_class, scores_tensor
from titan_flow.rewards.remote import RemoteReward, RetryPolicy

GENEVAL_TASKS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
NOT_THIS_TAG = -10.0


class MultiReward:
    def __init__(
        self,
        fns: dict[str, float],
        model_paths: dict[str, str] | None = None,
        device: str | torch.device = "cpu",
        *,
        urls: dict[str, str] | None = None,
        timeout_seconds: float = 120.0,
        max_retries: int = 30,
        retry_backoff_seconds: float = 1.0,
        options: dict[str, dict] | None = None,
    ):
        if not fns:
            raise ValueError("reward.fns is empty: name at least one reward, e.g. {jpeg_compressibility = 1.0}")
        model_paths, urls, options = model_paths or {}, urls or {}, options or {}
        for name, weight in fns.items():
            get_reward_class(name)  # unknown names fail here, listing the registered ones
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
                raise ValueError(f"reward.fns.{name}: weight must be a finite number, got {weight!r}")
        for section, table in (("model_paths", model_paths), ("urls", urls), ("options", options)):
            if not isinstance(table, dict):
                raise ValueError(f"reward.{section} must be a table name -> value, got {table!r}")
        for name, opts in options.items():
            if not isinstance(opts, dict):
                raise ValueError(f"reward.options.{name} must be a table of keyword arguments, got {opts!r}")
        policy = RetryPolicy(timeout_seconds, max_retries, retry_backoff_seconds)
        self.weights = {name: float(w) for name, w in fns.items()}
        self.rewards = {}
        for name in fns:
            cls, opts = get_reward_class(name), options.get(name, {})
            if cls.remote:  # without a URL the class's default (the reference's port) is used
                url = {"url": urls[name]} if urls.get(name) else {}
                self.rewards[name] = cls(policy=policy, **url, **opts)
            elif urls.get(name):
                # served by titan_flow's reward server; its options are given to the server
                self.rewards[name] = RemoteReward(name, urls[name], policy)
            else:
                self.rewards[name] = build_reward(name, model_paths.get(name), device, **opts)
        # One call at a time: models and fast tokenizers are not safe to share between threads.
        self._lock = threading.Lock()
        n_remote = sum(r.remote for r in self.rewards.values())
        self._io = ThreadPoolExecutor(max_workers=max(1, n_remote), thread_name_prefix="reward-io")
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reward")

    def __call__(self, images: torch.Tensor, prompts: list[str], metadata: list[dict] | None = None,
                 ref_images=None, only_strict: bool = True) -> dict[str, torch.Tensor]:
        n = len(images)
        metadata = [{} for _ in range(n)] if metadata is None else list(metadata)
        prompts = list(prompts)
        if len(prompts) != n or len(metadata) != n:
            raise ValueError(f"MultiReward got {n} images, {len(prompts)} prompts and {len(metadata)} metadata dicts")
        args = (images.detach(), prompts, metadata, ref_images, only_strict)
        with self._lock:
            pending = {name: self._io.submit(call_reward, r, *args) for name, r in self.rewards.items() if r.remote}
            outputs = {name: call_reward(r, *args) for name, r in self.rewards.items() if not r.remote}
            outputs.update({name: f.result() for name, f in pending.items()})

        result: dict[str, torch.Tensor] = {}
        avg = torch.zeros(n, dtype=torch.float64)
        for name, weight in self.weights.items():
            out = dict(outputs[name])
            score = scores_tensor(out.pop("score"), name, n)
            result[name] = score
            avg += weight * score.double()
            for key, values in out.items():
                if key in result or key in self.weights or key == "avg":
                    raise ValueError(f"reward {name!r} emits {key!r}, which another reward or 'avg' already uses")
                result[key] = scores_tensor(values, f"{name}/{key}", n)
        result["avg"] = avg.float()
        return result

    def submit(self, images: torch.Tensor, prompts: list[str], metadata: list[dict] | None = None,
               ref_images=None, only_strict: bool = True) -> Future:
        """Score on the reward thread (calls run one after another, in order) and return the Future."""
        return self._worker.submit(self, images.detach(), list(prompts), metadata, ref_images, only_strict)

    def close(self):
        self._worker.shutdown(wait=True)
        self._io.shutdown(wait=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def masked_mean(values: torch.Tensor) -> float:
    """Mean over the entries that are finite and not -10 (GenEval's "not this tag"); NaN if none."""
    v = torch.as_tensor(values, dtype=torch.float64).reshape(-1)
    keep = torch.isfinite(v) & (v != NOT_THIS_TAG)
    return v[keep].mean().item() if keep.any() else math.nan


def reward_means(rewards: dict[str, torch.Tensor]) -> dict[str, float]:
    """masked_mean of every key (the reference's eval_reward_{key} values)."""
    return {key: masked_mean(values) for key, values in rewards.items()}


def geneval_breakdown(rewards: dict[str, torch.Tensor]) -> dict[str, float]:
    """GenEval's per-task table from (gathered) reward outputs.

    For each task with images: `<task>` (standard accuracy, when it was computed, i.e.
    only_strict=False) and `<task>_strict`; `overall` / `overall_strict` are the mean over those
    tasks, which is GenEval's overall score. -10 entries (images of other tasks) are excluded.
    """
    table = {}
    for suffix, label in (("_accuracy", ""), ("_strict_accuracy", "_strict")):
        per_task = {}
        for task in GENEVAL_TASKS:
            if f"{task}{suffix}" in rewards:
                value = masked_mean(rewards[f"{task}{suffix}"])
                if not math.isnan(value):
                    per_task[f"{task}{label}"] = value
        table.update(per_task)
        if per_task:
            table[f"overall{label}"] = sum(per_task.values()) / len(per_task)
    return table
