"""LoRA (Hu et al. 2021) for any backbone: low-rank adapters on the nn.Linear layers a config names.

`apply_lora` swaps each matching nn.Linear for a `LoRALinear` that keeps the same `weight` / `bias`
parameters under the same names (checkpoint keys of the base model do not change) and adds
`lora_A` (r, in) and `lora_B` (out, r):

    y = x W^T + b + scale * (x A^T) B^T,     scale = alpha / r

initialised as PEFT's "gaussian" init (A ~ N(0, (1/r)^2), B = 0), so a fresh adapter computes exactly
the base model. Apply it to the plain model before `parallelize` (AC, compile, FSDP2 wrap the
LoRALinear like any layer; frozen base weights and trainable adapters share an FSDP group).

The reference policy needs no second copy of the weights: `active_adapter(model, None)` runs the
base model (adapter off), and online DPO/SFT keep a frozen "reference" slot (`ref_lora_A/B`, a copy
of the adapter only) that `sync_reference_adapter` refreshes and `active_adapter(model, "reference")`
selects. Adapters are chosen by a Python attribute, so compiled blocks get one graph per choice.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

ADAPTERS = ("policy", "reference", None)


class LoRALinear(nn.Linear):
    def __init__(self, base: nn.Linear, name: str, rank: int, alpha: float, with_reference: bool):
        nn.Module.__init__(self)  # reuse the base parameters as they are: no re-init, no copy
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.name = name  # the state-dict prefix, for `initial_adapter_state`
        self.rank = rank
        self.scale = alpha / rank
        self.adapter: str | None = "policy"
        factory = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, rank, **factory))
        if with_reference:
            self.ref_lora_A = nn.Parameter(torch.empty_like(self.lora_A), requires_grad=False)
            self.ref_lora_B = nn.Parameter(torch.empty_like(self.lora_B), requires_grad=False)
        else:
            self.ref_lora_A = self.ref_lora_B = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        if self.adapter is None:
            return out
        a, b = (self.lora_A, self.lora_B) if self.adapter == "policy" else (self.ref_lora_A, self.ref_lora_B)
        return out + F.linear(F.linear(x, a), b) * self.scale

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, scale={self.scale:g}"


def _matches(name: str, patterns: list[str]) -> bool:
    """PEFT's rule for a list of targets: the module name equals a pattern or ends with '.' + pattern."""
    return any(name == p or name.endswith("." + p) for p in patterns)


