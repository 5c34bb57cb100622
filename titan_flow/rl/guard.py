"""Non-finite values stop the run loudly (or drop the step) instead of training on NaN.

Checks are recorded where values enter (rollout latents and log-probs, each reward function's scores,
advantages, losses, the gradient norm before each update, the weights and EMA after the epoch's
updates) as device-side flags, without a host sync each. At a decision point every rank's flags are agreed on with one collective (an
all-reduce of a single number), so all ranks stop or skip together and none hangs; only when something
is wrong are the details gathered to name the epoch, the quantity, the reward function and prompts or
the denoising step, and the rank.

`training.on_nonfinite = "stop"` raises NonFiniteError naming all of it and the last good checkpoint;
"skip" drops the rollouts' training or the optimizer step (and its EMA update) and counts it, and
still raises after `training.max_nonfinite_skips` consecutive skips. Weights that are non-finite after
an update cannot be skipped (the update is applied): that always stops.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from titan_flow.distributed.utils import local_tensor, nonfinite_flag

logger = logging.getLogger("titan_flow")

MODES = ("stop", "skip")


class NonFiniteError(RuntimeError):
    """A NaN or infinity reached the training state or was about to."""


@dataclass
class _Check:
    quantity: str  # e.g. "reward 'ocr'", "loss", "grad norm"
    flag: torch.Tensor  # 0-d bool: True where the checked values held a NaN or an infinity
    detail: Callable[[], str]  # what to add on the failure path only (prompts, steps, counts)
    skippable: bool


def _describe_nonfinite(values: torch.Tensor) -> str:
    bad = ~torch.isfinite(values)
    kinds = [name for name, mask in (("nan", values.isnan()), ("inf", values.isinf())) if mask.any()]
    return f"{int(bad.sum())} of {values.numel()} values {'/'.join(kinds)}"


class NonFiniteGuard:
    def __init__(self, mode: str, max_consecutive_skips: int, rank: int, device: torch.device,
                 last_good: Callable[[], str] = lambda: "no checkpoint was saved"):
        if mode not in MODES:
            raise ValueError(f"training.on_nonfinite: {mode!r} is not one of {MODES}")
        if max_consecutive_skips < 1:
            raise ValueError(f"training.max_nonfinite_skips must be >= 1, got {max_consecutive_skips}")
        self.mode, self.max_consecutive_skips = mode, max_consecutive_skips
        self.rank, self.device, self.last_good = rank, device, last_good
        self.pending: list[_Check] = []
        self.consecutive_skips = 0
        self.total_skips = 0
        self.seconds = 0.0  # spent checking: the guard's own work, logged per epoch
        self.collective_seconds = 0.0  # in its all-reduces, waiting for the slowest rank included

    def check(self, quantity: str, values, detail: Callable[[], str] | None = None, skippable: bool = True) -> None:
        """Record whether `values` (a tensor, or a list of possibly sharded tensors) are all finite; decided
        on at the next `decide`. `detail` is called only when they are not."""
        tensors = [values] if isinstance(values, torch.Tensor) else list(values)
        start = time.perf_counter()
        flag = nonfinite_flag(tensors).to(self.device)
        self.seconds += time.perf_counter() - start

        def describe() -> str:
            parts = [local_tensor(t).detach().float().flatten() for t in tensors]
            parts = [_describe_nonfinite(torch.cat(parts))] if parts else []
            if detail is not None:
                parts.append(detail())
            return ", ".join(parts)

        self.pending.append(_Check(quantity, flag, describe, skippable))

    def decide(self, epoch: int, stage: str) -> bool:
        """Collective. True: something was non-finite on some rank and this work is to be skipped.
        Raises NonFiniteError in "stop" mode, after too many consecutive skips, or for unskippable values."""
        start = time.perf_counter()
        checks, self.pending = self.pending, []
        local = torch.stack([c.flag for c in checks]).any() if checks else torch.zeros((), dtype=torch.bool,
                                                                                          device=self.device)
        anywhere = local.to(torch.float32).reshape(1)
        self.seconds += time.perf_counter() - start
        start = time.perf_counter()
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(anywhere, op=dist.ReduceOp.MAX)
        clean = anywhere.item() == 0
        self.collective_seconds += time.perf_counter() - start
        if clean:
            return False
        mine = [(self.rank, c.quantity, c.detail(), c.skippable) for c in checks if c.flag.item()]
        if dist.is_initialized() and dist.get_world_size() > 1:
            everyone = [None] * dist.get_world_size()
            dist.all_gather_object(everyone, mine)
            findings = [f for part in everyone for f in part]
        else:
            findings = mine
        self.consecutive_skips += 1
        why = self._message(epoch, stage, findings)
        if self.mode == "stop" or not all(skippable for *_, skippable in findings):
            raise NonFiniteError(why)
        if self.consecutive_skips > self.max_consecutive_skips:
            raise NonFiniteError(
                f"{why}\nThat is {self.consecutive_skips} skips in a row (training.max_nonfinite_skips = "
                f"{self.max_consecutive_skips}): the run is diverging, not hitting one bad batch."
            )
        self.total_skips += 1
        logger.warning("%s\nSkipped (training.on_nonfinite = 'skip'; %d in a row, %d in this run).", why,
                       self.consecutive_skips, self.total_skips)
        return True

    def passed(self) -> None:
        """An update went through: the consecutive-skip count starts again."""
        self.consecutive_skips = 0

    def _message(self, epoch: int, stage: str, findings: list[tuple]) -> str:
        lines = [f"non-finite values at epoch {epoch} ({stage}):"]
        lines += [f"  rank {rank}: {quantity}: {detail}" for rank, quantity, detail, _ in findings]
        lines.append(f"Nothing of this epoch reached a checkpoint; the last good one: {self.last_good()}. "
                     "Rerunning the same command resumes from it; if the cause persists (learning rate, reward "
                     "server, data), change that first.")
        if self.mode == "stop":
            lines.append("training.on_nonfinite = 'skip' drops such a batch or step instead of stopping.")
        return "\n".join(lines)

    def state_dict(self) -> dict:
        return {"consecutive_skips": self.consecutive_skips, "total_skips": self.total_skips}

    def load_state_dict(self, state: dict) -> None:
        self.consecutive_skips = state["consecutive_skips"]
        self.total_skips = state["total_skips"]
