"""DCP checkpoints that resume exactly, reshard across world sizes, and are never half-written.

Layout of one checkpoint, `<run>/<folder>/step-00000010/`:
- the DCP files (`.metadata`, `__<rank>_<n>.distcp`) of everything that is the same on every rank
  or sharded across ranks: model, optimizer, EMA, sampler position, step counters;
- `rank_<r>.pt`, that rank's RNG streams (torch, CUDA, python, numpy, the SDE noise generator);
- `COMPLETE`, a JSON manifest (size and CRC-32 of every other file) written last, atomically, by
  rank 0 once every rank has finished writing.

A folder without the marker is an interrupted save: resume skips it and a new save of that step
replaces it. A state holding a NaN or an infinity is never saved (every rank checks its shards and
the ranks agree), so an older good checkpoint is never purged for a poisoned one and resume always
finds a good one. Loading checks the manifest first (each rank checks a share of the files), so a
truncated, missing or altered file fails with its name instead of loading garbage.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import zlib
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful

logger = logging.getLogger("titan_flow")

MARKER = "COMPLETE"
STEP_PREFIX = "step-"


class CheckpointError(RuntimeError):
    pass


class ModelState(Stateful):
    def __init__(self, model: torch.nn.Module):
        self.model = model

    def state_dict(self):
        return get_model_state_dict(self.model)

    def load_state_dict(self, sd):
        set_model_state_dict(self.model, sd, options=StateDictOptions(strict=True))


class OptimizerState(Stateful):
    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        self.model, self.optimizer = model, optimizer

    def state_dict(self):
        self.give_every_parameter_a_state()
        return get_optimizer_state_dict(self.model, self.optimizer)

    def give_every_parameter_a_state(self) -> None:
        """AdamW creates a parameter's state at its first gradient, so a trainable parameter that never gets
        one (Qwen-Image's last block: its text-stream output feeds nothing) would be absent from the saved
        state, while the load template of a fresh optimizer (DCP initialises every parameter) expects it.
        Such parameters get AdamW's own initial state, which no step reads while their gradient is None."""
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                if p.requires_grad and p not in self.optimizer.state:
                    on_device = group.get("fused") or group.get("capturable")
                    self.optimizer.state[p] = {
                        "step": torch.zeros((), dtype=torch.float32, device=p.device if on_device else "cpu"),
                        "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                        "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
                    }

    def load_state_dict(self, sd):
        set_optimizer_state_dict(self.model, self.optimizer, sd)


def capture_rng(generators: dict[str, torch.Generator]) -> dict[str, Any]:
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "generators": {k: g.get_state() for k, g in generators.items()},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any], generators: dict[str, torch.Generator]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for k, g in generators.items():
        g.set_state(state["generators"][k])


def step_dir(root: Path, step: int) -> Path:
    return Path(root) / f"{STEP_PREFIX}{step:08d}"


def complete_steps(root: Path) -> list[int]:
    """Steps whose checkpoint folder has its COMPLETE marker, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    steps = []
    for d in root.iterdir():
        if d.is_dir() and d.name.startswith(STEP_PREFIX) and d.name[len(STEP_PREFIX) :].isdigit():
            if (d / MARKER).exists():
                steps.append(int(d.name[len(STEP_PREFIX) :]))
    return sorted(steps)


def _world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _gather(obj) -> list:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _crc32(path: Path) -> int:
    crc = 0
    with path.open("rb") as f:
        while chunk := f.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return crc


def _nonfinite_entries(states: dict[str, Stateful]) -> list[str]:
    """Names of the (local shards of) tensors in the states' state dicts that hold a NaN or an infinity."""
    from titan_flow.distributed.utils import nonfinite_flag

    bad = []

    def visit(prefix: str, value) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                visit(f"{prefix}.{k}", v)
        elif isinstance(value, torch.Tensor) and value.is_floating_point() and nonfinite_flag([value]).item():
            bad.append(prefix)

    for name, state in states.items():
        visit(name, state.state_dict())
    return bad


def _first_failure(e: BaseException) -> str:
    """The underlying error of a DCP failure, without the per-rank tracebacks DCP wraps it in."""
    if isinstance(e, CheckpointException) and e.failures:
        rank, (inner, _) = next(iter(sorted(e.failures.items())))
        return f"{type(inner).__name__} on rank {rank}: {inner}"
    return f"{type(e).__name__}: {e}"


