"""TensorBoard scalars, image grids and video grids, plus a one-line console summary; rank 0 writes, others no-op.

Videos (B, F, 3, H, W) are logged as TensorBoard video summaries: an animated GIF of the captioned
grid, frame by frame (what `SummaryWriter.add_video` writes, encoded here with PIL because
add_video needs moviepy < 2, which is not a dependency).
"""

from __future__ import annotations

import io
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
               min_side: int = 128, gap: int = 0) -> np.ndarray:
    """float NCHW [0,1] -> uint8 HWC grid with each image's prompt written under it. Images narrower than
    `min_side` are enlarged by a whole factor (nearest pixel), so small ones stay sharp and captions fit;
    `gap` white pixels separate neighbours (the PNG grids of sample/evaluate use 4, so dark images do not run
    into each other)."""
    factor = max(1, -(-min_side // images.shape[-1]))
    if factor > 1:
        images = images.repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1)
    n, _, h, w = images.shape
    cols = min(cols, n)
    rows = math.ceil(n / cols)
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


def video_grid(videos: torch.Tensor, captions: list[str], cols: int = 4) -> np.ndarray:
    """float (B, F, C, H, W) [0,1] -> uint8 (F, H', W', 3): frame t is the captioned grid of every video's frame t,
    at the videos' own size (every frame is encoded into the logged GIF)."""
    return np.stack([image_grid(videos[:, t], captions, cols, min_side=0) for t in range(videos.shape[1])])


def encode_gif(frames: np.ndarray, fps: float) -> bytes:
    """uint8 (F, H, W, 3) -> an animated GIF that loops, `fps` frames per second."""
    images = [Image.fromarray(f) for f in frames]
    buf = io.BytesIO()
    images[0].save(buf, format="GIF", save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0)
    return buf.getvalue()


VIDEO_FORMATS = ("auto", "mp4", "gif")


def write_video(path: Path, frames: np.ndarray, fps: float, video_format: str = "auto") -> Path:
    """Write uint8 (F, H, W, 3) frames as `path` with the suffix of the format used, and return that path.

    mp4 (MPEG-4 Part 2) through OpenCV's FFmpeg backend when opencv-python is installed (it comes with
    the `ocr` extra); "auto" falls back to an animated GIF written by PIL otherwise.
    """
    if video_format not in VIDEO_FORMATS:
        raise ValueError(f"video format {video_format!r} is not one of {VIDEO_FORMATS}")
    if video_format in ("auto", "mp4"):
        try:
            import cv2
        except ImportError:
            if video_format == "mp4":
                raise ImportError("writing .mp4 needs opencv-python (pip install opencv-python); or use gif") from None
        else:
            path = path.with_suffix(".mp4")
            height, width = frames.shape[1:3]
            writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
            if not writer.isOpened():
                raise RuntimeError(f"OpenCV could not open an mp4 writer for {path} (no FFmpeg backend?); use gif")
            for frame in frames:
                writer.write(np.ascontiguousarray(frame[..., ::-1]))  # OpenCV takes BGR
            writer.release()
            return path
    path = path.with_suffix(".gif")
    path.write_bytes(encode_gif(frames, fps))
    return path


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

    def log_images(self, tag: str, images: torch.Tensor, captions: list[str], step: int, fps: float = 8.0) -> None:
        """A captioned grid of images (B, 3, H, W), or a video summary of videos (B, F, 3, H, W) at `fps`."""
        if not self.is_main or self.writer is None:
            return
        if images.ndim == 5:
            from tensorboard.compat.proto.summary_pb2 import Summary

            frames = video_grid(images, captions)
            _, height, width, channels = frames.shape
            video = Summary.Image(height=height, width=width, colorspace=channels,
                                  encoded_image_string=encode_gif(frames, fps))
            self.writer._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=tag, image=video)]), step)
        else:
            self.writer.add_image(tag, image_grid(images, captions), step, dataformats="HWC")
        self.writer.add_text(f"{tag}/prompts", "\n\n".join(f"{i}: {c}" for i, c in enumerate(captions)), step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.jsonl is not None:
            self.jsonl.close()
