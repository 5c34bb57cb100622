"""A diverging run stops loudly (or skips the bad step) and never writes a poisoned checkpoint.

Unit tests of the guard and the checkpoint manager, then the trainer under torchrun (2 gloo ranks,
the tiny SD3): lr = 1e6, a reward function that returns NaN on one rank, and a NaN gradient.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from titan_flow.checkpoint.manager import CheckpointError, CheckpointManager, ModelState, complete_steps, step_dir
from titan_flow.rl.guard import NonFiniteError, NonFiniteGuard

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "--model.resolution", "32", "--model.max_sequence_length", "8", "--sampling.num_steps", "3",
    "--sampling.num_image_per_prompt", "2", "--sampling.batch_size", "2", "--training.ema_update_interval", "1",
    "--metrics.enable_tensorboard", "false", "--metrics.image_log_freq", "0", "--eval.freq", "0",
    "--checkpoint.interval", "1", "--checkpoint.keep_latest_k", "2", "--training.kernel_backend", "torch",
]
NAN = float("nan")


# ------------------------------------------------------------------------------------------ units
def test_guard_passes_finite_values_and_stops_naming_the_nonfinite_one():
    guard = NonFiniteGuard("stop", 3, rank=0, device=torch.device("cpu"), last_good=lambda: "ckpt/step-00000004")
    guard.check("loss", torch.tensor([1.0, 2.0]))
    assert guard.decide(5, "optimizer step 1") is False
    guard.check("loss", torch.tensor([1.0, 2.0]))
    guard.check("reward 'ocr'", torch.tensor([0.5, NAN, 0.1]), lambda: "prompts: 'b'")
    with pytest.raises(NonFiniteError) as err:
        guard.decide(5, "rollouts and rewards")
    text = str(err.value)
    assert "non-finite values at epoch 5 (rollouts and rewards)" in text
    assert "rank 0: reward 'ocr': 1 of 3 values nan, prompts: 'b'" in text and "loss" not in text.split("\n")[1]
    assert "ckpt/step-00000004" in text and "training.on_nonfinite = 'skip'" in text


def test_guard_skips_counts_and_gives_up_on_a_diverging_run():
    guard = NonFiniteGuard("skip", 2, rank=0, device=torch.device("cpu"))
    for expected_in_a_row in (1, 2):
        guard.check("gradient norm", torch.tensor(float("inf")))
        assert guard.decide(0, "optimizer step 1") is True
        assert guard.consecutive_skips == expected_in_a_row
    guard.passed()  # an update went through
    guard.check("gradient norm", torch.tensor(NAN))
    assert guard.decide(1, "optimizer step 2") is True and guard.total_skips == 3
    guard.check("gradient norm", torch.tensor(NAN))
    guard.decide(1, "optimizer step 2")
    guard.check("gradient norm", torch.tensor(NAN))
    with pytest.raises(NonFiniteError, match="3 skips in a row"):
        guard.decide(1, "optimizer step 2")
    # Weights that went non-finite in an update cannot be skipped: the update is applied.
    guard = NonFiniteGuard("skip", 5, rank=0, device=torch.device("cpu"))
    guard.check("weights after the update", [torch.ones(3), torch.tensor([1.0, NAN])], skippable=False)
    with pytest.raises(NonFiniteError, match="weights after the update: 1 of 5 values nan"):
        guard.decide(2, "after the updates")


def test_checkpoint_manager_refuses_nonfinite_state_and_keeps_the_good_ones(tmp_path):
    model = torch.nn.Linear(3, 2)
    ckpt = CheckpointManager(tmp_path, {"model": ModelState(model)}, {}, interval=1, keep_latest_k=1,
                             async_save=False)
    ckpt.save(1)
    with torch.no_grad():
        model.weight[0, 1] = float("inf")
    with pytest.raises(CheckpointError, match=r"refusing to save step 2: non-finite values in model.weight \(rank 0\)"
                                              r".*Nothing was written or purged; the last good checkpoint is .*step-00000001"):
        ckpt.save(2)
    assert complete_steps(tmp_path) == [1] and not step_dir(tmp_path, 2).exists()


# ------------------------------------------------------------------------------- under torchrun
# The trainer, with a reward `jpeg_nan` (JPEG compressibility) that scores NaN for the images of rank
# NAN_RANK in the rollout call NAN_CALL (counted from 0 on that rank), and, with GRAD_NAN_STEP set, a NaN
# written (once) into rank 1's gradient shard before optimizer step GRAD_NAN_STEP.
SCRIPT = """
import os, sys
import torch
from titan_flow.rewards.jpeg import JpegCompressibility
from titan_flow.rewards.registry import register_reward
from titan_flow.rl.algorithms.base import OnlineAlgorithm
from titan_flow.train import main

@register_reward
class JpegNaN(JpegCompressibility):
    name = "jpeg_nan"
    calls = 0

    def __call__(self, images, prompts, metadata, ref_images=None, only_strict=True):
        out = super().__call__(images, prompts, metadata)
        if os.environ["RANK"] == os.environ.get("NAN_RANK") and JpegNaN.calls == int(os.environ["NAN_CALL"]):
            out["score"][1:] = float("nan")
        JpegNaN.calls += 1
        return out

real_step = OnlineAlgorithm.optimizer_step
injected = []
def optimizer_step(self, epoch, losses):
    if os.environ["RANK"] == "1" and self.global_step + 1 == int(os.environ.get("GRAD_NAN_STEP", -1)) and not injected:
        injected.append(1)
        grad = next(p.grad for p in self.trainable if p.grad is not None and p.grad.to_local().numel())
        grad.to_local().view(-1)[0] = float("nan")
    return real_step(self, epoch, losses)
