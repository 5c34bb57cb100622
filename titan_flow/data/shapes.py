"""The "shapes" world: a compositional text-to-image task small enough to learn and to score on a CPU.

Flat coloured circles, squares and triangles of 7 pixels on a black 16 x 16 canvas (small enough for a
pixel-space model to learn on a CPU, large enough that the three shapes stay distinct), described by
prompts in
GenEval's six task families (its tags and metadata schema, so the GenEval prompt loader and the
per-task breakdown work unchanged):

    single_object  "a circle"                          include [{class: circle, count: 1}]
    two_object     "a circle and a square"             include [{circle, 1}, {square, 1}]
    counting       "three triangles"                   include [{triangle, 3}], exclude [{triangle, 4}]
    colors         "a red circle"                      include [{circle, 1, color: red}]
    color_attr     "a red circle and a blue square"    include [{circle, 1, red}, {square, 1, blue}]
    position       "a triangle left of a circle"       include [{circle, 1}, {triangle, 1, position: [left of, 0]}]

The world is finite (150 prompts), so it is enumerated (`all_prompts`) rather than sampled, and split
into training and held-out prompts by a fixed rule (`split_prompts`). A scene (`sample_scene`) draws
the colours the prompt leaves open and non-touching places at random, and satisfies the prompt
exactly: that is the training data (`render`), and what the scorer
(titan_flow/rewards/shapes_geneval.py) must score 100% on. The geometry both sides share (shape
masks, GenEval's relative-position rule) is defined once here.

    python -m titan_flow.data.shapes --out data/shapes --num-train 60000

writes `train_metadata.jsonl` (every record carries its picture as `"image": "images/<n>.png"`) and
the held-out eval set `test_metadata.jsonl` (prompts only, `eval_prompts`), which `data.path` reads.
"""

from __future__ import annotations

import argparse
import itertools
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

CANVAS = 16  # pixels per side
SHAPES = ("circle", "square", "triangle")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles"}
# Saturated, far apart in RGB (and from the black background), so colour segmentation is unambiguous.
COLORS = {"red": (230, 40, 40), "green": (40, 200, 60), "blue": (50, 90, 245), "yellow": (240, 220, 40)}
BACKGROUND = (0, 0, 0)
NUMBERS = {2: "two", 3: "three", 4: "four"}  # GenEval's counting range
RELATIONS = ("left of", "right of", "above", "below")
TASKS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")  # GenEval's tags
MIN_SIZE, MAX_SIZE = 7, 7  # side of an object's square bounding box, pixels (four fit on the canvas)
GAP = 1  # empty pixels between two objects' boxes, so objects never touch (also diagonally)
POSITION_THRESHOLD = 0.1  # GenEval's: offsets shrink by 0.1 x (sum of the two box sizes) first


# ------------------------------------------------------------------------------------- geometry


@lru_cache(maxsize=None)
def shape_mask(kind: str, width: int, height: int) -> np.ndarray:
    """Boolean (height, width) mask of `kind` filling a width x height box, tested at pixel centres.

    The triangle points up, apex on the top row's centre, base the bottom row; its half-width gets
    half a pixel of slack so the apex row is never empty (the mask then spans the whole box, which
    is what lets the scorer compare a detected blob with the ideal shape of its own bounding box).
    """
    if kind not in SHAPES:
        raise ValueError(f"unknown shape {kind!r}; the shapes world draws {', '.join(SHAPES)}")
    y, x = np.mgrid[0:height, 0:width] + 0.5
    if kind == "square":
        mask = np.ones((height, width), dtype=bool)
    elif kind == "circle":
        mask = ((x - width / 2) / (width / 2)) ** 2 + ((y - height / 2) / (height / 2)) ** 2 <= 1.0
    else:
        mask = np.abs(x - width / 2) <= (y / height) * (width / 2) + 0.5
    mask.setflags(write=False)
    return mask


