"""The shapes world (titan_flow/data/shapes.py) and its GenEval scorer (titan_flow/rewards/shapes_geneval.py).

The scorer must give every ground-truth render full marks, give deliberately wrong renders the
strict / partial / standard scores the GenEval reward server's rules give them (worked out by hand
below), score blank and noise pictures 0, and refuse metadata it cannot score, naming the problem.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from titan_flow.data.prompts import load_prompt_dataset
from titan_flow.data.shapes import (
    COLORS, SHAPES, TASKS, Shape, all_prompts, eval_prompts, near_misses, relative_position, render, rl_train_prompts,
    sample_scene, split_prompts, vocabulary, write_dataset, write_prompt_sets,
)
from titan_flow.rewards import MultiReward, build_reward, geneval_breakdown
from titan_flow.rewards.shapes_geneval import detect

REWARD = build_reward("shapes_geneval")


def as_images(pictures: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(pictures)).permute(0, 3, 1, 2).float() / 255


def score(pictures, metas, only_strict=False) -> dict[str, list[float]]:
    out = REWARD(as_images(pictures), [m["prompt"] for m in metas], metas, only_strict=only_strict)
    return {k: v.tolist() for k, v in out.items()}


def record(prompt: str) -> dict:
    return next(r for r in all_prompts() if r["prompt"] == prompt)


# --------------------------------------------------------------------------------------- the world


def test_the_world_is_enumerated_in_genevals_schema():
    prompts = all_prompts()
    assert len(prompts) == 3 + 6 + 9 + 12 + 24 + 96 == 150
    assert len({r["prompt"] for r in prompts}) == 150
    assert {r["tag"] for r in prompts} == set(TASKS)
    assert record("three triangles") == {"tag": "counting", "include": [{"class": "triangle", "count": 3}],
                                         "exclude": [{"class": "triangle", "count": 4}], "prompt": "three triangles"}
    assert record("a square left of a circle")["include"] == [
        {"class": "circle", "count": 1}, {"class": "square", "count": 1, "position": ["left of", 0]}]
    assert set(vocabulary()) == {w for r in prompts for w in r["prompt"].split()}


def test_the_split_is_fixed_disjoint_and_covers_every_task():
    train, test = split_prompts()
    assert (train, test) == split_prompts()
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}
    assert len(train) + len(test) == 150
    for task in TASKS:
        assert any(r["tag"] == task for r in train) and any(r["tag"] == task for r in test)
    evals = eval_prompts(per_task=10)
    assert [r["tag"] for r in evals] == [t for t in TASKS for _ in range(10)]
    assert {r["prompt"] for r in evals} <= {r["prompt"] for r in test}
    rl_train = rl_train_prompts()  # every task weighs the same, every training prompt is in it
    largest = max(sum(r["tag"] == t for r in train) for t in TASKS)
    assert [r["tag"] for r in rl_train] == [t for t in TASKS for _ in range(largest)]
    assert {r["prompt"] for r in rl_train} == {r["prompt"] for r in train}


def test_relative_position_is_genevals_rule():
    left, right = (0, 10, 10, 20), (20, 10, 30, 20)
    assert relative_position(left, right) == {"left of"}
    assert relative_position(right, left) == {"right of"}
    assert relative_position((10, 0, 20, 10), (10, 20, 20, 30)) == {"above"}
    assert relative_position((0, 0, 10, 10), (20, 20, 30, 30)) == {"left of", "above"}  # 45 degrees: both
    # 4 px apart, boxes 10 wide: |dx| 4 - 0.1 * 20 = 2 of the 4 remain, normalised 0.5: not > 0.5
    assert relative_position((0, 0, 10, 10), (4, 0, 14, 10)) == set()


def test_scenes_satisfy_their_prompt_and_fit(tmp_path):
    rng = np.random.default_rng(3)
    for meta in all_prompts():
        shapes = sample_scene(meta, rng)
        wanted = sorted((i["class"], i.get("color")) for i in meta["include"] for _ in range(i["count"]))
        got = sorted((s.kind, s.color if any("color" in i for i in meta["include"]) else None) for s in shapes)
        assert got == wanted, meta["prompt"]
        boxes = [s.box for s in shapes]
        assert all(0 <= b[0] and b[2] <= 16 and 0 <= b[1] and b[3] <= 16 for b in boxes)
        for i, a in enumerate(boxes):  # an empty pixel between any two boxes: objects never touch
            for b in boxes[i + 1:]:
                assert a[0] >= b[2] + 1 or b[0] >= a[2] + 1 or a[1] >= b[3] + 1 or b[1] >= a[3] + 1


def test_datasets_are_reproducible_and_the_geneval_loader_reads_them(tmp_path):
    a = write_dataset(tmp_path / "a", num_train=12, per_task=2, seed=5)
    b = write_dataset(tmp_path / "b", num_train=12, per_task=2, seed=5)
    assert (a / "train_metadata.jsonl").read_text() == (b / "train_metadata.jsonl").read_text()
    assert (a / "images" / "0000011.png").read_bytes() == (b / "images" / "0000011.png").read_bytes()
    train = load_prompt_dataset(str(a), "train")
    assert len(train) == 12 and train[0].metadata["image"] == "images/0000000.png"
    assert train[0].image.shape == (3, 16, 16)  # the loader reads the picture the record names
    test = load_prompt_dataset(str(a), "test")
    assert len(test) == 2 * len(TASKS) and all(r.image is None for r in test)

    prompts = write_prompt_sets(tmp_path / "prompts", per_task=3)
    rl_train = load_prompt_dataset(str(prompts), "train")
    assert [r.prompt for r in rl_train] == [r["prompt"] for r in rl_train_prompts()]
    assert len(load_prompt_dataset(str(prompts), "test")) == 3 * len(TASKS)
    assert json.loads((prompts / "test_metadata.jsonl").read_text().splitlines()[0])["tag"] == TASKS[0]



def test_near_misses_differ_in_one_word_within_the_task():
    for meta in all_prompts():
        misses = near_misses(meta["prompt"])
        assert misses, meta["prompt"]
        for miss in misses:
            assert record(miss)["tag"] == meta["tag"]
            a, b = meta["prompt"].split(), miss.split()
            assert len(a) == len(b) and sum(x != y for x, y in zip(a, b)) == 1
    assert set(near_misses("three triangles")) == {"two triangles", "four triangles", "three circles", "three squares"}
    with pytest.raises(ValueError, match="'a dog' is not a prompt of the shapes world"):
        near_misses("a dog")


def test_caption_noise_draws_near_misses_that_the_scorer_reads_as_such(tmp_path):
    from PIL import Image

    out = write_dataset(tmp_path / "noisy", num_train=200, per_task=1, seed=3, caption_noise=0.5)
    rows = [json.loads(line) for line in (out / "train_metadata.jsonl").read_text().splitlines()]
    noisy = [r for r in rows if "depicts" in r]
    # binomial(200, 0.5): 5.3 standard deviations either side
    assert 100 - 38 < len(noisy) < 100 + 38
    assert all(r["depicts"] in near_misses(r["prompt"]) for r in noisy)
    pictures = [np.asarray(Image.open(out / r["image"]).convert("RGB")) for r in rows]
    as_depicted = score(pictures, [record(r.get("depicts", r["prompt"])) for r in rows], only_strict=True)
    assert as_depicted["strict_accuracy"] == [1.0] * len(rows)
    as_captioned = score(pictures, [record(r["prompt"]) for r in rows], only_strict=True)["strict_accuracy"]
    # a near miss never satisfies its caption, except a diagonal placement that holds both relations
    wrong_yet_right = [r for r, ok in zip(rows, as_captioned) if "depicts" in r and ok]
    assert all(r["tag"] == "position" for r in wrong_yet_right)
    clean = write_dataset(tmp_path / "clean", num_train=12, per_task=1, seed=3)
    assert "depicts" not in (clean / "train_metadata.jsonl").read_text()
    with pytest.raises(ValueError, match="caption_noise must be in"):
        write_dataset(tmp_path / "bad", num_train=1, caption_noise=1.0)


# ------------------------------------------------------------------------------------------ scorer


def test_ground_truth_renders_score_full_marks_on_every_key():
    rng = np.random.default_rng(0)
    metas = [m for m in all_prompts() for _ in range(4)]  # every prompt, four random scenes each
    out = score([render(sample_scene(m, rng)) for m in metas], metas)
    for key in ("score", "strict_accuracy", "accuracy"):
        assert out[key] == [1.0] * len(metas), key
    for task in TASKS:
        for key in (f"{task}_strict_accuracy", f"{task}_accuracy"):
            assert out[key] == [1.0 if m["tag"] == task else -10.0 for m in metas]
    table = geneval_breakdown({k: torch.tensor(v) for k, v in out.items()})
    assert table == {**{t: 1.0 for t in TASKS}, "overall": 1.0, **{f"{t}_strict": 1.0 for t in TASKS},
                     "overall_strict": 1.0}


def test_detections_carry_class_colour_and_box():
    picture = render([Shape("triangle", "yellow", 0, 1, 7), Shape("circle", "blue", 8, 8, 7)])
    (found,) = detect(picture[None])
    # equally confident: the larger first (the circle covers 37 pixels, the triangle 31)
    assert [(d.kind, d.color, d.box, d.confidence, d.area) for d in found] == [
        ("circle", "blue", (8, 8, 15, 15), 1.0, 37), ("triangle", "yellow", (0, 1, 7, 8), 1.0, 31)]


# Wrong renders, each with (strict, partial score, standard GenEval accuracy) by the reward server's rules.
# Objects are 7 pixels wide; the canvas holds four, at the corners A B / C D.
A, B, C, D = (0, 0), (9, 0), (0, 9), (9, 9)


def at(kind: str, color: str, corner: tuple[int, int]) -> Shape:
    return Shape(kind, color, *corner, 7)


WRONG = [
    # count too low: partial 1 - |3 - 2| / 3; standard needs >= 3
    ("three circles", [at("circle", "red", A), at("circle", "blue", D)], (0, 2 / 3, 0)),
    # count too high: partial 1 - 1/3; standard finds >= 3 but the exclude item (4 circles) fails it
    ("three circles", [at("circle", "red", c) for c in (A, B, C, D)], (0, 2 / 3, 0)),
    # more than twice too many: 1 - |1 - 3| / 1 = -1, as the server; standard: 3 >= 2 circles are excluded
    ("a circle", [at("circle", "red", c) for c in (A, B, D)], (0, -1.0, 0)),
    # wrong colour: [count 1, colour 0]
    ("a red circle", [at("circle", "blue", D)], (0, 0.5, 0)),
    # colour attribution wrong on one object: [1, 1, 1, 0]
    ("a red circle and a blue square", [at("circle", "red", A), at("square", "green", D)], (0, 0.75, 0)),
    # one object missing: circle [0, 0 (its colour)], square [1, 1]
    ("a red circle and a blue square", [at("square", "blue", D)], (0, 0.5, 0)),
    # relation reversed: [1, 1, 0] (the server would append an extra 1.0 here: 0.75)
    ("a triangle left of a circle", [at("circle", "red", A), at("triangle", "red", B)], (0, 2 / 3, 0)),
    # the referred object is missing: circle [0], triangle [1, 0 (no target)]
    ("a triangle left of a circle", [at("triangle", "green", A)], (0, 1 / 3, 0)),
    # an extra object of another class: strict rules ignore it, standard has no exclude for it
    ("a circle", [at("circle", "red", A), at("square", "red", D)], (1, 1.0, 1)),
    # an extra circle: strict counts exactly (partial [0, 1]); standard asks for at least one
    ("a circle and a square", [at("circle", "red", A), at("circle", "red", C), at("square", "red", D)],
     (0, 0.5, 1)),
    # the wrong shape: a square asked, a circle drawn
    ("a square", [at("circle", "green", B)], (0, 0.0, 0)),
]


@pytest.mark.parametrize("prompt, shapes, expected", WRONG, ids=[f"{i}-{w[0]}" for i, w in enumerate(WRONG)])
def test_wrong_renders_get_the_servers_scores(prompt, shapes, expected):
    out = score([render(shapes)], [record(prompt)])
    strict, partial, standard = expected
    assert out["strict_accuracy"] == [float(strict)]
    assert out["score"][0] == pytest.approx(partial, abs=1e-6)
    assert out["accuracy"] == [float(standard)]


def test_blank_and_noise_pictures_score_zero():
    metas = [m for m in all_prompts() if m["tag"] in TASKS][::3]
    n = len(metas)
    blank = np.zeros((n, 16, 16, 3), dtype=np.uint8)
    noise = np.random.default_rng(0).integers(0, 256, size=(n, 16, 16, 3), dtype=np.uint8)
    for pictures in (blank, noise):
        out = score(list(pictures), metas)
        assert out["strict_accuracy"] == [0.0] * n and out["accuracy"] == [0.0] * n
        assert max(out["score"]) <= 0.0
    white = np.full((1, 16, 16, 3), 255, dtype=np.uint8)  # a canvas painted over is no object of the world
    assert score(list(white), [record("a yellow square")])["strict_accuracy"] == [0.0]


def test_objects_in_clutter_are_not_seen_but_a_few_specks_are_forgiven():
    """GRPO learned to hide square-ish one-colour blobs in multicoloured noise; a detector sees nothing there."""
    meta = record("a blue square")
    clean = render([at("square", "blue", A)])
    rng = np.random.default_rng(0)
    background = np.flatnonzero((clean == 0).all(-1))
    off_palette = np.array([120, 60, 160], dtype=np.uint8)  # purple: > MAX_COLOR_DISTANCE from every colour
    cluttered, specked = clean.copy(), clean.copy()
    cluttered.reshape(-1, 3)[rng.choice(background, int(0.2 * 256), replace=False)] = off_palette
    specked.reshape(-1, 3)[rng.choice(background, int(0.05 * 256), replace=False)] = off_palette
    speckles = clean.copy()  # isolated palette-coloured pixels, each below min_area: clutter too
    speckles[0:16:2, 8:16:2] = COLORS["red"]
    speckles[8:16:2, 0:8:2] = COLORS["red"]
    pictures = [clean, specked, cluttered, speckles]
    out = score(pictures, [meta] * 4)
    assert out["strict_accuracy"] == [1.0, 1.0, 0.0, 0.0] and out["score"] == [1.0, 1.0, 0.0, 0.0]
    assert [len(found) for found in detect(np.stack(pictures))] == [1, 1, 0, 0]


def test_training_mode_drops_the_standard_accuracy():
    meta = record("a blue triangle")
    out = REWARD(as_images([render([Shape("triangle", "blue", 5, 5, 7)])]), [meta["prompt"]], [meta])
    assert set(out) == {"score", "strict_accuracy", *(f"{t}_strict_accuracy" for t in TASKS)}


def test_train_on_strict_trains_on_the_all_or_nothing_verdict():
    meta = record("three squares")
    pictures = [render([Shape("square", "red", x, y, 7) for x, y in corners])
                for corners in ([(0, 0), (8, 0), (0, 8)], [(0, 0), (8, 0)])]  # right count, one short
    images, prompts = as_images(pictures), [meta["prompt"]] * 2
    partial = REWARD(images, prompts, [meta] * 2)["score"].tolist()
    strict = build_reward("shapes_geneval", train_on="strict")(images, prompts, [meta] * 2)["score"].tolist()
    assert partial == pytest.approx([1.0, 2 / 3]) and strict == [1.0, 0.0]
    with pytest.raises(ValueError, match="reward.options.shapes_geneval.train_on must be 'partial' or 'strict', got 'all'"):
        build_reward("shapes_geneval", train_on="all")


@pytest.mark.parametrize("meta, message", [
    ({"tag": "counting", "include": [{"class": "dog", "count": 2}], "prompt": "two dogs"}, "class 'dog'"),
    ({"include": [{"class": "circle", "count": 1}], "prompt": "a circle"}, "'tag' is None"),
    ({"tag": "colors", "include": [{"class": "circle", "count": 1, "color": "purple"}], "prompt": "a purple circle"},
     "colour 'purple'"),
    ({"tag": "position", "include": [{"class": "circle", "count": 1, "position": ["left of", 0]}], "prompt": "x"},
     "position must be [relation, index of an earlier include item]"),
    ({"tag": "position", "include": [{"class": "circle", "count": 1},
                                     {"class": "square", "count": 1, "position": ["near", 0]}], "prompt": "x"},
     "'near'"),
    ({"tag": "counting", "include": [{"class": "circle", "count": 0}], "prompt": "no circle"}, "count must be"),
    ({"tag": "single_object", "include": [], "prompt": "nothing"}, "non-empty list"),
    ({"tag": "counting", "include": [{"class": "circle", "count": 2}], "exclude": [{"class": "car", "count": 3}],
      "prompt": "two circles"}, "exclude[0] has class 'car'"),
])
def test_metadata_it_cannot_score_is_refused(meta, message):
    with pytest.raises(ValueError, match="shapes_geneval cannot score") as info:
        score([np.zeros((16, 16, 3), np.uint8)], [meta])
    assert message in str(info.value)


def test_multireward_logs_the_genevals_breakdown_keys():
    rng = np.random.default_rng(1)
    metas = eval_prompts(per_task=2)
    pictures = [render(sample_scene(m, rng)) for m in metas]
    pictures[0] = np.zeros_like(pictures[0])  # one failed single_object image of two
    with MultiReward({"shapes_geneval": 1.0}) as reward_fn:
        out = reward_fn(as_images(pictures), [m["prompt"] for m in metas], metas, only_strict=False)
    table = geneval_breakdown(out)
    assert table["single_object_strict"] == 0.5 and table["colors_strict"] == 1.0
    assert table["overall_strict"] == pytest.approx((0.5 + 5) / 6)
    assert out["avg"].tolist() == out["shapes_geneval"].tolist()


def test_palette_and_shapes_are_what_the_prompts_name():
    assert set(COLORS) <= set(vocabulary()) and set(SHAPES) <= set(vocabulary())
