"""DCP checkpoints: exact resume, resharding across world sizes, interrupted saves, damaged files.

The multi-process tests run the real trainer under torchrun (gloo, CPU) on a tiny random SD3 with
the Fast SDE window on, so every stream that must continue exactly is in play: model, AdamW, EMA,
the sampler position, the window rng and each rank's SDE noise generator. They compare the files
the runs write: metrics.jsonl and the DCP checkpoints, read back with DCP's own converter.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from torch.distributed.checkpoint.stateful import Stateful

from titan_flow.checkpoint.manager import (
    MARKER,
    CheckpointError,
    CheckpointManager,
    ModelState,
    OptimizerState,
    complete_steps,
    step_dir,
)

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "--job.config_file", str(REPO / "train_configs" / "debug_cpu.toml"),  # the tiny random-init debug job
    "--model.resolution", "64", "--model.max_sequence_length", "16",
    "--sampling.num_steps", "6", "--sampling.num_image_per_prompt", "4", "--sampling.batch_size", "4",
    "--sampling.num_batches_per_epoch", "2", "--sampling.sde_window_size", "2", "--sampling.sde_window_range", "[0,5]",
    "--training.gradient_accumulation_steps", "2", "--training.ema_update_interval", "1",
    "--metrics.enable_tensorboard", "false", "--metrics.image_log_freq", "0",
    "--checkpoint.enable", "true", "--checkpoint.keep_latest_k", "0",
    "--eval.freq", "2", "--eval.num_steps", "4", "--eval.max_prompts", "8", "--eval.batch_size", "4",
]
EPOCHS = 4

# Runs the trainer, but the rank named by CRASH_RANK SIGKILLs itself right after its DCP files of
# step CRASH_STEP are written: the save is cut off before the COMPLETE marker.
CRASH_SCRIPT = """
import os, signal, sys
import torch.distributed.checkpoint as dcp
from titan_flow.train import main

real_save = dcp.save
def save(state_dict, *, checkpoint_id, **kw):
    out = real_save(state_dict, checkpoint_id=checkpoint_id, **kw)
    crash_here = checkpoint_id.endswith("step-%08d" % int(os.environ["CRASH_STEP"]))
    if crash_here and os.environ["RANK"] == os.environ["CRASH_RANK"]:
        os.kill(os.getpid(), signal.SIGKILL)
    return out
dcp.save = save
sys.exit(main(sys.argv[1:]))
"""

# Runs the trainer and, right after the checkpoint is loaded, saves the loaded state again with DCP
# at this world size to RESAVE_DIR: what the ranks hold after loading, to compare with what was saved.
RESAVE_SCRIPT = """
import os, sys
import torch.distributed.checkpoint as dcp
from titan_flow.checkpoint.manager import CheckpointManager
from titan_flow.train import main

real_load = CheckpointManager.load
def load(self, step):
    real_load(self, step)
    dcp.save(self.states, checkpoint_id=os.environ["RESAVE_DIR"])
CheckpointManager.load = load
sys.exit(main(sys.argv[1:]))
"""


def torchrun(nproc: int, args: list[str], script: str | None = None, env: dict | None = None, timeout: int = 240):
    target = [script] if script else ["-m", "titan_flow.train"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           *target, *args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)


def check(proc: subprocess.CompletedProcess) -> str:
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    return out


def run_args(out_dir: Path, run: str, *extra: str) -> list[str]:
    return [*TINY, "--job.output_dir", str(out_dir), "--job.run_name", run, "--training.steps", str(EPOCHS), *extra]


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def training_scalars(record: dict) -> dict:
    """Everything the math produces (losses, rewards, ratios, advantages, grad norm, eval); not timings."""
    return {k: v for k, v in record.items() if k != "time" and not k.startswith("perf/")}


def record_id(record: dict) -> tuple[int, str]:
    return record["step"], "eval" if any(k.startswith("eval/") for k in record) else "train"


def flat_checkpoint(path: Path, scratch: Path) -> dict:
    """Every value of a DCP checkpoint as one flat dict, read with DCP's own converter (no process group)."""
    out = scratch / f"{path.parent.parent.name}-{path.name}.pt"
    dcp_to_torch_save(str(path), str(out))

    def flatten(d, prefix=""):
        items = {}
        for k, v in d.items():
            if isinstance(v, dict):
                items.update(flatten(v, f"{prefix}{k}."))
            else:
                items[f"{prefix}{k}"] = v
        return items

    return flatten(torch.load(out, weights_only=False))


