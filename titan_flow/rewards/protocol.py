"""The reward-server wire format (yifan123/reward-server), shared by our client and our server.

A request is `POST <url>` whose body is a pickled dict with "images": a list of encoded images
(JPEG bytes for GenEval/DeQA, whose servers only decode JPEG; lossless PNG for titan_flow's own
server, so a served score equals the local one) plus per-protocol fields; the answer is 200 with a
pickled dict, or 500 with the server's traceback as text.

    GenEval  request  {"images", "meta_datas": [metadata dict], "only_strict": bool}
             response {"scores", "rewards", "strict_rewards", "group_rewards": {tag: [..]},
                       "group_strict_rewards": {tag: [..]}}
    DeQA     request  {"images"}                         response {"outputs": [float]}
    titan_flow        {"images", "prompts", "meta_datas", "ref_images": [bytes] | None, "only_strict",
                       "num_frames": F (videos only)}
             response {"scores": [float], "extras": {key: [float]}}
    A batch of B videos of F frames sends its B * F frames in "images" (video by video, frames in
    order) with "num_frames": F; scores and extras stay one per video.

Unpickling only rebuilds plain data (dicts, lists, str, bytes, numbers and numpy scalars/arrays),
so a request or answer cannot run code on the receiving side.
"""

from __future__ import annotations

import io
import pickle

import numpy as np
import torch
from PIL import Image

CHUNK_SIZE = 64  # images per request, as the reference client

_ALLOWED_GLOBALS = {
    ("numpy", "dtype"),
    ("numpy", "ndarray"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
}


class _DataUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}: reward messages carry plain data only")


def dumps(obj) -> bytes:
    return pickle.dumps(obj)


def loads(data: bytes):
    return _DataUnpickler(io.BytesIO(data)).load()


def encode_images(images_uint8: np.ndarray, fmt: str) -> list[bytes]:
    """uint8 NHWC -> one encoded file per image. JPEG at PIL's default quality, as the reference client."""
    out = []
    for a in images_uint8:
        buf = io.BytesIO()
        Image.fromarray(a.squeeze(-1) if a.shape[-1] == 1 else a).save(buf, format=fmt)
        out.append(buf.getvalue())
    return out


def decode_images(blobs: list[bytes]) -> list[Image.Image]:
    return [Image.open(io.BytesIO(b)).convert("RGB") for b in blobs]


def pil_to_tensor(images: list[Image.Image]) -> torch.Tensor:
    """Same-size RGB images -> float NCHW in [0, 1] (exact inverse of round(255 x) for 8-bit images)."""
    sizes = {im.size for im in images}
    if len(sizes) != 1:
        raise ValueError(f"images of one request must share a size; got {sorted(sizes)}")
    a = np.stack([np.asarray(im, dtype=np.uint8) for im in images])
    return torch.from_numpy(a).permute(0, 3, 1, 2).float() / 255.0


def chunk_slices(n: int, size: int = CHUNK_SIZE) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]