def apply_lora(
    model: nn.Module,
    rank: int,
    alpha: float,
    target_modules: list[str],
    seed: int = 0,
    with_reference: bool = False,
) -> list[str]:
    """Wrap every nn.Linear whose name matches `target_modules`; freeze everything but the adapters.

    The adapters' random init comes from `seed` alone, so every rank builds the same adapter.
    Returns the names of the wrapped layers.
    """
    if rank < 1:
        raise ValueError(f"lora.rank must be >= 1, got {rank}")
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and not isinstance(module, LoRALinear) and _matches(name, target_modules)
    ]
    unused = [p for p in target_modules if not any(_matches(name, [p]) for name, _ in targets)]
    if not targets or unused:
        linears = sorted({name.split(".")[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(
            f"lora.target_modules: {unused or target_modules} match no nn.Linear of {type(model).__name__}; "
            f"patterns match a module name or its dotted suffix (e.g. 'attn.to_q'); linear layer names here: {linears}"
        )
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRALinear(module, name, rank, alpha, with_reference))
    if not any(p.is_meta for p in model.parameters()):  # on the meta device the loader fills them later
        with torch.no_grad():
            for key, value in initial_adapter_state(model, seed).items():
                model.get_parameter(key).copy_(value)
    mark_only_lora_trainable(model)
    return [name for name, _ in targets]


def initial_adapter_state(model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Every adapter's initial value by state-dict key: A ~ N(0, (1/r)^2) drawn from `seed` on the
    CPU (the same on every rank and device), B = 0, and the reference slot equal to the adapter.

    `apply_lora` fills a real model with it; a model built on the meta device gets it from the
    sharded loader together with the pretrained weights, so no rank holds a full copy.
    """
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for m in lora_layers(model):
        a = torch.randn(m.rank, m.in_features, generator=generator) / m.rank
        b = torch.zeros(m.out_features, m.rank)
        state[f"{m.name}.lora_A"], state[f"{m.name}.lora_B"] = a, b
        if m.ref_lora_A is not None:
            state[f"{m.name}.ref_lora_A"], state[f"{m.name}.ref_lora_B"] = a, b
    return state


def mark_only_lora_trainable(model: nn.Module) -> None:
    """Freeze the base model, train the adapters. Also valid after FSDP2's fully_shard (before the
    first forward), for parallelize plans that set their own trainable set."""
    for name, p in model.named_parameters():
        p.requires_grad_(name.endswith((".lora_A", ".lora_B")))  # not the frozen ".ref_lora_*" slot


def lora_layers(model: nn.Module) -> list[LoRALinear]:
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def has_lora(model: nn.Module) -> bool:
    return bool(lora_layers(model))


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable adapter parameters (not the frozen reference slot)."""
    return [p for m in lora_layers(model) for p in (m.lora_A, m.lora_B)]


@contextmanager
def active_adapter(model: nn.Module, adapter: str | None) -> Iterator[nn.Module]:
    """Run the block with the "policy" adapter, the frozen "reference" copy, or None (the base model)."""
    if adapter not in ADAPTERS:
        raise ValueError(f"adapter must be one of {ADAPTERS}, got {adapter!r}")
    layers = lora_layers(model)
    if adapter == "reference" and any(m.ref_lora_A is None for m in layers):
        raise ValueError("this model's LoRA has no reference slot; apply_lora(..., with_reference=True)")
    previous = [m.adapter for m in layers]
    for m in layers:
        m.adapter = adapter
    try:
        yield model
    finally:
        for m, a in zip(layers, previous):
            m.adapter = a


@torch.no_grad()
def sync_reference_adapter(model: nn.Module) -> None:
    """Reference slot <- current adapter. Works shard by shard on FSDP2 DTensors (same layouts); under
    FSDP2 call it on a resharded model (an unsharded module exposes its gathered copies instead)."""
    for m in lora_layers(model):
        if m.ref_lora_A is None:
            raise ValueError("this model's LoRA has no reference slot; apply_lora(..., with_reference=True)")
        m.ref_lora_A.copy_(m.lora_A)
        m.ref_lora_B.copy_(m.lora_B)


def lora_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Only the trained adapter tensors (`*.lora_A`, `*.lora_B`) of a model state dict."""
    return {k: v for k, v in state_dict.items() if k.endswith((".lora_A", ".lora_B"))}


def merge_lora_state_dict(state_dict: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """A base-model state dict with W <- W + scale * B A folded in and every adapter key dropped.

    Takes full (unsharded) tensors, e.g. from get_model_state_dict(..., full_state_dict=True);
    `scale` = lora.alpha / lora.rank. The product is taken in fp32 and cast to W's dtype.
    """
    out = {}
    for key, value in state_dict.items():
        if key.endswith((".lora_A", ".lora_B", ".ref_lora_A", ".ref_lora_B")):
            continue
        prefix = key[: -len(".weight")] if key.endswith(".weight") else None
        if prefix is not None and f"{prefix}.lora_A" in state_dict:
            a, b = state_dict[f"{prefix}.lora_A"].float(), state_dict[f"{prefix}.lora_B"].float()
            value = (value.float() + scale * (b @ a)).to(value.dtype)
        out[key] = value
    return out


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and put plain nn.Linear layers back (unsharded models).

    The result computes the same function as the policy adapter (within fp32 rounding) and has the
    base model's state-dict keys, ready for export.
    """
    for name, module in list(model.named_modules()):
        if not isinstance(module, LoRALinear):
            continue
        delta = module.scale * (module.lora_B.float() @ module.lora_A.float())
        module.weight.add_(delta.to(module.weight.dtype))
        linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
        linear.weight, linear.bias = module.weight, module.bias
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, linear)
    return model