def assert_same_state(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    assert any(k.startswith("model.") for k in a) and any(k.startswith("ema.") for k in a)
    assert any(k.startswith("optimizer.state.") for k in a)
    for k in a:
        if torch.is_tensor(a[k]):
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), f"{k} differs"
        else:
            assert a[k] == b[k], f"{k}: {a[k]!r} != {b[k]!r}"


# --------------------------------------------------------------------------- multi-process runs


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return tmp_path_factory.mktemp("ckpt_runs")


@pytest.fixture(scope="module")
def straight(runs):
    """4 epochs at world size 2 in one go, checkpoints after epochs 2 and 4."""
    check(torchrun(2, run_args(runs, "straight", "--checkpoint.interval", "2")))
    return runs / "straight"


@pytest.fixture(scope="module")
def crashed(runs):
    """The same job with a checkpoint every epoch; rank 1 is SIGKILLed inside the save of step 3, then
    the job is started again with the same command line."""
    script = runs / "crash_in_save.py"
    script.write_text(CRASH_SCRIPT)
    args = run_args(runs, "crashed", "--checkpoint.interval", "1")
    first = torchrun(2, args, str(script), env={"CRASH_STEP": "3", "CRASH_RANK": "1"})
    folder = runs / "crashed" / "checkpoint"
    after_crash = {
        "returncode": first.returncode,
        "complete": complete_steps(folder),
        "step3_files": sorted(p.name for p in step_dir(folder, 3).iterdir()),
    }
    restart = check(torchrun(2, args))
    return runs / "crashed", after_crash, restart


def test_resume_after_kill_is_bitwise(straight, crashed, runs):
    """Killed after epoch 3's rollout and restarted from step 2: every logged scalar of every epoch and
    the final model, AdamW, EMA, sampler and window-rng state equal the uninterrupted run bit for bit."""
    crashed_dir, _, _ = crashed
    reference = {record_id(r): training_scalars(r) for r in read_metrics(straight)}
    assert sorted(reference) == [(0, "eval"), (0, "train"), (1, "train"), (2, "eval"), (2, "train"), (3, "train")]
    records = read_metrics(crashed_dir)
    # The first attempt logged epochs 0-2 (eval at 0 and 2) before dying in the save of step 3; the
    # restart logged epoch 2 (with its eval, on the restored EMA weights) and epoch 3.
    first = [(0, "eval"), (0, "train"), (1, "train"), (2, "eval"), (2, "train")]
    restart = [(2, "eval"), (2, "train"), (3, "train")]
    assert [record_id(r) for r in records] == first + restart
    for r in records:
        assert training_scalars(r) == reference[record_id(r)], f"{record_id(r)} differs"
    assert reference[3, "train"]["loss/total"] != reference[2, "train"]["loss/total"]  # the epochs really differ
    assert reference[2, "eval"] != reference[0, "eval"]
    final_ref = flat_checkpoint(step_dir(straight / "checkpoint", EPOCHS), runs)
    final = flat_checkpoint(step_dir(crashed_dir / "checkpoint", EPOCHS), runs)
    assert_same_state(final_ref, final)
    assert final["train.algorithm.global_step"] == EPOCHS and final["train.data._index_sampler_state.counter"] == 2 * EPOCHS
    # The EMA moved away from the weights (so it was really trained and restored, not just copied).
    name = next(k for k in final if k.startswith("model.") and k.endswith("proj_out.weight"))
    shadow = [v for k, v in final.items() if k.startswith("ema.") and v.shape == final[name].shape]
    assert shadow and all(not torch.equal(s, final[name].float()) for s in shadow)