def relative_position(box_a, box_b) -> set[str]:
    """GenEval's relations of box A to box B (x0, y0, x1, y1; y grows downwards): the centre offset,
    each axis shrunk by POSITION_THRESHOLD x the two boxes' summed extent, normalised by the raw offset;
    a relation holds when its component exceeds 0.5."""
    a, b = np.asarray(box_a, dtype=np.float64), np.asarray(box_b, dtype=np.float64)
    offset = (a[:2] + a[2:]) / 2 - (b[:2] + b[2:]) / 2
    dims = (a[2:] - a[:2]) + (b[2:] - b[:2])
    revised = np.maximum(np.abs(offset) - POSITION_THRESHOLD * dims, 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    relations = set()
    if dx < -0.5:
        relations.add("left of")
    if dx > 0.5:
        relations.add("right of")
    if dy < -0.5:
        relations.add("above")
    if dy > 0.5:
        relations.add("below")
    return relations


@dataclass(frozen=True)
class Shape:
    """One object of a scene: kind, colour name, top-left corner and side of its square box, in pixels."""

    kind: str
    color: str
    x: int
    y: int
    size: int

    @property
    def box(self) -> tuple[int, int, int, int]:
        return (self.x, self.y, self.x + self.size, self.y + self.size)


def render(shapes: list[Shape], canvas: int = CANVAS) -> np.ndarray:
    """uint8 (canvas, canvas, 3) picture of the scene: flat colours on black, hard edges."""
    image = np.zeros((canvas, canvas, 3), dtype=np.uint8)
    image[:] = BACKGROUND
    for s in shapes:
        if s.x < 0 or s.y < 0 or s.x + s.size > canvas or s.y + s.size > canvas:
            raise ValueError(f"{s} does not fit on a {canvas} x {canvas} canvas")
        region = image[s.y : s.y + s.size, s.x : s.x + s.size]
        region[shape_mask(s.kind, s.size, s.size)] = COLORS[s.color]
    return image


# ---------------------------------------------------------------------------------------- prompts


def _a(kind: str, color: str | None = None) -> str:
    return f"a {color} {kind}" if color else f"a {kind}"


def all_prompts(tasks: tuple[str, ...] = TASKS) -> list[dict]:
    """Every prompt of the world as a GenEval metadata record, in a fixed order (task by task)."""
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown shapes tasks {unknown}; the tasks are {', '.join(TASKS)}")
    out = []
    pairs = list(itertools.permutations(SHAPES, 2))
    for task in tasks:
        if task == "single_object":
            out += [{"tag": task, "include": [{"class": k, "count": 1}], "exclude": [{"class": k, "count": 2}],
                     "prompt": _a(k)} for k in SHAPES]
        elif task == "two_object":
            out += [{"tag": task, "include": [{"class": a, "count": 1}, {"class": b, "count": 1}],
                     "prompt": f"{_a(a)} and {_a(b)}"} for a, b in pairs]
        elif task == "counting":
            out += [{"tag": task, "include": [{"class": k, "count": n}], "exclude": [{"class": k, "count": n + 1}],
                     "prompt": f"{word} {PLURALS[k]}"} for k in SHAPES for n, word in NUMBERS.items()]
        elif task == "colors":
            out += [{"tag": task, "include": [{"class": k, "count": 1, "color": c}], "prompt": _a(k, c)}
                    for k in SHAPES for c in COLORS]
        elif task == "color_attr":
            out += [{"tag": task,
                     "include": [{"class": a, "count": 1, "color": ca}, {"class": b, "count": 1, "color": cb}],
                     "prompt": f"{_a(a, ca)} and {_a(b, cb)}"}
                    for a, b in pairs for ca in COLORS for cb in COLORS]
        elif task == "position":
            # GenEval's layout: the reference object first, the positioned one second, pointing back at it.
            out += [{"tag": task,
                     "include": [{"class": ref, "count": 1}, {"class": obj, "count": 1, "position": [rel, 0]}],
                     "prompt": f"{_a(obj)} {rel} {_a(ref)}"}
                    for ref, obj in pairs for rel in RELATIONS]
    return out


def split_prompts(test_fraction: float = 0.25, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(train, held_out): within each task a seeded shuffle puts round(fraction x n) prompts, at least
    one, in the held-out set. The same arguments give the same split on every machine."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    rng = np.random.default_rng(seed)
    train, test = [], []
    for task in TASKS:
        records = all_prompts((task,))
        order = rng.permutation(len(records))
        n_test = max(1, round(test_fraction * len(records)))
        test += [records[i] for i in sorted(order[:n_test])]
        train += [records[i] for i in sorted(order[n_test:])]
    return train, test


def vocabulary() -> list[str]:
    """Every word the world's prompts use, sorted (what the shapes text encoder can read)."""
    return sorted({word for record in all_prompts() for word in record["prompt"].split()})


# ----------------------------------------------------------------------------------------- scenes


def _items(meta: dict) -> list[tuple[str, str | None]]:
    """(kind, colour or None) of every object a record asks for, in include order."""
    return [(item["class"], item.get("color")) for item in meta["include"] for _ in range(item["count"])]


def _place(rng: np.random.Generator, sizes: list[int], canvas: int):
    """Top-left corners for boxes of `sizes`, each drawn uniformly among the places that keep GAP pixels
    from the boxes already placed, or None when one has no place left."""
    corners = []
    for size in sizes:
        free = [(x, y) for y in range(canvas - size + 1) for x in range(canvas - size + 1)
                if all(x >= cx + cs + GAP or cx >= x + size + GAP or y >= cy + cs + GAP or cy >= y + size + GAP
                       for (cx, cy), cs in zip(corners, sizes))]
        if not free:
            return None
        corners.append(free[rng.integers(len(free))])
    return corners


def sample_scene(meta: dict, rng: np.random.Generator, canvas: int = CANVAS, max_restarts: int = 1000) -> list[Shape]:
    """A random scene that satisfies `meta` exactly: the asked objects and no others, open colours drawn
    uniformly, sizes in [MIN_SIZE, MAX_SIZE], no two objects within GAP pixels, relations that hold."""
    items = _items(meta)
    relations = [(i, item["position"]) for i, item in enumerate(meta["include"]) if "position" in item]
    for _ in range(max_restarts):
        sizes = [int(s) for s in rng.integers(MIN_SIZE, MAX_SIZE + 1, size=len(items))]
        corners = _place(rng, sizes, canvas)
        if corners is None:
            continue
        colors = list(COLORS)
        shapes = [Shape(kind, color or colors[rng.integers(len(colors))], x, y, s)
                  for (kind, color), (x, y), s in zip(items, corners, sizes)]
        # position records have one object per include item, so include index = object index
        if all(rel in relative_position(shapes[i].box, shapes[target].box) for i, (rel, target) in relations):
            return shapes
    raise RuntimeError(f"could not place {meta['prompt']!r} on a {canvas} x {canvas} canvas")


# ------------------------------------------------------------------------------------ dataset files


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def _cycled_per_task(records: list[dict], per_task: int) -> list[dict]:
    """Each task's records cycled to `per_task`, tasks in TASKS order: every task weighs the same."""
    out = []
    for task in TASKS:
        mine = [r for r in records if r["tag"] == task]
        out += [mine[i % len(mine)] for i in range(per_task)]
    return out


def eval_prompts(per_task: int = 64, test_fraction: float = 0.25, seed: int = 0) -> list[dict]:
    """The fixed held-out eval set: for each task its held-out prompts cycled to `per_task` records, so
    every task weighs the same (the eval seeds each record's noise by its index, so copies differ)."""
    if per_task < 1:
        raise ValueError(f"per_task must be >= 1, got {per_task}")
    return _cycled_per_task(split_prompts(test_fraction, seed)[1], per_task)


def rl_train_prompts(test_fraction: float = 0.25, seed: int = 0) -> list[dict]:
    """The RL training prompts: `split_prompts`' training part with each task's prompts cycled to the
    largest task's count, so every task weighs the same in training as in the eval. Unbalanced, 72 of
    the 112 prompts are colour attribution and GRPO gained there while the other five tasks fell."""
    train, _ = split_prompts(test_fraction, seed)
    return _cycled_per_task(train, max(sum(r["tag"] == task for r in train) for task in TASKS))


@lru_cache(maxsize=None)
def near_misses(prompt: str) -> tuple[str, ...]:
    """The prompts of `prompt`'s task that differ from it in exactly one word ("two triangles" for
    "three triangles", "a blue circle" for "a red circle", "a triangle right of a circle" for "a
    triangle left of a circle"): the mistakes a loose caption makes about a picture."""
    by_prompt = {r["prompt"]: r for r in all_prompts()}
    if prompt not in by_prompt:
        raise ValueError(f"{prompt!r} is not a prompt of the shapes world")
    words = prompt.split()
    return tuple(r["prompt"] for r in all_prompts((by_prompt[prompt]["tag"],))
                 if len(r["prompt"].split()) == len(words)
                 and sum(a != b for a, b in zip(r["prompt"].split(), words)) == 1)


def write_dataset(out_dir: str | Path, num_train: int, per_task: int = 64, seed: int = 0,
                  test_fraction: float = 0.25, caption_noise: float = 0.0) -> Path:
    """The pretraining set and the held-out eval prompts, in the `{split}_metadata.jsonl` layout.

    train: `num_train` pictures, each of a prompt drawn uniformly from a uniformly drawn task (all
    150 prompts: pretraining sees the whole world; RL trains on `split_prompts`' train part), with
    `"image"` = its PNG's path relative to `out_dir`. test: `eval_prompts(per_task)`, without pictures.

    `caption_noise`: the share of pictures that show a near miss of their caption (`near_misses`, drawn
    uniformly; the record names it as `"depicts"`), as web captions miss counts, colours and sides. A
    model trained on them draws the near misses as often, a mistake that is a mode of its own
    distribution, which RL can select against (as it does for real text-to-image models).
    """
    from PIL import Image

    if not 0.0 <= caption_noise < 1.0:
        raise ValueError(f"caption_noise must be in [0, 1), got {caption_noise}")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    by_task = {task: all_prompts((task,)) for task in TASKS}
    by_prompt = {r["prompt"]: r for r in all_prompts()}
    records = []
    for n in range(num_train):
        task = TASKS[rng.integers(len(TASKS))]
        meta = dict(by_task[task][rng.integers(len(by_task[task]))])
        name = f"images/{n:07d}.png"
        extra = {}
        scene = meta
        if caption_noise and rng.random() < caption_noise:
            misses = near_misses(meta["prompt"])
            scene = by_prompt[misses[rng.integers(len(misses))]]
            extra = {"depicts": scene["prompt"]}
        Image.fromarray(render(sample_scene(scene, rng))).save(out / name)
        records.append({**meta, "image": name, **extra})
    write_jsonl(out / "train_metadata.jsonl", records)
    write_jsonl(out / "test_metadata.jsonl", eval_prompts(per_task, test_fraction, seed))
    return out


def write_prompt_sets(out_dir: str | Path, per_task: int = 64, seed: int = 0, test_fraction: float = 0.25) -> Path:
    """The RL prompt sets: train = `rl_train_prompts()`, test = `eval_prompts(per_task)`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "train_metadata.jsonl", rl_train_prompts(test_fraction, seed))
    write_jsonl(out / "test_metadata.jsonl", eval_prompts(per_task, test_fraction, seed))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder to write (train/test _metadata.jsonl, images/)")
    parser.add_argument("--num-train", type=int, default=60000, help="training pictures")
    parser.add_argument("--eval-per-task", type=int, default=64, help="held-out eval records per task")
    parser.add_argument("--seed", type=int, default=0, help="seed of the scenes and of the prompt split")
    parser.add_argument("--caption-noise", type=float, default=0.0,
                        help="share of pictures that show a near miss of their caption (write_dataset)")
    parser.add_argument("--prompts-only", action="store_true", help="write only the RL prompt sets (no pictures)")
    args = parser.parse_args(argv)
    if args.prompts_only:
        out = write_prompt_sets(args.out, args.eval_per_task, args.seed)
    else:
        if args.num_train < 1:
            parser.error(f"--num-train must be >= 1, got {args.num_train}")
        out = write_dataset(args.out, args.num_train, args.eval_per_task, args.seed,
                            caption_noise=args.caption_noise)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
