"""OCR rewards: does the image (`ocr`) or the video (`video_ocr`) spell the text that the prompt puts
between double quotes?

Target g = the text between the first pair of double quotes; recognised text o = the recognised
lines (confidence > 0) concatenated; both lower-cased with spaces removed. d = 0 if g is a
substring of o, else Levenshtein(o, g); reward = 1 - min(d, |g|) / |g|, in [0, 1]. An image the OCR
engine fails on scores 0 (the reference's rule), with a warning.

`video_ocr` (flow_grpo's OcrScorer_video_or_image, the Wan recipe's reward): frames 0, 4, 8, ...
(option `frame_step`) are read, each scoring 1 - min(Levenshtein(o, g), |g|) / |g| (no substring
shortcut); the video's reward is the mean of its frames' rewards that are > 0, or 0 when none is,
so one legible frame scores as high as all of them. An image counts as a one-frame video.

Backends (option `backend`): "paddleocr" (the reference: PaddleOCR 2.x, lang en, no angle
classifier, CPU; fetches its models on first use), "rapidocr" (rapidocr_onnxruntime: the same
PP-OCR det/rec models exported to ONNX and shipped inside the wheel, so it runs offline), or
"auto" (paddleocr when installed, else rapidocr). No `reward.model_paths` entry is needed.
"""

from __future__ import annotations

import importlib.util
import logging

import numpy as np
import torch

from titan_flow.rewards.registry import Reward, register_reward, to_uint8

logger = logging.getLogger(__name__)
BACKENDS = ("auto", "paddleocr", "rapidocr")


def levenshtein(a: str, b: str) -> int:
    """Edit distance with unit insert/delete/substitute costs (python-Levenshtein's `distance`)."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def quoted_target(prompt: str) -> str:
    parts = prompt.split('"')
    if len(parts) < 3 or not parts[1].replace(" ", ""):
        raise ValueError(f'the ocr reward needs the text to render between double quotes in the prompt; got {prompt!r}')
    return parts[1]


def ocr_reward(recognized: str, target: str, substring_counts: bool = True) -> float:
    o = recognized.replace(" ", "").lower()
    g = target.replace(" ", "").lower()
    d = 0 if substring_counts and g in o else levenshtein(o, g)
    return 1.0 - min(d, len(g)) / len(g)


def video_ocr_reward(frame_rewards: list[float]) -> float:
    """flow_grpo's video score: the mean of the frames' rewards that are > 0, or 0 when none is."""
    positive = [r for r in frame_rewards if r > 0]
    return sum(positive) / len(positive) if positive else 0.0


class _PaddleBackend:
    def __init__(self):
        from paddleocr import PaddleOCR

        self.engine = PaddleOCR(use_angle_cls=False, lang="en", use_gpu=False, show_log=False)

    def __call__(self, image: np.ndarray) -> str:
        result = self.engine.ocr(image, cls=False)
        return "".join(text for _, (text, conf) in result[0] if conf > 0) if result and result[0] else ""


class _RapidBackend:
    def __init__(self):
        from rapidocr_onnxruntime import RapidOCR

        self.engine = RapidOCR()

    def __call__(self, image: np.ndarray) -> str:
        # numpy input is taken as BGR (OpenCV order); ours is RGB.
        result, _ = self.engine(np.ascontiguousarray(image[..., ::-1]), use_cls=False)
        return "".join(text for _, text, conf in result if float(conf) > 0) if result else ""


def make_backend(backend: str, reward: str = "ocr"):
    if backend not in BACKENDS:
        raise ValueError(f"reward.options.{reward}.backend: {backend!r} is not one of {', '.join(BACKENDS)}")
    if backend == "auto":
        backend = "paddleocr" if importlib.util.find_spec("paddleocr") else "rapidocr"
    module = {"paddleocr": "paddleocr", "rapidocr": "rapidocr_onnxruntime"}[backend]
    if importlib.util.find_spec(module) is None:
        raise ImportError(f"the ocr reward's {backend} backend needs `pip install {module}` (offline default: rapidocr_onnxruntime)")
    return _PaddleBackend() if backend == "paddleocr" else _RapidBackend()


@register_reward
class OCR(Reward):
    name = "ocr"

    def __init__(self, backend: str = "auto"):
        self.read = make_backend(backend, self.name)

    def read_score(self, image: np.ndarray, target: str, substring_counts: bool = True) -> float:
        """The OCR reward of one uint8 HWC image; an OCR failure scores 0, as in the reference."""
        try:
            text = self.read(image)
        except Exception as e:
            logger.warning("ocr failed on an image (scored 0): %s", e)
            return 0.0
        return ocr_reward(text, target, substring_counts)

    def __call__(self, images, prompts, metadata, ref_images=None, only_strict=True):
        targets = [quoted_target(p) for p in prompts]
        scores = [self.read_score(image, target) for image, target in zip(to_uint8(images), targets)]
        return {"score": torch.tensor(scores, dtype=torch.float32)}


@register_reward
class VideoOCR(OCR):
    name = "video_ocr"
    takes_video = True

    def __init__(self, backend: str = "auto", frame_step: int = 4):
        if not isinstance(frame_step, int) or frame_step < 1:
            raise ValueError(f"reward.options.video_ocr.frame_step must be an integer >= 1, got {frame_step!r}")
        super().__init__(backend)
        self.frame_step = frame_step

    def __call__(self, images, prompts, metadata, ref_images=None, only_strict=True):
        videos = to_uint8(images if images.ndim == 5 else images[:, None])  # (B, F, H, W, C)
        scores = []
        for video, prompt in zip(videos, prompts):
            target = quoted_target(prompt)
            frames = video[:: self.frame_step]
            scores.append(video_ocr_reward([self.read_score(f, target, substring_counts=False) for f in frames]))
        return {"score": torch.tensor(scores, dtype=torch.float32)}
