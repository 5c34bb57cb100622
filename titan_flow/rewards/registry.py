"""Rewards by name, the one call signature they share, and the image conversions they all use.

Every reward is a class registered under its config name (the keys of `reward.fns`). It is built
as `cls(model_path, device, **options)` and called as

    out = reward(images, prompts, metadata, ref_images=None, only_strict=True)

with `images` a float tensor in [0, 1] (any device): images (B, 3, H, W) or videos (B, F, 3, H, W);
one prompt and one metadata dict per image or video, `ref_images` the input images of edit tasks
(tensor or list of PIL images) and `only_strict=False` during evaluation (GenEval then also
computes its slower non-strict accuracy). `out["score"]` is the (B,) float32 CPU tensor of
rewards; any other key is an extra per-sample metric the reward emits (GenEval's accuracies) and is
logged under that key.

Videos: a reward with `takes_video = True` (video_ocr, a reward served remotely) gets the videos as
they are. Every other reward is an image reward and, called through `call_reward`, scores every frame
as an image; a video's score (and each extra) is the mean over its frames.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

# name -> module that defines it; the module is imported only when the reward is used, so a config
# with `jpeg_compressibility` never imports transformers.
_MODULES = {
    "jpeg_compressibility": "jpeg",
    "jpeg_incompressibility": "jpeg",
    "pickscore": "pickscore",
    "clipscore": "clipscore",
    "image_similarity": "image_similarity",
    "aesthetic": "aesthetic",
    "imagereward": "imagereward",
    "ocr": "ocr",
    "video_ocr": "ocr",
    "qwenvl": "qwenvl",
    "geneval": "geneval",
    "shapes_geneval": "shapes_geneval",
    "deqa": "deqa",
    "unifiedreward": "unifiedreward",
}
_REGISTRY: dict[str, type] = {}


class Reward:
    """Base of every reward. Subclasses set `name`, and `needs_model` when they load weights."""

    name: str = ""
    needs_model: bool = False
    # Remote rewards (GenEval, DeQA, UnifiedReward) take `url` and the client's retry settings.
    remote: bool = False
    # True: __call__ takes videos (B, F, 3, H, W) itself; False: `score` scores their frames as images.
    takes_video: bool = False

    def __call__(self, images, prompts, metadata, ref_images=None, only_strict=True) -> dict[str, torch.Tensor]:
        raise NotImplementedError


def call_reward(reward: Reward, images: torch.Tensor, prompts, metadata, ref_images=None, only_strict=True):
    """Call `reward`, scoring the frames of videos as images (mean per video) when it takes images only."""
    if images.ndim != 5 or reward.takes_video:
        return reward(images, prompts, metadata, ref_images, only_strict)
    n, frames = images.shape[:2]

    def per_frame(items):
        return [item for item in items for _ in range(frames)]

    if isinstance(ref_images, torch.Tensor):
        ref_images = ref_images.repeat_interleave(frames, dim=0)
    elif ref_images is not None:
        ref_images = per_frame(ref_images)
    out = reward(images.flatten(0, 1), per_frame(prompts), per_frame(metadata), ref_images, only_strict)
    name = getattr(reward, "name", type(reward).__name__)
    return {key: scores_tensor(v, f"{name}/{key}", n * frames).view(n, frames).mean(1) for key, v in out.items()}


def register_reward(cls: type) -> type:
    if not cls.name:
        raise ValueError(f"{cls.__qualname__} has no `name`; set the config name it is registered under")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"reward {cls.name!r} is registered twice ({_REGISTRY[cls.name].__qualname__}, {cls.__qualname__})")
    _REGISTRY[cls.name] = cls
    return cls


def reward_names() -> list[str]:
    return sorted(set(_MODULES) | set(_REGISTRY))


def get_reward_class(name: str) -> type:
    if name not in _REGISTRY and name in _MODULES:
        importlib.import_module(f"titan_flow.rewards.{_MODULES[name]}")
    if name not in _REGISTRY:
        raise KeyError(f"reward.fns: unknown reward {name!r}; registered rewards: {', '.join(reward_names())}")
    return _REGISTRY[name]


def build_reward(name: str, model_path: str | None = None, device: str | torch.device = "cpu", **options) -> Reward:
    """One reward, loaded. Rewards without weights ignore `model_path` and `device`."""
    cls = get_reward_class(name)
    if cls.needs_model:
        return cls(model_path_of(name, model_path), device, **options)
    return cls(**options)


def model_path_of(name: str, path: str | None, must_contain: tuple[str, ...] = ()) -> Path:
    """The local directory/file of reward `name`, checked to exist (nothing is ever downloaded)."""
    if not path:
        raise FileNotFoundError(
            f"reward {name!r} needs local weights: set reward.model_paths.{name} to its directory "
            "(see the docstring of titan_flow/rewards/" + _MODULES.get(name, name) + ".py for the layout)"
        )
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"reward.model_paths.{name} = {str(path)!r} does not exist")
    missing = [f for f in must_contain if not (p / f).exists()]
    if missing:
        raise FileNotFoundError(
            f"reward.model_paths.{name} = {str(path)!r} lacks {', '.join(missing)} "
            f"(see titan_flow/rewards/{_MODULES.get(name, name)}.py for the expected layout)"
        )
    return p


# ---- image conversions (the reference's exact rounding: uint8 = round(255 x) clamped) ----


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """float in [0, 1] (any device) -> uint8 numpy, channels last: images (B, C, H, W) -> (B, H, W, C),
    videos (B, F, C, H, W) -> (B, F, H, W, C)."""
    if images.ndim not in (4, 5) or images.shape[-3] not in (1, 3):
        raise ValueError(
            f"rewards take float images of shape (B, 3, H, W) or videos (B, F, 3, H, W) in [0, 1]; "
            f"got shape {tuple(images.shape)}"
        )
    x = (images.detach().float() * 255).round().clamp(0, 255).to(torch.uint8)
    return x.movedim(-3, -1).cpu().numpy()


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    return [Image.fromarray(a.squeeze(-1) if a.shape[-1] == 1 else a) for a in to_uint8(images)]


def as_float_images(images: Any) -> list[torch.Tensor]:
    """Tensor (B, C, H, W) in [0, 1], or a list of PIL images / uint8 HWC arrays / float (C, H, W) tensors in
    [0, 1] (what the data loader hands over) -> list of float CHW.

    A list is returned because the reference images of edit tasks may differ in size.
    """
    if isinstance(images, torch.Tensor):
        return list(images.detach().float().cpu())
    out = []
    for im in images:
        if isinstance(im, torch.Tensor) and im.ndim == 3 and im.is_floating_point():
            out.append(im.detach().float().cpu())
            continue
        a = np.asarray(im.convert("RGB") if isinstance(im, Image.Image) else im)
        if a.dtype != np.uint8 or a.ndim != 3:
            raise ValueError(
                f"reference images must be PIL images, uint8 HWC arrays or float CHW tensors; got {a.dtype} {a.shape}"
            )
        out.append(torch.from_numpy(a.copy()).permute(2, 0, 1).float() / 255.0)
    return out


def scores_tensor(values, name: str, n: int) -> torch.Tensor:
    """A reward's per-image output as a (B,) float32 CPU tensor, checked for length."""
    t = torch.as_tensor(np.asarray(values, dtype=np.float64) if not isinstance(values, torch.Tensor) else values)
    t = t.detach().float().cpu().reshape(-1)
    if t.numel() != n:
        raise RuntimeError(f"reward {name!r} returned {t.numel()} scores for {n} images")
    return t
