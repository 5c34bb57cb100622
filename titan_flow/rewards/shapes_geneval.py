"""GenEval for the shapes world (titan_flow/data/shapes.py), computed in-process on the CPU.

Where GenEval runs Mask2Former and CLIP, this detector reads the flat-colour pictures directly:
every pixel takes the nearest of the palette's colours or the black background, unless it is further
than MAX_COLOR_DISTANCE from all of them (unreadable); 8-connected pixels
of one colour form a blob; a blob of at least `min_area` pixels, MIN_SIDE to MAX_SIDE pixels across (scaled to the
image size), is an object when the ideal circle, square or triangle drawn in its bounding box overlaps it with an IoU
of at least `min_confidence` and the box is not too elongated. Its class is the best-fitting shape,
its confidence that IoU, its colour the blob's. Objects of a class are ranked by confidence, as
GenEval ranks detections. A picture whose clutter (unreadable pixels and specks smaller than
`min_area`) covers more than MAX_CLUTTER of the canvas holds no objects: a detector sees none in
noise, and without this rule GRPO learns to paint multicoloured noise in which square-ish blobs of
one colour happen to count (measured: "four squares" scored 0.75-1.0 on such pictures after 140 epochs).

The metadata is then scored exactly as the GenEval reward server (yifan123/reward-server) does:

* `strict_accuracy` (and `<tag>_strict_accuracy`): every include item's class found exactly `count`
  times, with its colour on all of them and its relation to every object of the item it refers to;
* `score`, the partial credit flow_grpo trains on: per include item 1 - |count - found| / count
  (negative when more than twice too many are found); with the wrong count, an item with a colour
  or position adds a 0; with the right count, the colour adds 1 - |count - found in colour| / count
  and the position 1 if the relation holds (0 otherwise, or when the referred item failed). The mean
  over the appended terms. The server appends an extra 1.0 after a failed relation (a bug noted in
  flow_grpo_algorithm.md section 14, quirk 14); it is not reproduced, so a wrong position scores 0;
  `reward.options.shapes_geneval.train_on = "strict"` trains on the strict verdict (0 or 1) instead;
* with `only_strict=False` (evaluation), `accuracy` and `<tag>_accuracy`: standard GenEval, i.e. at
  least `count` objects of the class, colour and position checked on the `count` most confident
  ones, and fewer than `count` objects of each exclude item's class.

Tag columns hold -10 for the images of other tasks, like the GenEval reward's, so the per-task
breakdown (`rewards.multi.geneval_breakdown`) and the eval logging work unchanged. GenEval's
detector thresholds (0.3, 0.9 for counting) belong to its detector and have no counterpart here.
Metadata this world cannot score (a class other than circle/square/triangle, an unknown colour or
relation, a malformed include list) raises ValueError naming the record.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from titan_flow.data.shapes import BACKGROUND, CANVAS, COLORS, RELATIONS, SHAPES, TASKS, relative_position, shape_mask
from titan_flow.rewards.multi import NOT_THIS_TAG
from titan_flow.rewards.registry import Reward, register_reward, scores_tensor, to_uint8

MIN_AREA = 16  # pixels on the 16 x 16 canvas; the smallest drawn object (the 7-pixel triangle) has 31
MIN_SIDE, MAX_SIDE = 5, 10  # pixels; drawn objects are 7 wide. Noise specks and a canvas painted over in one
# colour (a reward hack: "a yellow square" -> all yellow) are not objects
MIN_CONFIDENCE = 0.6  # IoU of a blob with the ideal shape of its box; a circle and a square overlap 0.785
MAX_ASPECT = 1.5  # the world's objects have square boxes
MAX_COLOR_DISTANCE = 60.0  # RGB distance to the nearest palette colour; the palette's colours are >= 150 apart
MAX_CLUTTER = 0.1  # fraction of the canvas; the model's clean pictures have <= 2%, the noise GRPO learned 59-64%
UNREADABLE = -2
_PALETTE = np.array([BACKGROUND, *COLORS.values()], dtype=np.float32)  # index 0 = background
_COLOR_NAMES = list(COLORS)


@dataclass(frozen=True)
class Detection:
    kind: str
    color: str
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive), pixels
    confidence: float
    area: int


def segment_colors(images: np.ndarray) -> np.ndarray:
    """uint8 (B, H, W, 3) -> int (B, H, W): -1 background, UNREADABLE further than MAX_COLOR_DISTANCE
    from every palette colour, else the index of the nearest palette colour."""
    d = ((images[..., None, :].astype(np.float32) - _PALETTE) ** 2).sum(-1)
    nearest = d.argmin(-1).astype(np.int64) - 1
    return np.where(d.min(-1) > MAX_COLOR_DISTANCE**2, UNREADABLE, nearest)


def label_components(colors: np.ndarray) -> np.ndarray:
    """(B, H, W) colour indices -> component labels (0 = background): 8-connected pixels of one colour
    share the smallest flat index among them (min-label propagation, vectorised over the batch)."""
    b, h, w = colors.shape
    fg = colors >= 0
    none = b * h * w + 1
    labels = np.where(fg, np.arange(1, b * h * w + 1).reshape(b, h, w), none)
    padded_colors = np.pad(colors, ((0, 0), (1, 1), (1, 1)), constant_values=UNREADABLE - 1)
    shifts = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]
    while True:
        padded = np.pad(labels, ((0, 0), (1, 1), (1, 1)), constant_values=none)
        new = labels
        for dy, dx in shifts:
            window = (slice(None), slice(1 + dy, 1 + dy + h), slice(1 + dx, 1 + dx + w))
            same = padded_colors[window] == colors
            new = np.minimum(new, np.where(same, padded[window], none))
        new = np.where(fg, new, none)
        if np.array_equal(new, labels):
            break
        labels = new
    return np.where(fg, labels, 0)


def classify(blob: np.ndarray) -> tuple[str, float]:
    """(best shape, IoU with it) of a boolean blob cropped to its bounding box."""
    h, w = blob.shape
    area = blob.sum()
    best, best_iou = SHAPES[0], -1.0
    for kind in SHAPES:
        template = shape_mask(kind, w, h)
        inter = np.logical_and(blob, template).sum()
        iou = inter / (area + template.sum() - inter)
        if iou > best_iou:
            best, best_iou = kind, float(iou)
    return best, best_iou


def detect(images: np.ndarray, min_area: int = MIN_AREA, min_confidence: float = MIN_CONFIDENCE) -> list[list[Detection]]:
    """uint8 (B, H, W, 3) -> the objects found in each image, most confident first."""
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"detect takes uint8 images of shape (B, H, W, 3); got {images.dtype} {images.shape}")
    colors = segment_colors(images)
    labels = label_components(colors)
    scale = images.shape[1] * images.shape[2] / CANVAS**2
    min_side, max_side = MIN_SIDE * scale**0.5, MAX_SIDE * scale**0.5
    out = []
    for image_colors, image_labels in zip(colors, labels):
        ids, areas = np.unique(image_labels[image_labels > 0], return_counts=True)
        clutter = (image_colors == UNREADABLE).sum() + areas[areas < min_area * scale].sum()
        found = []
        if clutter > MAX_CLUTTER * image_colors.size:
            out.append(found)
            continue
        for label, area in zip(ids, areas):
            if area < min_area * scale:
                continue
            mask = image_labels == label
            rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
            y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
            short, long = sorted((y1 - y0, x1 - x0))
            if short < min_side or long > max_side or long > MAX_ASPECT * short:
                continue
            kind, confidence = classify(mask[y0:y1, x0:x1])
            if confidence < min_confidence:
                continue
            color = _COLOR_NAMES[image_colors[mask][0]]
            found.append(Detection(kind, color, (int(x0), int(y0), int(x1), int(y1)), confidence, int(area)))
        out.append(sorted(found, key=lambda d: (-d.confidence, -d.area)))
    return out


# ------------------------------------------------------------------------------------ the metadata


def check_metadata(meta: dict) -> None:
    """Raise ValueError, naming the record and what is wrong, unless this world can score `meta`."""

    def fail(what: str) -> None:
        raise ValueError(
            f"shapes_geneval cannot score {meta.get('prompt', meta)!r}: {what} (metadata of the shapes world comes "
            "from titan_flow.data.shapes, e.g. `python -m titan_flow.data.shapes --prompts-only --out DIR`)"
        )

    if not isinstance(meta, dict):
        raise ValueError(f"shapes_geneval: metadata must be a dict with 'tag' and 'include', got {meta!r}")
    if meta.get("tag") not in TASKS:
        fail(f"'tag' is {meta.get('tag')!r}, not one of {', '.join(TASKS)}")
    include = meta.get("include")
    if not isinstance(include, list) or not include:
        fail("'include' must be a non-empty list of {class, count[, color][, position]} items")
    for kind, items in (("include", include), ("exclude", meta.get("exclude", []))):
        for i, item in enumerate(items):
            if not isinstance(item, dict) or item.get("class") not in SHAPES:
                fail(f"{kind}[{i}] has class {item.get('class') if isinstance(item, dict) else item!r}; "
                     f"this world draws only {', '.join(SHAPES)}")
            count = item.get("count")
            if isinstance(count, bool) or not isinstance(count, int) or count < 1:
                fail(f"{kind}[{i}] count must be a positive integer, got {count!r}")
            if "color" in item and item["color"] not in COLORS:
                fail(f"{kind}[{i}] colour {item['color']!r} is not one of {', '.join(COLORS)}")
            if "position" in item:
                position = item["position"]
                if (not isinstance(position, (list, tuple)) or len(position) != 2 or position[0] not in RELATIONS
                        or not isinstance(position[1], int) or not 0 <= position[1] < i):
                    fail(f"{kind}[{i}] position must be [relation, index of an earlier include item] with a "
                         f"relation in {RELATIONS}, got {position!r}")


def _by_class(objects: list[Detection]) -> dict[str, list[Detection]]:
    out: dict[str, list[Detection]] = {}
    for d in objects:  # already most confident first
        out.setdefault(d.kind, []).append(d)
    return out


def strict_score(objects: list[Detection], meta: dict) -> tuple[bool, float]:
    """(strict correctness, partial-credit score): the reward server's `evaluate_reward` rules."""
    by_class = _by_class(objects)
    correct = True
    terms: list[float] = []
    matched_groups: list[list[Detection] | None] = []
    for item in meta["include"]:
        count = item["count"]
        found = by_class.get(item["class"], [])
        matched = True
        terms.append(1 - abs(count - len(found)) / count)
        if len(found) != count:
            correct = matched = False
            if "color" in item or "position" in item:
                terms.append(0.0)
        else:
            if "color" in item:
                in_color = sum(d.color == item["color"] for d in found)
                terms.append(1 - abs(count - in_color) / count)
                if in_color != count:
                    correct = matched = False
            if "position" in item and matched:
                relation, target = item["position"]
                targets = matched_groups[target]
                holds = targets is not None and all(
                    relation in relative_position(d.box, t.box) for d in found for t in targets
                )
                terms.append(1.0 if holds else 0.0)
                if not holds:
                    correct = matched = False
        matched_groups.append(found if matched else None)
    return correct, (sum(terms) / len(terms) if terms else 0.0)


