"""rl.algorithm = "supervised": offline flow matching on (prompt, image) records through the trainer.

In-process runs (one rank, a few seconds each) of the shapes flavor on a small rendered dataset: the
loss falls, a run stopped and resumed equals a straight one (the loader's position, the caption
dropout and noise streams, EMA and AdamW all restored), captions drop at the configured rate, bad
data fails naming the field, and a run's checkpoint exports to a shapes directory that
`python -m titan_flow.evaluate` scores exactly as the trainer's own eval did.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from titan_flow.config import ConfigError, build_job_config
from titan_flow.data.shapes import write_dataset, write_prompt_sets
from titan_flow.evaluate import main as evaluate_main
from titan_flow.export import export
from titan_flow.models.sd3.shapes import is_shapes_dir
from titan_flow.sample import main as sample_main
from titan_flow.train import main as train_main

SHAPES = [
    "--model.name", "sd3", "--model.flavor", "shapes", "--model.pretrained_path", "",
    "--model.resolution", "16", "--model.max_sequence_length", "8",
    "--sampling.num_steps", "4", "--sampling.guidance_scale", "4.5", "--sampling.num_image_per_prompt", "1",
    "--sampling.batch_size", "8", "--sampling.num_batches_per_epoch", "3",
    "--rl.algorithm", "supervised", "--rl.caption_dropout", "0.25", "--optimizer.lr", "1e-3",
    "--training.ema_update_interval", "1", "--data.num_workers", "1",
    "--eval.num_steps", "3", "--eval.batch_size", "6", "--eval.max_prompts", "12", "--eval.freq", "2",
    "--checkpoint.enable", "true", "--checkpoint.interval", "1", "--metrics.image_log_freq", "1",
    "--metrics.enable_tensorboard", "false", "--reward.fns", "shapes_geneval=1.0",
]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("shapes") / "data", num_train=48, per_task=2, seed=1)


def run(out: Path, name: str, data: Path, *extra: str, steps: int = 3) -> list[dict]:
    assert train_main([*SHAPES, "--data.path", str(data), "--job.output_dir", str(out), "--job.run_name", name,
                       "--training.steps", str(steps), *extra]) == 0
    return [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data) -> dict[str, list[dict]]:
    out = tmp_path_factory.mktemp("runs")
    straight = run(out, "straight", data)
    run(out, "resumed", data, steps=2)
    resumed = run(out, "resumed", data)  # epochs 0-1 from the first launch, epoch 2 after the resume
    return {"out": out, "straight": straight, "resumed": resumed}


def epochs(metrics: list[dict]) -> list[dict]:
    return [m for m in metrics if "loss/fm" in m]


def test_supervised_training_learns_and_resumes_exactly(runs):
    straight, resumed = epochs(runs["straight"]), epochs(runs["resumed"])
    assert [m["step"] for m in straight] == [m["step"] for m in resumed] == [0, 1, 2]
    keys = ("loss/fm", "loss/total", "optim/grad_norm", "optim/global_step")
    assert [[m[k] for k in keys] for m in straight] == [[m[k] for k in keys] for m in resumed]
    assert straight[-1]["optim/global_step"] == 9  # 3 batches per epoch, one step each
    assert straight[-1]["loss/fm"] < straight[0]["loss/fm"]
    evals = [m for m in runs["straight"] if "eval/geneval/overall_strict" in m]
    assert [m["step"] for m in evals] == [0, 2] and evals[0]["eval/num_prompts"] == 12
    resumed_evals = [m for m in runs["resumed"] if "eval/geneval/overall_strict" in m]
    assert resumed_evals == [] or resumed_evals[-1]["eval/reward_avg"] == evals[-1]["eval/reward_avg"]


def test_captions_drop_at_the_configured_rate(data, tmp_path):
    from titan_flow.rl.algorithms.supervised import SupervisedFlowMatching

    algo = SupervisedFlowMatching.__new__(SupervisedFlowMatching)
    algo.cfg = build_job_config([*SHAPES, "--data.path", str(data), "--rl.caption_dropout", "0.3",
                                 "--sampling.negative_prompt", "blank"])
    algo.noise_generator = torch.Generator().manual_seed(0)
    kept = algo.drop_captions(["a circle"] * 4000)
    assert set(kept) == {"a circle", "blank"}
    assert abs(kept.count("blank") / 4000 - 0.3) < 4 * (0.3 * 0.7 / 4000) ** 0.5  # 4 standard errors
    algo.noise_generator = torch.Generator().manual_seed(0)
    assert algo.drop_captions(["a circle"] * 4000) == kept  # the rank's seeded stream: resumes identically


def test_bad_data_and_settings_fail_naming_the_field(data, tmp_path):
    with pytest.raises(ConfigError, match="set sampling.num_image_per_prompt = 1"):
        build_job_config([*SHAPES, "--sampling.num_image_per_prompt", "2"])
    with pytest.raises(ConfigError, match=r"rl.caption_dropout must be in \[0, 1\)"):
        build_job_config([*SHAPES, "--rl.caption_dropout", "1.0"])
    prompts_only = write_prompt_sets(tmp_path / "prompts", per_task=1)
    with pytest.raises(ValueError, match="needs an image path in the 'image' field"):
        run(tmp_path, "no_images", prompts_only, "--eval.freq", "0", steps=1)
    small = tmp_path / "small"
    shutil.copytree(data, small)
    for png in small.rglob("*.png"):  # the same records with 8 x 8 pictures
        Image.open(png).resize((8, 8)).save(png)
    with pytest.raises(ValueError, match=r"images are \[\(3, 8, 8\)\] \(C, H, W\) but the model trains at "
                       r"model.resolution = 16; resize the dataset to 16 x 16"):
        run(tmp_path, "wrong_size", small, "--eval.freq", "0", steps=1)


def test_export_writes_a_shapes_directory_and_evaluate_reproduces_the_runs_eval(runs, data, tmp_path):
    run_dir = runs["out"] / "straight"
    exported = export(run_dir, tmp_path / "exported", step=2)
    assert exported == tmp_path / "exported" and is_shapes_dir(exported)
    logged = next(m for m in runs["straight"] if m["step"] == 2 and "eval/reward_avg" in m)
    # the run's eval at epoch 2 used the EMA weights after 2 epochs = checkpoint step 2, and the same seeds
    for source in (["--run", str(run_dir), "--step", "2"], ["--pretrained_path", str(exported)]):
        out = tmp_path / source[0].strip("-")
        overrides = ["--data.path", str(data), "--reward.fns", "shapes_geneval=1.0", "--eval.num_steps", "3",
                     "--eval.batch_size", "6", "--eval.max_prompts", "12", "--job.seed", "42"]
        assert evaluate_main([*source, "--out", str(out), "--grid", "4", *overrides]) == 0
        results = json.loads((out / "results.json").read_text())
        assert results["scalars"]["eval/reward_avg"] == logged["eval/reward_avg"]
        assert results["scalars"]["eval/geneval/overall_strict"] == logged["eval/geneval/overall_strict"]
        assert (out / "grid.png").is_file() and "| task | strict accuracy | accuracy |" in (out / "results.md").read_text()
    # the sample CLI draws the exported model's pictures and one captioned grid (16 x 16 enlarged 8x, 4 px apart)
    prompts = ["a red circle", "two blue squares", "a green triangle"]
    assert sample_main(["--pretrained_path", str(exported), *[a for p in prompts for a in ("--prompt", p)],
                        "--steps", "3", "--out", str(tmp_path / "samples"), "--grid", str(tmp_path / "grid.png"),
                        "--grid_columns", "2"]) == 0
    assert len(list((tmp_path / "samples").glob("*.png"))) == 3
    grid = Image.open(tmp_path / "grid.png")
    assert grid.size == (2 * 128 + 4, 2 * (128 + 28))