def test_kill_mid_save_resumes_from_last_complete(crashed):
    crashed_dir, after_crash, restart = crashed
    assert after_crash["returncode"] != 0
    assert after_crash["complete"] == [1, 2]
    # The killed save had written data files but never its marker, so it did not count as complete.
    assert any(name.endswith(".distcp") for name in after_crash["step3_files"])
    assert MARKER not in after_crash["step3_files"]
    assert f"resumed from {step_dir(crashed_dir / 'checkpoint', 2)}" in restart
    # The restart saved step 3 again (replacing the interrupted folder) and then step 4.
    assert complete_steps(crashed_dir / "checkpoint") == [1, 2, 3, 4]


def resume_and_resave(runs: Path, source: Path, step: int, run: str, nproc: int) -> tuple[Path, str]:
    """Step `step` of `source` copied into a fresh run, resumed at world size `nproc` for one epoch; the
    state right after loading is saved again at that size. Returns (the DCP folder of that resave, output)."""
    folder = runs / run / "checkpoint"
    folder.mkdir(parents=True)
    shutil.copytree(step_dir(source, step), step_dir(folder, step))
    script = runs / "resave_after_load.py"
    script.write_text(RESAVE_SCRIPT)
    resaved = runs / f"resaved_{run}"
    args = [*run_args(runs, run, "--checkpoint.interval", "1"), "--training.steps", str(step + 1)]
    out = check(torchrun(nproc, args, str(script), env={"RESAVE_DIR": str(resaved)}))
    assert f"resumed from {step_dir(folder, step)}" in out
    train_records = [r for r in read_metrics(runs / run) if record_id(r)[1] == "train"]
    assert [r["step"] for r in train_records] == [step]
    assert math.isfinite(train_records[0]["loss/total"]) and train_records[0]["optim/global_step"] == step + 1
    assert complete_steps(folder) == [step, step + 1]
    return resaved, out


@pytest.fixture(scope="module")
def resumed_ws1(straight, runs):
    """Step 2 of the world-size-2 run resumed in one process (no FSDP2 there: distributed/parallelize.py
    fsdp_is_a_no_op), which writes step 3 with plain tensors."""
    return resume_and_resave(runs, straight / "checkpoint", 2, "resumed_ws1", 1)[0]


def test_reshard_from_world_size_2(straight, runs, resumed_ws1):
    """A world-size-2 checkpoint (FSDP2 shards) loads at world size 1 (a plain module): the state after
    loading, saved again at the new size, equals what was saved, and training goes on from there."""
    assert_same_state(flat_checkpoint(step_dir(straight / "checkpoint", 2), runs), flat_checkpoint(resumed_ws1, runs))


def test_reshard_from_world_size_1(runs, resumed_ws1):
    """And back: the step a single process wrote (plain tensors) loads into FSDP2's shards at world size 2."""
    written_ws1 = step_dir(runs / "resumed_ws1" / "checkpoint", 3)
    resaved, _ = resume_and_resave(runs, runs / "resumed_ws1" / "checkpoint", 3, "resumed_ws2_from_ws1", 2)
    assert_same_state(flat_checkpoint(written_ws1, runs), flat_checkpoint(resaved, runs))


@pytest.mark.slow
def test_reshard_from_world_size_2_to_4(straight, runs):
    resaved, _ = resume_and_resave(runs, straight / "checkpoint", 2, "resumed_ws4", 4)
    assert_same_state(flat_checkpoint(step_dir(straight / "checkpoint", 2), runs), flat_checkpoint(resaved, runs))


# --------------------------------------------------------------------------- the manager in-process


class Counter(Stateful):
    def __init__(self):
        self.value = 0

    def state_dict(self):
        return {"value": self.value}

    def load_state_dict(self, sd):
        self.value = sd["value"]


@pytest.fixture
def pg():
    """A one-rank gloo process group, as the trainer has even without torchrun."""
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)
    yield
    if created:
        dist.destroy_process_group()


def make_states(seed: int = 0, out_features: int = 3):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, out_features))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(2, 4)).square().sum().backward()
    optimizer.step()
    counter = Counter()
    states = {"model": ModelState(model), "optimizer": OptimizerState(model, optimizer), "train": counter}
    return model, optimizer, states


def manager(folder, states, generator=None, **kw):
    opts = dict(interval=1, keep_latest_k=0, async_save=False) | kw
    return CheckpointManager(folder, states, {"noise": generator or torch.Generator().manual_seed(7)}, **opts)


