"""A built-in counting-edit set for the debug jobs of edit models: `data.path = "builtin:counting_edit"`.

Its records have the reference's counting_edit layout (dataset/counting_edit: an edit instruction,
GenEval counting metadata with one include and one exclude item, a source image), so they go through
the same loader, group keys and rewards as the real set; only the source images are not files but
drawn when an item is read (in the loader's workers): `source count` discs of one colour on a plain
background, 96 x 80 pixels (not square, and not the model's resolution, so resizing is exercised),
the same for every run.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw

from titan_flow.data.prompts import PromptDataset, Record

DEBUG_EDIT_PATH = "builtin:counting_edit"
CLASSES = ("apple", "orange", "donut", "clock")
NUMBERS = ("zero", "one", "two", "three", "four")
COLOURS = {"apple": (200, 30, 30), "orange": (240, 150, 20), "donut": (150, 90, 40), "clock": (230, 230, 230)}
SIZES = {"train": 32, "test": 8}
WIDTH, HEIGHT = 96, 80


def debug_edit_rows(split: str) -> list[dict]:
    """The split's records: source count 1-4 of a class, an edit to another count 1-4."""
    if split not in SIZES:
        raise ValueError(f"data.path = {DEBUG_EDIT_PATH!r} has the splits {sorted(SIZES)}, not {split!r}")
    rng = np.random.default_rng(list(SIZES).index(split))
    rows = []
    for i in range(SIZES[split]):
        name = CLASSES[i % len(CLASSES)]
        source = int(rng.integers(1, 5))
        target = int(rng.choice([c for c in range(1, 5) if c != source]))
        rows.append({
            "tag": "counting",
            "include": [{"class": name, "count": target}],
            "exclude": [{"class": name, "count": target + 1}],
            "t2i_prompt": f"a photo of {NUMBERS[source]} {name}s",
            "prompt": f"Change the number of {name} in the image to {NUMBERS[target]}.",
            "image": f"generated_images/{split}_{i}.png",
            "source_count": source,
        })
    return rows


def draw_source(row: dict, seed: int) -> torch.Tensor:
    """`source_count` discs of the class's colour at seeded places, float (3, HEIGHT, WIDTH) in [0, 1]."""
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (WIDTH, HEIGHT), tuple(int(c) for c in rng.integers(20, 90, 3)))
    draw = ImageDraw.Draw(image)
    colour = COLOURS[row["include"][0]["class"]]
    for _ in range(row["source_count"]):
        x, y, r = int(rng.integers(12, WIDTH - 12)), int(rng.integers(12, HEIGHT - 12)), int(rng.integers(6, 12))
        draw.ellipse((x - r, y - r, x + r, y + r), fill=colour)
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255


class DebugEditDataset(PromptDataset):
    """The built-in counting-edit split as `Record`s; images are drawn in `__getitem__`."""

    def __init__(self, split: str):
        self.rows = debug_edit_rows(split)
        self.split = split
        prompts = [r["prompt"] for r in self.rows]
        keys = [f"{r['prompt']}_{r['image']}" for r in self.rows]  # the reference's edit group key
        super().__init__(prompts, self.rows, source=f"{DEBUG_EDIT_PATH}/{split}", keys=keys)

    @property
    def has_images(self) -> bool:
        return True

    def __getitem__(self, i: int) -> Record:
        seed = 1000 * list(SIZES).index(self.split) + i
        return Record(self.prompts[i], self.metadata[i], draw_source(self.rows[i], seed), self.keys[i])
