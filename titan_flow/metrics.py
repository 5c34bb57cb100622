"""TensorBoard scalars and image grids, plus a one-line console summary; rank 0 writes, others no-op."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from titan_flow.rewards.registry import to_uint8

logger = logging.getLogger("titan_flow")


def setup_logging(rank: int) -> None:
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"[rank{rank}] %(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
    )


def image_grid(images: torch.Tensor, captions: list[str], cols: int = 4, caption_height: int = 28,
               min_side: int = 128) -> np.ndarray:
    """float NCHW [0,1] -> uint8 HWC grid with each image's prompt written under it. Images narrower than
    `min_side` are enlarged by a whole factor (nearest pixel), so small ones stay sharp and captions fit."""
    factor = max(1, -(-min_side // images.shape[-1]))
    if factor > 1:
        images = images.repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1)
    n, _, h, w = images.shape
    cols = min(cols, n)
    rows = math.ceil(n / cols)
    gap = 4  # white between neighbours, so dark images do not run into each other
    canvas = Image.new("RGB", (cols * (w + gap) - gap, rows * (h + caption_height)), "white")
    draw = ImageDraw.Draw(canvas)
    arr = to_uint8(images)
    chars_per_line = max(4, w // 6)
    for i in range(n):
        r, c = divmod(i, cols)
        x0, y0 = c * (w + gap), r * (h + caption_height)
        canvas.paste(Image.fromarray(arr[i]), (x0, y0))
        text = captions[i]
        lines = [text[k : k + chars_per_line] for k in range(0, min(len(text), 2 * chars_per_line), chars_per_line)]
        draw.text((x0 + 2, y0 + h + 2), "\n".join(lines), fill="black")
    return np.asarray(canvas)


class MetricsLogger:
    def __init__(self, run_dir: Path, enable_tensorboard: bool, is_main: bool):
        self.is_main = is_main
        self.writer = None
        self.jsonl = None
        if not is_main:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        if enable_tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(run_dir / "tb"))
        # A plain-text copy of every scalar: easy to grep, and what the tests read back.
        self.jsonl = (run_dir / "metrics.jsonl").open("a")

    def log_scalars(self, scalars: dict[str, float], step: int) -> None:
        if not self.is_main:
            return
        clean = {k: float(v) for k, v in scalars.items()}
        if self.writer is not None:
            for k, v in clean.items():
                self.writer.add_scalar(k, v, step)
        self.jsonl.write(json.dumps({"step": step, "time": time.time(), **clean}) + "\n")
        self.jsonl.flush()

    def log_images(self, tag: str, images: torch.Tensor, captions: list[str], step: int) -> None:
        if not self.is_main or self.writer is None:
            return
        self.writer.add_image(tag, image_grid(images, captions), step, dataformats="HWC")
        self.writer.add_text(f"{tag}/prompts", "\n\n".join(f"{i}: {c}" for i, c in enumerate(captions)), step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.jsonl is not None:
            self.jsonl.close()
