"""Prompt datasets: one prompt per line (`{split}.txt`), or jsonl records (`{split}_metadata.jsonl`).

Items are `Record`s: the prompt, its metadata (the whole jsonl record, which the GenEval reward
server scores against, or {} for text prompts), the record's image when the dataset has one (the
source image of an edit, or a training target), and its group key. The datasets of the reference
repository (flow_grpo/dataset/<name>/, counting_edit with its generated_images/ folder) load as they
are: point `data.path` at the folder.

Images: a jsonl record whose `image_key` field (default "image") holds a path, relative to the
dataset folder, has that image loaded when the item is read (in the data loader's workers during
training), as a float (3, H, W) tensor in [0, 1] at the file's own size; the family's pipeline
resizes it the way the model expects.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image

FORMATS = ("auto", "text", "geneval")

# The embedded default job's prompts: short, varied, no download needed.
DEBUG_PROMPTS = [
    "a red cube on a table", "a photo of a cat", "a blue car in the snow", "two apples and a banana",
    "a lighthouse at sunset", "a bowl of soup", "a green bird on a branch", "a city street at night",
    "a wooden chair", "a mountain lake", "a sign that says \"hello\"", "a yellow umbrella in the rain",
    "a plate of pasta", "a black dog running", "an old clock tower", "a field of sunflowers",
]


class Record(NamedTuple):
    prompt: str
    metadata: dict
    image: torch.Tensor | None  # float (3, H, W) in [0, 1], or None for text-only data
    key: str  # what makes a group: the prompt, or prompt and image (one instruction edits many images)


def load_image(path: Path) -> torch.Tensor:
    """RGB float (3, H, W) in [0, 1] at the file's own size."""
    with Image.open(path) as im:
        array = np.asarray(im.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 255


class PromptDataset(torch.utils.data.Dataset):
    def __init__(self, prompts: list[str], metadata: list[dict] | None = None, source: str = "built-in",
                 image_paths: list[Path] | None = None, keys: list[str] | None = None):
        if not prompts:
            raise ValueError(f"{source}: no prompts found")
        self.prompts = prompts
        self.metadata = metadata if metadata is not None else [{} for _ in prompts]
        self.source = source
        self.image_paths = image_paths
        self.keys = keys if keys is not None else prompts

    @property
    def has_images(self) -> bool:
        return self.image_paths is not None

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, i: int) -> Record:
        image = load_image(self.image_paths[i]) if self.image_paths is not None else None
        return Record(self.prompts[i], self.metadata[i], image, self.keys[i])


def read_text_prompts(path: Path) -> PromptDataset:
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return PromptDataset(prompts, source=str(path))


def read_geneval_prompts(path: Path, image_key: str = "image") -> PromptDataset:
    """jsonl records with a "prompt"; with `image_key` set, records that name an image get it loaded."""
    prompts, metadata, image_paths, keys = [], [], [], []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not valid JSON: {e}") from None
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            raise ValueError(f'{path}:{n}: each line must be a JSON object with a string "prompt" field')
        prompts.append(record["prompt"])
        metadata.append(record)
        if image_key and image_key in record:
            if not isinstance(record[image_key], str):
                raise ValueError(f'{path}:{n}: the "{image_key}" field must be an image path, got {record[image_key]!r}')
            image = path.parent / record[image_key]
            if not image.is_file():
                raise FileNotFoundError(
                    f'{path}:{n}: image {image} (field "{image_key}") does not exist; the reference\'s edit sets ship '
                    "their images separately (e.g. counting_edit's generated_images/): unpack them beside the jsonl"
                )
            image_paths.append(image)
            keys.append(f"{record['prompt']}_{record[image_key]}")  # the reference's edit group key
    if image_paths and len(image_paths) != len(prompts):
        raise ValueError(
            f'{path}: {len(image_paths)} of {len(prompts)} records have an "{image_key}" field; give every record '
            "one, or none (set data.image_key = '' to ignore them)"
        )
    return PromptDataset(prompts, metadata, source=str(path), image_paths=image_paths or None, keys=keys or None)


def load_prompt_dataset(path: str, split: str, fmt: str = "auto", image_key: str = "image") -> PromptDataset:
    """`path` = folder holding `{split}.txt` or `{split}_metadata.jsonl`; empty = the built-in debug prompts."""
    if fmt not in FORMATS:
        raise ValueError(f"data.format: {fmt!r} is not one of {FORMATS}")
    if not path:
        return PromptDataset(list(DEBUG_PROMPTS))
    if path == "builtin:counting_edit":  # the debug jobs of edit models: drawn source images, no files
        from titan_flow.data.debug_edit import DebugEditDataset

        return DebugEditDataset(split)
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"data.path: {folder} is not a directory")
    candidates = {"text": folder / f"{split}.txt", "geneval": folder / f"{split}_metadata.jsonl"}
    if fmt == "auto":
        found = [f for f, p in candidates.items() if p.is_file()]
        if not found:
            raise FileNotFoundError(
                f"data.path: {folder} has neither {split}.txt nor {split}_metadata.jsonl (split {split!r})"
            )
        fmt = found[-1]  # a folder with both is a GenEval set; its jsonl carries the metadata
    file = candidates[fmt]
    if not file.is_file():
        raise FileNotFoundError(f"data.path: {file} does not exist (data.format = {fmt!r}, split {split!r})")
    return read_text_prompts(file) if fmt == "text" else read_geneval_prompts(file, image_key)