def _my_share(names: list[str]) -> list[str]:
    """This rank's share of the files to checksum: the work is spread over the ranks."""
    rank, world = _world()
    return sorted(names)[rank::world]


def write_manifest(path: Path, step: int) -> None:
    """Collective: checksum every file of the finished save, then rank 0 writes the marker atomically."""
    _barrier()  # every rank's files are on disk
    names = sorted(p.name for p in path.iterdir() if p.is_file() and not p.name.startswith(MARKER))
    mine = {n: {"size": (path / n).stat().st_size, "crc32": _crc32(path / n)} for n in _my_share(names)}
    files = {k: v for part in _gather(mine) for k, v in part.items()}
    if _world()[0] == 0:
        tmp = path / f"{MARKER}.tmp"
        tmp.write_text(json.dumps({"step": step, "world_size": _world()[1], "files": files}, indent=1) + "\n")
        os.replace(tmp, path / MARKER)
    _barrier()


def verify_manifest(path: Path) -> None:
    """Collective: raise CheckpointError (on every rank) naming each file that is missing or altered."""
    try:
        manifest = json.loads((path / MARKER).read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError) as e:
        problems = [f"its {MARKER} marker is unreadable ({type(e).__name__}: {e})"]
    else:
        problems = []
        for name in _my_share(list(files)):
            f, want = path / name, files[name]
            if not f.is_file():
                problems.append(f"{name} is missing")
            elif f.stat().st_size != want["size"]:
                problems.append(f"{name} has {f.stat().st_size} bytes, {want['size']} were written")
            elif _crc32(f) != want["crc32"]:
                problems.append(f"{name} has changed since it was written (CRC-32 mismatch)")
    problems = sorted(p for part in _gather(problems) for p in part)
    if problems:
        raise CheckpointError(
            f"checkpoint {path} is damaged: " + "; ".join(problems)
            + ". Delete the folder to resume from an older checkpoint, or pick one with --checkpoint.load_step"
        )