def standard_correct(objects: list[Detection], meta: dict) -> bool:
    """GenEval's own rule (its `evaluate`): at least `count`, checked on the `count` most confident objects."""
    by_class = _by_class(objects)
    correct = True
    matched_groups: list[list[Detection] | None] = []
    for item in meta["include"]:
        count = item["count"]
        found = by_class.get(item["class"], [])[:count]
        matched = len(found) >= count
        if matched and "color" in item:
            matched = sum(d.color == item["color"] for d in found) >= count
        if matched and "position" in item:
            relation, target = item["position"]
            targets = matched_groups[target]
            matched = targets is not None and all(
                relation in relative_position(d.box, t.box) for d in found for t in targets
            )
        correct = correct and matched
        matched_groups.append(found if matched else None)
    for item in meta.get("exclude", []):
        if len(by_class.get(item["class"], [])) >= item["count"]:
            correct = False
    return correct


@register_reward
class ShapesGenEval(Reward):
    name = "shapes_geneval"

    def __init__(self, min_area: int = MIN_AREA, min_confidence: float = MIN_CONFIDENCE, train_on: str = "partial"):
        if train_on not in ("partial", "strict"):
            raise ValueError(f"reward.options.shapes_geneval.train_on must be 'partial' or 'strict', got {train_on!r}")
        if min_area < 1:
            raise ValueError(f"reward.options.shapes_geneval.min_area must be >= 1, got {min_area}")
        if not 0 < min_confidence <= 1:
            raise ValueError(f"reward.options.shapes_geneval.min_confidence must be in (0, 1], got {min_confidence}")
        self.min_area, self.min_confidence, self.train_on = min_area, min_confidence, train_on

    def __call__(self, images, prompts, metadata, ref_images=None, only_strict=True):
        for meta in metadata:
            check_metadata(meta)
        detections = detect(to_uint8(images), self.min_area, self.min_confidence)
        columns: dict[str, list[float]] = {"score": [], "strict_accuracy": []}
        if not only_strict:
            columns["accuracy"] = []
        for objects, meta in zip(detections, metadata):
            strict, score = strict_score(objects, meta)
            per_image = {"strict_accuracy": float(strict)}
            if not only_strict:
                per_image["accuracy"] = float(standard_correct(objects, meta))
            columns["score"].append(float(strict) if self.train_on == "strict" else score)
            for key, value in per_image.items():
                columns[key].append(value)
                for tag in TASKS:
                    columns.setdefault(f"{tag}_{key}", []).append(value if tag == meta["tag"] else NOT_THIS_TAG)
        return {key: scores_tensor(values, f"shapes_geneval/{key}", len(metadata)) for key, values in columns.items()}