def test_save_load_restores_state_and_every_rng(pg, tmp_path):
    import random

    import numpy as np

    model, optimizer, states = make_states()
    gen = torch.Generator().manual_seed(3)
    states["train"].value = 5
    ckpt = manager(tmp_path, states, gen)
    ckpt.save(5)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    draws = (torch.rand(3), random.random(), np.random.rand(), torch.rand(3, generator=gen))
    # Move everything on, then load.
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    states["train"].value = 9
    ckpt.load(ckpt.resolve_step(-1))
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())
    assert states["train"].value == 5
    again = (torch.rand(3), random.random(), np.random.rand(), torch.rand(3, generator=gen))
    assert torch.equal(draws[0], again[0]) and draws[1:3] == again[1:3] and torch.equal(draws[3], again[3])
    manifest = json.loads((step_dir(tmp_path, 5) / MARKER).read_text())
    assert manifest["step"] == 5 and {".metadata", "rank_0.pt"} <= set(manifest["files"])


def test_async_save_is_complete_only_after_wait(pg, tmp_path):
    model, _, states = make_states()
    ckpt = manager(tmp_path, states, async_save=True)
    ckpt.save(1)
    assert complete_steps(tmp_path) == []  # the marker is written by wait(), after the writes finished
    ckpt.close()
    assert complete_steps(tmp_path) == [1]
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    ckpt.load(1)
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())


def test_keep_latest_k_and_resave_of_an_interrupted_step(pg, tmp_path):
    _, _, states = make_states()
    ckpt = manager(tmp_path, states, keep_latest_k=2)
    for step in (1, 2, 3):
        ckpt.save(step)
    assert complete_steps(tmp_path) == [2, 3] and not step_dir(tmp_path, 1).exists()
    # An interrupted save of step 4 (files, no marker) is skipped by resume and replaced by the next save.
    step_dir(tmp_path, 4).mkdir()
    (step_dir(tmp_path, 4) / "__7_0.distcp").write_bytes(b"half")
    assert ckpt.resolve_step(-1) == 3
    ckpt.save(4)
    assert complete_steps(tmp_path) == [3, 4]
    assert not (step_dir(tmp_path, 4) / "__7_0.distcp").exists()


