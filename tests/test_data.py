"""Datasets of records with images, and the StatefulDataLoader that reads them: images decoded in
worker processes, group keys for edits, and a position that resumes on exactly the next batch."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from titan_flow.data.loader import build_loader
from titan_flow.data.prompts import load_prompt_dataset
from titan_flow.data.sampler import KRepeatSampler

SHARED_DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"


def write_edit_set(folder: Path, n_images: int = 5, split: str = "train") -> Path:
    """A counting_edit-style folder: jsonl rows naming generated_images/image_{i}.png of varied sizes."""
    (folder / "generated_images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n_images):
        size = (16 + 4 * i, 12 + 2 * i)  # (width, height): every image its own shape
        array = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(array).save(folder / "generated_images" / f"image_{i}.png")
        for count in (1, 2):  # two instructions per image, and the same instruction on several images
            rows.append({"tag": "counting", "include": [{"class": "cat", "count": count}],
                         "prompt": f"Change the number of cats in the image to {count}.",
                         "image": f"generated_images/image_{i}.png"})
    (folder / f"{split}_metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_records_carry_their_image_and_an_edit_group_key(tmp_path):
    folder = write_edit_set(tmp_path / "edit")
    ds = load_prompt_dataset(str(folder), "train")
    assert ds.has_images and len(ds) == 10
    record = ds[3]  # image 1, count 2
    want = np.asarray(Image.open(folder / "generated_images" / "image_1.png").convert("RGB"))
    assert record.image.dtype == torch.float32 and record.image.shape == (3, 14, 20)
    assert torch.equal((record.image * 255).round().byte().permute(1, 2, 0), torch.from_numpy(want.copy()))
    assert record.prompt == "Change the number of cats in the image to 2." and record.metadata["include"][0]["count"] == 2
    # One instruction on two images is two groups; text prompts group by the prompt alone.
    assert record.key == "Change the number of cats in the image to 2._generated_images/image_1.png"
    assert len({ds[i].key for i in range(len(ds))}) == 10
    assert not load_prompt_dataset(str(folder), "train", image_key="").has_images
    text = load_prompt_dataset("", "train")[0]
    assert text.image is None and text.key == text.prompt


def test_bad_image_records_fail_naming_the_line(tmp_path):
    folder = write_edit_set(tmp_path / "edit")
    (folder / "generated_images" / "image_2.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"train_metadata.jsonl:5: image .*image_2.png \(field \"image\"\) does not exist"):
        load_prompt_dataset(str(folder), "train")
    rows = (folder / "train_metadata.jsonl").read_text().splitlines()
    partial = [json.loads(r) for r in rows[:2]] + [{"prompt": "no image here"}]
    (folder / "test_metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in partial))
    with pytest.raises(ValueError, match=r'2 of 3 records have an "image" field'):
        load_prompt_dataset(str(folder), "test")
    (folder / "test_metadata.jsonl").write_text(json.dumps({"prompt": "x", "image": 3}) + "\n")
    with pytest.raises(ValueError, match=r'test_metadata.jsonl:1: the "image" field must be an image path, got 3'):
        load_prompt_dataset(str(folder), "test")


def batches(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def same_batches(a, b) -> bool:
    return all(
        x.prompts == y.prompts and x.keys == y.keys and x.metadata == y.metadata
        and (x.images is None) == (y.images is None)
        and (x.images is None or all(torch.equal(i, j) for i, j in zip(x.images, y.images)))
        for x, y in zip(a, b)
    )


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_resumes_on_exactly_the_next_batch(tmp_path, workers):
    """Workers prefetch ahead, yet the saved position is the last batch handed out: a fresh loader
    loaded with it yields the batches a straight run would have yielded next, images included."""
    ds = load_prompt_dataset(str(write_edit_set(tmp_path / "edit")), "train")

    def loader():
        return build_loader(ds, KRepeatSampler(len(ds), 4, 2, 2, 1, seed=7), workers, seed=0)

    straight = batches(loader(), 7)
    first = loader()
    it = iter(first)
    head = [next(it) for _ in range(4)]
    state = first.state_dict()
    del it
    resumed = loader()
    resumed.load_state_dict(state)
    assert same_batches(head, straight[:4])
    assert same_batches(batches(resumed, 3), straight[4:])
    assert all(b.images is not None and len(b.images) == 4 for b in straight)
    assert not same_batches(straight[4:5], straight[5:6])  # the comparison can fail


def test_text_only_data_starts_no_workers():
    ds = load_prompt_dataset("", "train")
    assert build_loader(ds, KRepeatSampler(len(ds), 4, 2, 1, 0, 0), num_workers=4, seed=0).num_workers == 0
    with pytest.raises(ValueError, match="data.num_workers must be >= 0, got -1"):
        build_loader(ds, KRepeatSampler(len(ds), 4, 2, 1, 0, 0), num_workers=-1, seed=0)


@pytest.mark.skipif(not SHARED_DATASETS.is_dir(), reason=f"the reference's datasets are not at {SHARED_DATASETS}")
def test_the_reference_counting_edit_rows_load(tmp_path):
    """The real counting_edit test rows, with fixture images standing in for its generated_images/."""
    folder = tmp_path / "counting_edit"
    folder.mkdir()
    shutil.copy(SHARED_DATASETS / "counting_edit_test_metadata.jsonl", folder / "test_metadata.jsonl")
    rows = [json.loads(line) for line in (folder / "test_metadata.jsonl").read_text().splitlines()]
    (folder / "generated_images").mkdir()
    for name in {r["image"] for r in rows}:
        Image.new("RGB", (8, 8), (len(name), 0, 0)).save(folder / name, format="JPEG")
    ds = load_prompt_dataset(str(folder), "test")
    assert len(ds) == len(rows) == 112 and ds.has_images
    assert ds[0].metadata["tag"] == "counting" and ds[0].image.shape == (3, 8, 8)
    assert len({ds[i].key for i in range(len(ds))}) == len({(r["prompt"], r["image"]) for r in rows})


REPO = Path(__file__).resolve().parents[1]


def train(out: Path, *args: str) -> list[dict]:
    import os
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1", "-m", "titan_flow.train",
           "--job.config_file", str(REPO / "train_configs" / "bagel_debug_cpu.toml"), "--job.output_dir", str(out), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    lines = (out / "bagel_debug_cpu" / "metrics.jsonl").read_text().splitlines()
    return [m for m in map(json.loads, lines) if "reward/avg_mean" in m]


def test_editing_trains_from_the_loader_and_resumes_exactly(tmp_path):
    """An edit dataset through the trainer (debug Bagel edits its source images; 2 loader workers): a run
    stopped after epoch 1 and resumed logs what a straight run logs, so the loader's position (and
    every image it fed) was restored."""
    data = ["--data.path", str(write_edit_set(tmp_path / "edit")), "--data.num_workers", "2",
            "--checkpoint.interval", "1", "--training.steps", "3"]
    straight = train(tmp_path / "straight", *data)
    first = train(tmp_path / "resumed", *data[:-1], "2")
    both = train(tmp_path / "resumed", *data)  # epochs 0-1 from the first run, then the resumed epoch 2
    assert [m["step"] for m in straight] == [m["step"] for m in both] == [0, 1, 2]
    keys = ("reward/avg_mean", "loss/total", "ratio/mean", "optim/grad_norm")
    assert [[m[k] for k in keys] for m in straight] == [[m[k] for k in keys] for m in both]
    assert len(first) == 2
    assert straight[1]["reward/avg_mean"] != straight[2]["reward/avg_mean"]  # other images each epoch
