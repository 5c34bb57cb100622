"""DCP checkpoints that resume exactly, reshard across world sizes, and are never half-written.

Layout of one checkpoint: `<run>/<folder>/step-00000010/` holds the DCP shards of everything that
is the same on every rank (model, optimizer, EMA, sampler position, step counters) plus one
`rank_<r>.pt` per rank with that rank's RNG streams. A checkpoint counts as complete only once its
`COMPLETE` marker exists; the marker is written after every rank has finished writing, so a crash
mid-save leaves a folder that resume skips.
"""

from __future__ import annotations

import logging
import random
import shutil
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
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
        return get_optimizer_state_dict(self.model, self.optimizer)

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
    return root / f"step-{step:08d}"


def complete_steps(root: Path) -> list[int]:
    if not root.is_dir():
        return []
    steps = []
    for d in root.iterdir():
        if d.is_dir() and d.name.startswith("step-") and (d / MARKER).exists():
            steps.append(int(d.name[len("step-"):]))
    return sorted(steps)


class CheckpointManager:
    def __init__(
        self,
        folder: Path,
        states: dict[str, Stateful],
        generators: dict[str, torch.Generator],
        rank: int,
        interval: int,
        keep_latest_k: int,
        async_save: bool,
        enable: bool = True,
    ):
        self.folder = Path(folder)
        self.states = states
        self.generators = generators
        self.rank = rank
        self.interval = interval
        self.keep_latest_k = keep_latest_k
        self.async_save = async_save
        self.enable = enable
        self._pending: tuple[int, Future] | None = None
        self._async_pg = dist.new_group(backend="gloo") if async_save else None

    # ------------------------------------------------------------------ save
    def should_save(self, step: int, last_step: int) -> bool:
        return self.enable and (step % self.interval == 0 or step == last_step)

    def save(self, step: int) -> None:
        """Save the state reached after `step` epochs; the marker lands when every rank is done."""
        self.wait()
        path = step_dir(self.folder, step)
        if self.rank == 0:
            path.mkdir(parents=True, exist_ok=True)
        dist.barrier()
        torch.save(capture_rng(self.generators), path / f"rank_{self.rank}.pt")
        if self.async_save:
            future = dcp.async_save(self.states, checkpoint_id=str(path), process_group=self._async_pg)
            self._pending = (step, future)
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
        dist.barrier()
        if self.rank == 0:
            (step_dir(self.folder, step) / MARKER).write_text(f"{step}\n")
            self._purge()
        dist.barrier()
        logger.info("checkpoint step %d saved to %s", step, step_dir(self.folder, step))

    def _purge(self) -> None:
        if self.keep_latest_k <= 0:
            return
        for old in complete_steps(self.folder)[: -self.keep_latest_k]:
            shutil.rmtree(step_dir(self.folder, old), ignore_errors=True)

    # ------------------------------------------------------------------ load
    def resolve_step(self, load_step: int) -> int | None:
        """The step to resume from: `load_step` if given (must be complete), else the newest complete one."""
        steps = complete_steps(self.folder)
        if load_step >= 0:
            path = step_dir(self.folder, load_step)
            if not path.is_dir():
                raise CheckpointError(
                    f"checkpoint.load_step {load_step}: {path} does not exist; complete checkpoints: {steps or 'none'}"
                )
            if load_step not in steps:
                raise CheckpointError(
                    f"checkpoint.load_step {load_step}: {path} has no {MARKER} marker (the save was interrupted); "
                    f"complete checkpoints: {steps or 'none'}"
                )
            return load_step
        return steps[-1] if steps else None

    def load(self, step: int) -> None:
        path = step_dir(self.folder, step)
        try:
            dcp.load(self.states, checkpoint_id=str(path))
        except Exception as e:  # DCP raises a variety of errors for damaged files
            raise CheckpointError(f"could not load checkpoint {path}: {type(e).__name__}: {e}") from e
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
