"""The frozen policies the algorithms compare against, without a second copy of the weights under LoRA.

- `initial()`: the model before training. GRPO's and SFT's KL anchor. LoRA: the adapter switched
  off; full fine-tuning: a frozen copy built like the model.
- `reference()`: the policy that samples DPO/SFT rollouts and anchors the DPO loss (the reference
  code's "ref" adapter). Offline variants: the initial model, forever. Online variants: a snapshot of
  the trained policy, refreshed by `sync()` (LoRA: the adapter's frozen reference slot; full
  fine-tuning: the frozen copy).

Both are context managers yielding the module to pass to `policy.velocity`, so the Policy
interface never learns about adapters.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor

from titan_flow.distributed.utils import reshard
from titan_flow.peft.lora import active_adapter, has_lora, sync_reference_adapter


class FrozenPolicies:
    def __init__(self, model: nn.Module, frozen_copy: nn.Module | None, online: bool):
        self.model, self.frozen_copy, self.online = model, frozen_copy, online
        self.lora = has_lora(model)
        if frozen_copy is not None:
            frozen_copy.requires_grad_(False)

    @contextmanager
    def initial(self):
        if self.lora:
            with active_adapter(self.model, None):
                yield self.model
        elif self.frozen_copy is None or self.online:
            raise RuntimeError(
                "the initial model is not kept: full fine-tuning keeps one frozen copy, and an online "
                "algorithm moves it; use LoRA (lora.enable = true) for a KL to the initial model"
            )
        else:
            yield self.frozen_copy

    @contextmanager
    def reference(self):
        if not self.online:
            with self.initial() as module:
                yield module
        elif self.lora:
            with active_adapter(self.model, "reference"):
                yield self.model
        else:
            yield self.frozen_copy

    @torch.no_grad()
    def sync(self) -> None:
        """Reference <- the trained policy (online variants), shard by shard on every rank."""
        if not self.online:
            raise RuntimeError("sync() is for online algorithms; the offline reference is the initial model")
        # Sharded state first: an unsharded FSDP2 module exposes its gathered copies as parameters,
        # and writes to those would be dropped at the next reshard.
        modules = [self.model] if self.lora else [self.model, self.frozen_copy]
        for module in modules:
            reshard(module)
        if self.lora:
            sync_reference_adapter(self.model)
            return
        for ref, param in zip(self.frozen_copy.parameters(), self.model.parameters(), strict=True):
            if isinstance(param, DTensor) and not isinstance(ref, DTensor):  # a replicated (unsharded) copy
                param = param.full_tensor()
            ref.copy_(param)