def test_load_step_missing_or_incomplete_is_a_clear_error(pg, tmp_path):
    _, _, states = make_states()
    ckpt = manager(tmp_path, states)
    ckpt.save(2)
    missing = r"load_step 7: .*step-00000007 does not exist; complete checkpoints in .*: \[2\]"
    with pytest.raises(CheckpointError, match=missing):
        ckpt.resolve_step(7)
    step_dir(tmp_path, 3).mkdir()
    interrupted = r"load_step 3: .*step-00000003 has no COMPLETE marker \(its save was interrupted\)"
    with pytest.raises(CheckpointError, match=interrupted):
        ckpt.resolve_step(3)
    assert ckpt.resolve_step(-1) == 2
    assert manager(tmp_path / "empty", states).resolve_step(-1) is None


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete", "marker"])
def test_damaged_checkpoint_is_a_clear_error(pg, tmp_path, damage):
    _, _, states = make_states()
    ckpt = manager(tmp_path, states)
    ckpt.save(1)
    path = step_dir(tmp_path, 1)
    data = next(path.glob("*.distcp"))
    if damage == "truncate":
        data.write_bytes(data.read_bytes()[:100])
        expected = rf"{data.name} has 100 bytes, \d+ were written"
    elif damage == "flip":
        raw = bytearray(data.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        data.write_bytes(bytes(raw))
        expected = rf"{data.name} has changed since it was written \(CRC-32 mismatch\)"
    elif damage == "delete":
        data.unlink()
        expected = rf"{data.name} is missing"
    else:
        (path / MARKER).write_text("{not json")
        expected = "its COMPLETE marker is unreadable"
    with pytest.raises(CheckpointError, match=rf"checkpoint .*step-00000001 is damaged: .*{expected}"):
        ckpt.load(1)


def test_checkpoint_of_another_model_is_a_clear_error(pg, tmp_path):
    _, _, states = make_states(out_features=3)
    manager(tmp_path, states).save(1)
    _, _, other = make_states(out_features=5)
    with pytest.raises(CheckpointError, match=r"could not load checkpoint .*step-00000001: .*same model"):
        manager(tmp_path, other).load(1)


def test_bad_settings_name_the_field(tmp_path):
    with pytest.raises(ValueError, match="checkpoint.interval must be >= 1"):
        manager(tmp_path, {}, interval=0)
    with pytest.raises(ValueError, match="checkpoint.keep_latest_k must be >= 0"):
        manager(tmp_path, {}, keep_latest_k=-1)


def test_plain_dcp_round_trip_needs_no_process_group(tmp_path):
    """What export and sampling rely on: a checkpoint reads back in a single process without torchrun."""
    model, _, states = make_states()
    dcp.save({"model": states["model"]}, checkpoint_id=str(tmp_path / "c"), no_dist=True)
    flat = flat_checkpoint(tmp_path / "c", tmp_path)
    assert all(torch.equal(flat[f"model.{k}"], v) for k, v in model.state_dict().items())


def test_a_parameter_that_never_gets_a_gradient_still_resumes(tmp_path):
    """Qwen-Image's last block has outputs that feed nothing: AdamW never creates their state, yet a fresh
    optimizer's load template (DCP initialises every parameter) expects it. The saved state has it."""
    torch.manual_seed(0)

    def build():
        model = torch.nn.ModuleDict({"used": torch.nn.Linear(3, 3), "unused": torch.nn.Linear(3, 3)})
        return model, torch.optim.AdamW(model.parameters(), lr=1e-2)

    model, optimizer = build()
    model["used"](torch.randn(4, 3)).square().sum().backward()
    optimizer.step()
    dcp.save({"optimizer": OptimizerState(model, optimizer)}, checkpoint_id=str(tmp_path / "c"), no_dist=True)
    fresh_model, fresh_optimizer = build()
    fresh_model.load_state_dict(model.state_dict())
    dcp.load({"optimizer": OptimizerState(fresh_model, fresh_optimizer)}, checkpoint_id=str(tmp_path / "c"),
             no_dist=True)
    for name, p in model.named_parameters():
        saved, loaded = optimizer.state[p], fresh_optimizer.state[dict(fresh_model.named_parameters())[name]]
        assert all(torch.equal(saved[k], loaded[k]) for k in ("step", "exp_avg", "exp_avg_sq")), name
        assert saved["step"].item() == (1.0 if name.startswith("used") else 0.0)


@pytest.mark.slow
def test_online_dpo_resume_keeps_the_moving_reference(runs):
    """Online DPO's reference follows the policy (synced before epoch 2 here, at optimizer step 4): a
    resume from step 3 must restore that moved reference and its sync step, not rebuild the initial one."""
    dpo = ["--rl.algorithm", "online_dpo", "--rl.ref_update_interval", "3", "--training.gradient_accumulation_steps",
           "1", "--eval.freq", "0", "--checkpoint.interval", "1"]
    check(torchrun(2, run_args(runs, "dpo_straight", *dpo)))
    folder = runs / "dpo_resumed" / "checkpoint"
    folder.mkdir(parents=True)
    shutil.copytree(step_dir(runs / "dpo_straight" / "checkpoint", 3), step_dir(folder, 3))
    check(torchrun(2, run_args(runs, "dpo_resumed", *dpo)))
    saved = flat_checkpoint(step_dir(runs / "dpo_straight" / "checkpoint", 3), runs)
    assert saved["train.algorithm.ref_synced_step"] == 4
    ref = next(k for k in saved if k.startswith("reference.") and k.endswith("proj_out.weight"))
    assert not torch.equal(saved[ref], saved["model." + ref[len("reference."):]])  # the reference lags the policy
    final = [flat_checkpoint(step_dir(runs / r / "checkpoint", EPOCHS), runs) for r in ("dpo_straight", "dpo_resumed")]
    assert_same_state(*final)
    straight = {r["step"]: training_scalars(r) for r in read_metrics(runs / "dpo_straight")}
    (resumed,) = read_metrics(runs / "dpo_resumed")
    assert training_scalars(resumed) == straight[3]