OnlineAlgorithm.optimizer_step = optimizer_step
sys.exit(main(sys.argv[1:]))
"""


def torchrun(out: Path, run: str, *args: str, env: dict | None = None, script: bool = True):
    target = [str(out / "inject.py")] if script else ["-m", "titan_flow.train"]
    (out / "inject.py").write_text(SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *target, *TINY,
           "--job.output_dir", str(out), "--job.run_name", run, *args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **(env or {})}
    proc = subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=400)
    return proc, proc.stdout + proc.stderr


def epochs(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [m for m in map(json.loads, lines) if "nonfinite/total_skips" in m or "nonfinite/skipped" in m]


def state_at(run_dir: Path, step: int, scratch: Path) -> dict:
    out = scratch / f"{run_dir.name}-{step}.pt"
    dcp_to_torch_save(str(step_dir(run_dir / "checkpoint", step)), str(out))
    return torch.load(out, weights_only=False)


def all_finite(state) -> bool:
    if isinstance(state, dict):
        return all(all_finite(v) for v in state.values())
    return not isinstance(state, torch.Tensor) or not state.is_floating_point() or bool(torch.isfinite(state).all())


def test_a_diverging_run_stops_within_an_epoch_and_keeps_its_good_checkpoints(tmp_path):
    """lr = 1e6: the first update throws the weights far out, the next epoch's values are NaN. The job
    stops at that epoch on both ranks, naming it, and the newest checkpoints are the good ones."""
    proc, out = torchrun(tmp_path, "lr", "--training.steps", "6", "--optimizer.lr", "1e6", script=False)
    assert proc.returncode != 0
    assert "NonFiniteError: non-finite values at epoch 1" in out, out[-4000:]
    assert all(f"rank {r}:" in out for r in (0, 1))  # every rank saw it: a shared model diverges everywhere
    steps = complete_steps(tmp_path / "lr" / "checkpoint")
    assert steps == [1]  # saved after epoch 0; nothing after the NaN
    assert f"the last good one: {step_dir(tmp_path / 'lr' / 'checkpoint', 1)}" in out
    assert all_finite(state_at(tmp_path / "lr", 1, tmp_path))


def test_a_nan_reward_on_one_rank_stops_all_ranks_naming_the_function_and_the_resume_goes_on(tmp_path):
    args = ["--training.steps", "4", "--reward.fns", "jpeg_nan=1.0"]
    proc, out = torchrun(tmp_path, "reward", *args, env={"NAN_RANK": "1", "NAN_CALL": "2"})
    assert proc.returncode != 0, out[-4000:]
    assert "non-finite values at epoch 2 (rollouts and rewards)" in out
    assert "rank 1: reward 'jpeg_nan' (round 0): 1 of 2 values nan, prompts: '" in out
    assert "rank 0: reward" not in out
    assert complete_steps(tmp_path / "reward" / "checkpoint") == [1, 2]
    # The same command again (the bad batch does not come back): resumes from step 2, no cleanup needed.
    proc, out = torchrun(tmp_path, "reward", *args, env={"NAN_CALL": "-1"})
    assert proc.returncode == 0, out[-4000:]
    assert "resumed from" in out and "step-00000002" in out
    assert [m["step"] for m in epochs(tmp_path / "reward")] == [0, 1, 2, 3]


def weights(state: dict) -> dict:
    return {k: v for k, v in state.items() if k in ("model", "optimizer", "ema")}


def assert_same(a, b, path=""):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), path
    else:
        assert a == b, path


@pytest.mark.parametrize("inject", ["reward", "gradient"])
def test_skip_mode_drops_the_bad_batch_and_trains_on(tmp_path, inject):
    """A NaN reward skips that epoch's training, a NaN gradient that optimizer step: the weights, AdamW
    and EMA after it are bitwise those before it (the run without that update), and training goes on."""
    env = {"NAN_RANK": "1", "NAN_CALL": "1"} if inject == "reward" else {"NAN_CALL": "-1", "GRAD_NAN_STEP": "2"}
    proc, out = torchrun(tmp_path, "skip", "--training.steps", "4", "--reward.fns", "jpeg_nan=1.0",
                         "--training.on_nonfinite", "skip", "--checkpoint.keep_latest_k", "0", env=env)
    assert proc.returncode == 0, out[-4000:]
    assert "Skipped (training.on_nonfinite = 'skip'; 1 in a row, 1 in this run)" in out
    run = tmp_path / "skip"
    logged = epochs(run)
    assert [m["step"] for m in logged] == [0, 1, 2, 3]
    assert [m["nonfinite/total_skips"] for m in logged if "nonfinite/total_skips" in m][-1] == 1.0
    before, after, later = (weights(state_at(run, s, tmp_path)) for s in (1, 2, 3))
    assert_same(before, after)  # epoch 1's update was dropped
    trained = next(k for k in later["model"] if k.endswith("proj_out.weight"))
    assert all_finite(later) and not torch.equal(later["model"][trained], after["model"][trained])
    assert logged[2]["optim/global_step"] == 2  # one update per epoch, one of them skipped


def test_skip_mode_gives_up_when_every_batch_is_bad(tmp_path):
    proc, out = torchrun(tmp_path, "diverge", "--training.steps", "6", "--optimizer.lr", "1e6",
                         "--training.on_nonfinite", "skip", "--training.max_nonfinite_skips", "2", script=False)
    assert proc.returncode != 0
    assert "3 skips in a row (training.max_nonfinite_skips = 2)" in out, out[-4000:]
    assert complete_steps(tmp_path / "diverge" / "checkpoint")[-1] <= 3  # no save after the NaN epochs