class CheckpointManager:
    """Saves `states` (DCP Stateful objects) and each rank's RNG `generators` every `interval` steps."""

    def __init__(
        self,
        folder: Path,
        states: dict[str, Stateful],
        generators: dict[str, torch.Generator],
        interval: int,
        keep_latest_k: int,
        async_save: bool,
        enable: bool = True,
    ):
        if interval < 1:
            raise ValueError(f"checkpoint.interval must be >= 1 (save every that many epochs), got {interval}")
        if keep_latest_k < 0:
            raise ValueError(f"checkpoint.keep_latest_k must be >= 0 (0 keeps all), got {keep_latest_k}")
        self.folder = Path(folder)
        self.states = states
        self.generators = generators
        self.rank = _world()[0]
        self.interval = interval
        self.keep_latest_k = keep_latest_k
        self.async_save = async_save and enable
        self.enable = enable
        self._pending: tuple[int, Future] | None = None
        # DCP's background writes run their collectives on a gloo group of their own.
        self._async_pg = dist.new_group(backend="gloo") if self.async_save and dist.is_initialized() else None

    # ------------------------------------------------------------------ save
    def should_save(self, step: int, last_step: int) -> bool:
        return self.enable and (step % self.interval == 0 or step == last_step)

    def save(self, step: int) -> None:
        """Save the state reached after `step` epochs; the marker lands when every rank is done.

        Collective. Raises CheckpointError, writing nothing and purging nothing, when any rank's state
        holds a NaN or an infinity."""
        self.wait()
        everywhere = [f"{name} (rank {rank})" for rank, names in enumerate(_gather(_nonfinite_entries(self.states)))
                      for name in names]
        if everywhere:
            raise CheckpointError(
                f"refusing to save step {step}: non-finite values in {', '.join(everywhere[:10])}"
                + (f" and {len(everywhere) - 10} more" if len(everywhere) > 10 else "")
                + f". Nothing was written or purged; the last good checkpoint is {self.last_good()}"
            )
        path = step_dir(self.folder, step)
        if self.rank == 0:
            if path.exists():  # an interrupted save of this step, or an older branch of the run
                (path / MARKER).unlink(missing_ok=True)
                shutil.rmtree(path)
            path.mkdir(parents=True)
        _barrier()
        torch.save(capture_rng(self.generators), path / f"rank_{self.rank}.pt")
        if self.async_save:
            self._pending = (step, dcp.async_save(self.states, checkpoint_id=str(path), process_group=self._async_pg))
        else:
            dcp.save(self.states, checkpoint_id=str(path))
            self._finish(step)

    def wait(self) -> None:
        """Block until an in-flight async save has been written and marked complete."""
        if self._pending is None:
            return
        step, future = self._pending
        self._pending = None
        future.result()
        self._finish(step)

    def _finish(self, step: int) -> None:
        write_manifest(step_dir(self.folder, step), step)
        if self.rank == 0:
            self._purge()
        _barrier()
        logger.info("checkpoint step %d saved to %s", step, step_dir(self.folder, step))

    def _purge(self) -> None:
        if self.keep_latest_k <= 0:
            return
        for old in complete_steps(self.folder)[: -self.keep_latest_k]:
            path = step_dir(self.folder, old)
            (path / MARKER).unlink()  # first, so a crash mid-delete leaves a folder resume skips
            shutil.rmtree(path)

    def last_good(self) -> str:
        """The newest complete checkpoint, for error messages."""
        steps = complete_steps(self.folder)
        return str(step_dir(self.folder, steps[-1])) if steps else f"none yet in {self.folder}"

    # ------------------------------------------------------------------ load
    def resolve_step(self, load_step: int) -> int | None:
        """The step to resume from: `load_step` if given (must be complete), else the newest complete one."""
        steps = complete_steps(self.folder)
        if load_step >= 0:
            path = step_dir(self.folder, load_step)
            if not path.is_dir():
                raise CheckpointError(
                    f"checkpoint.load_step {load_step}: {path} does not exist; complete checkpoints in "
                    f"{self.folder}: {steps or 'none'}"
                )
            if load_step not in steps:
                raise CheckpointError(
                    f"checkpoint.load_step {load_step}: {path} has no {MARKER} marker (its save was interrupted); "
                    f"complete checkpoints in {self.folder}: {steps or 'none'}"
                )
            return load_step
        return steps[-1] if steps else None

    def load(self, step: int) -> None:
        path = step_dir(self.folder, step)
        verify_manifest(path)
        try:
            dcp.load(self.states, checkpoint_id=str(path))
        except (Exception, CheckpointException) as e:  # all mean: this checkpoint does not fit these states
            raise CheckpointError(
                f"could not load checkpoint {path}: {_first_failure(e)}. "
                "Was it saved by a run with the same model, trainable parameters and EMA settings?"
            ) from e
        rng_file = path / f"rank_{self.rank}.pt"
        if rng_file.exists():
            restore_rng(torch.load(rng_file, weights_only=False), self.generators)
        else:
            logger.warning(
                "%s has no RNG state for rank %d (saved at a smaller world size); this rank keeps its fresh seeds",
                path, self.rank,
            )
        logger.info("resumed from %s", path)

    def close(self) -> None:
        self.wait()


def load_model_weights(model: torch.nn.Module, folder: Path, step: int = -1, use_ema: bool = True) -> int:
    """Fill `model` (built as the run built it) from the run's checkpoint `step` (-1 = the newest
    complete one), with the EMA weights in place of the trained ones when `use_ema`. Returns the step.

    Only the model (and EMA) entries are read; the checkpoint may come from any world size.
    """
    from titan_flow.rl.ema import EMA

    folder = Path(folder)
    steps = complete_steps(folder)
    if not steps:
        raise CheckpointError(f"{folder} holds no complete checkpoint; was the run saved with checkpoint.enable = true?")
    if step < 0:
        step = steps[-1]
    elif step not in steps:
        raise CheckpointError(f"step {step} is not a complete checkpoint in {folder}; complete: {steps}")
    path = step_dir(folder, step)
    verify_manifest(path)
    trainable = [p for p in model.parameters() if p.requires_grad]
    states: dict[str, Stateful] = {"model": ModelState(model)}
    if use_ema:
        states["ema"] = ema = EMA(trainable)
    try:
        dcp.load(states, checkpoint_id=str(path))
    except (Exception, CheckpointException) as e:
        hint = " (the run kept no EMA: use the raw weights)" if use_ema else ""
        raise CheckpointError(f"could not load the model from {path}{hint}: {_first_failure(e)}") from e
    if use_ema:
        ema.copy_to(trainable)
    return step
