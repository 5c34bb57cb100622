"""Exponential moving average of the trained parameters, used for eval, sampling and export.

Schedule as the reference (flow_grpo's EMAModuleWrapper): decay min((1 + k) / (10 + k), max_decay) at
optimizer step k, applied only every `update_interval` steps. Unlike the reference it is stepped once
per optimizer update, not once per training batch (flow_grpo_algorithm.md section 14, quirk 7).
Shadows are fp32 copies with the parameters' layout, so under FSDP2 they are sharded DTensors and
DCP saves and reshards them like the parameters.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch.distributed.checkpoint.stateful import Stateful


class EMA(Stateful):
    def __init__(self, params: list[torch.nn.Parameter], max_decay: float = 0.9, update_interval: int = 8):
        self.params = list(params)
        self.max_decay = max_decay
        self.update_interval = update_interval
        self.shadow = [p.detach().float().clone() for p in self.params]

    def decay(self, step: int) -> float:
        return min((1 + step) / (10 + step), self.max_decay)

    @torch.no_grad()
    def step(self, global_step: int) -> None:
        """Call once after each optimizer update; `global_step` counts updates so far (1-based)."""
        if (global_step + 1) % self.update_interval:
            return
        weight = 1 - self.decay(global_step)
        for s, p in zip(self.shadow, self.params):
            s.lerp_(p.detach().float(), weight)

    @torch.no_grad()
    def copy_to(self, params: list[torch.nn.Parameter]) -> None:
        for p, s in zip(params, self.shadow, strict=True):
            p.copy_(s.to(p.dtype))

    @contextmanager
    def swapped_in(self):
        """Run the block with the EMA weights in the model, then put the trained weights back."""
        backup = [p.detach().clone() for p in self.params]
        self.copy_to(self.params)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, b in zip(self.params, backup):
                    p.copy_(b)

    def state_dict(self):
        return {f"shadow.{i}": s for i, s in enumerate(self.shadow)}

    def load_state_dict(self, sd):
        if len(sd) != len(self.shadow):
            raise ValueError(f"EMA state has {len(sd)} tensors, the model has {len(self.shadow)} trainable parameters")
        with torch.no_grad():
            for i, s in enumerate(self.shadow):
                s.copy_(sd[f"shadow.{i}"])
