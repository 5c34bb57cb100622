"""The debug FLUX and the debug FLUX.1-Kontext under the real trainer and torchrun (gloo, CPU): on-policy
GRPO's importance ratio is exactly 1 at 1 and 2 ranks, and the Kontext debug job (train_configs/
flux_kontext_debug_cpu.toml: edits of the built-in counting-edit set, source images drawn in 2 loader
workers per rank) killed in the middle of a checkpoint and restarted ends bitwise where a straight run
ends, the data loader's position included."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_checkpoint import CRASH_SCRIPT, assert_same_state, flat_checkpoint, record_id, training_scalars

from titan_flow.checkpoint.manager import complete_steps, step_dir

REPO = Path(__file__).resolve().parents[1]
KONTEXT_DEBUG = REPO / "train_configs" / "flux_kontext_debug_cpu.toml"
TINY = [
    "--model.name", "flux", "--model.resolution", "64", "--model.max_sequence_length", "16",
    "--sampling.num_steps", "4", "--sampling.num_image_per_prompt", "4", "--sampling.batch_size", "4",
    "--sampling.num_batches_per_epoch", "1", "--sampling.guidance_scale", "3.5", "--sampling.noise_level", "0.9",
    "--training.gradient_accumulation_steps", "1", "--training.ema_update_interval", "1",
    "--metrics.enable_tensorboard", "false", "--metrics.image_log_freq", "0", "--checkpoint.enable", "false",
    "--eval.freq", "0", "--reward.fns", "jpeg_compressibility=1.0",
]


def torchrun(nproc: int, args: list[str], timeout: int = 600, script: str | None = None,
             env: dict | None = None) -> subprocess.CompletedProcess:
    target = [script] if script else ["-m", "titan_flow.train"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), *target, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_on_policy(epochs: list[dict], trained_steps: list[int]) -> None:
    for m in epochs:  # one sampling round, one update per epoch: training re-scores its own rollouts
        assert m["ratio/min"] == 1.0 and m["ratio/max"] == 1.0 and m["loss/approx_kl"] == 0.0, m["step"]
        assert sorted(int(k.split("/")[1].split("_")[0]) for k in m if k.startswith("ratio_per_step/")
                      and k.endswith("_mean")) == trained_steps


# (ranks, family): the text-to-image debug FLUX at 1 and 2 ranks, the debug Kontext at 1 rank (its 2-rank run
# is the resume test's straight run below).
@pytest.mark.parametrize(("nproc", "flavor"), [(1, "debug"), (2, "debug"), (1, "kontext-debug")])
def test_grpo_on_the_debug_flux_is_on_policy(tmp_path, nproc, flavor):
    data = ["--data.path", "builtin:counting_edit"] if flavor == "kontext-debug" else []
    proc = torchrun(nproc, [*TINY, "--model.flavor", flavor, *data, "--training.steps", "2",
                            "--job.output_dir", str(tmp_path), "--job.run_name", "run"])
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    epochs = read_metrics(tmp_path / "run")
    assert [m["step"] for m in epochs] == [0, 1]
    assert_on_policy(epochs, [0, 1, 2])  # floor(4 x 0.99) trained steps
    assert epochs[0]["optim/grad_norm"] > 0


# --------------------------------------------------------------------------- Kontext: kill and resume

EPOCHS = 4
RESUME = ["--training.steps", str(EPOCHS), "--eval.freq", "2", "--eval.max_prompts", "4", "--metrics.image_log_freq", "2",
          "--checkpoint.keep_latest_k", "0"]


def kill_in_save_and_restart(out: Path, base: list[str]) -> tuple[tuple[int, list[int]], str]:
    """A job (`base`: its config, output folder and 4 epochs) at 2 ranks, straight through (checkpoints after
    epochs 2 and 4, run "straight"), and with a checkpoint every epoch where rank 1 is SIGKILLed inside the
    save of step 3, then started again (run "crashed"). Returns (the killed run's exit code and complete
    checkpoints, the restart's log)."""
    straight = torchrun(2, [*base, "--job.run_name", "straight", "--checkpoint.interval", "2"])
    assert straight.returncode == 0, (straight.stdout + straight.stderr)[-6000:]
    script = out / "crash_in_save.py"
    script.write_text(CRASH_SCRIPT)
    crashed = [*base, "--job.run_name", "crashed", "--checkpoint.interval", "1"]
    first = torchrun(2, crashed, script=str(script), env={"CRASH_STEP": "3", "CRASH_RANK": "1"})
    after_crash = (first.returncode, complete_steps(out / "crashed" / "checkpoint"))
    restart = torchrun(2, crashed)
    assert restart.returncode == 0, (restart.stdout + restart.stderr)[-6000:]
    return after_crash, restart.stdout + restart.stderr


def assert_restart_matches_straight(out: Path, after_crash: tuple[int, list[int]], log: str) -> dict:
    """The killed save never counted, the restart resumed from step 2, logged what the straight run logged
    (evals every 2 epochs, 5 trained SDE steps on policy) and saved the same final state, bit for bit
    (weights, AdamW, EMA, counters, window rng and the loader's position). Returns that final state."""
    returncode, complete = after_crash
    assert returncode != 0 and complete == [1, 2]
    assert f"resumed from {step_dir(out / 'crashed' / 'checkpoint', 2)}" in log
    reference = {record_id(r): training_scalars(r) for r in read_metrics(out / "straight")}
    assert sorted(reference) == [(0, "eval"), (0, "train"), (1, "train"), (2, "eval"), (2, "train"), (3, "train")]
    assert_on_policy([r for k, r in reference.items() if k[1] == "train"], [0, 1, 2, 3, 4])  # 2 ranks, edits
    records = read_metrics(out / "crashed")
    restarted = [(2, "eval"), (2, "train"), (3, "train")]
    assert [record_id(r) for r in records][-3:] == restarted
    for r in records:
        assert training_scalars(r) == reference[record_id(r)], f"{record_id(r)} differs"
    assert reference[3, "train"]["reward/avg_mean"] != reference[2, "train"]["reward/avg_mean"]  # other edits
    final_ref = flat_checkpoint(step_dir(out / "straight" / "checkpoint", EPOCHS), out)
    final = flat_checkpoint(step_dir(out / "crashed" / "checkpoint", EPOCHS), out)
    assert_same_state(final_ref, final)
    return final


@pytest.fixture(scope="module")
def kontext_runs(tmp_path_factory):
    """The Kontext debug job killed in a save and restarted, beside a straight run (kill_in_save_and_restart)."""
    out = tmp_path_factory.mktemp("kontext_runs")
    after_crash, log = kill_in_save_and_restart(out, ["--job.config_file", str(KONTEXT_DEBUG),
                                                      "--job.output_dir", str(out), *RESUME])
    return out, after_crash, log


def test_kontext_resume_after_kill_is_bitwise(kontext_runs):
    final = assert_restart_matches_straight(*kontext_runs)
    # The loader (2 workers) handed out 4 batches: its sampler resumes on round 4 and its workers' RNG is kept.
    loader = "train.data._snapshot._main_snapshot."
    assert (final[loader + "_index_sampler_state.counter"], final[loader + "_num_workers"]) == (EPOCHS, 2)
    assert final["train.data._snapshot._snapshot_step"] == EPOCHS


def test_kontext_grids_show_source_beside_edit(kontext_runs):
    out, _, _ = kontext_runs
    (events,) = (out / "straight" / "tb").glob("events.out.tfevents.*")
    acc = EventAccumulator(str(events), size_guidance={"images": 0}).Reload()
    # [source | edit] tiles of 64 x 128 pixels with a 28-pixel caption strip: 4 rollout edits of rank 0, and
    # the 2 of the 4 eval edits that rank 0 made
    for tag, tiles in (("rollout/images", 4), ("eval/images", 2)):
        first = acc.Images(tag)[0]
        assert (first.width, first.height) == (tiles * 128, 64 + 28), (tag, first.width, first.height)
