"""Checks shared by every checkpoint loader: which keys are missing, unexpected or mis-shaped."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
import torch.nn as nn


def listing(keys: Iterable[str], limit: int = 20) -> str:
    """The first `limit` keys, comma-separated, and how many there are in all."""
    keys = list(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def check_keys(state_dict: Mapping[str, torch.Tensor], expected_shapes: Mapping[str, tuple], what: str) -> None:
    """Raise `ValueError("<what>: missing keys: ...; unexpected keys: ...; wrong shapes: ...")` on any mismatch."""
    missing = sorted(set(expected_shapes) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected_shapes))
    wrong = [
        f"{k} {tuple(state_dict[k].shape)} (expected {tuple(shape)})"
        for k, shape in sorted(expected_shapes.items())
        if k in state_dict and tuple(state_dict[k].shape) != tuple(shape)
    ]
    problems = [
        f"{name}: {listing(keys)}"
        for name, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong))
        if keys
    ]
    if problems:
        raise ValueError(f"{what}: " + "; ".join(problems))


def materialize(
    model_cls: Callable[..., nn.Module],
    args,
    state_dict: Mapping[str, torch.Tensor],
    dtype: torch.dtype,
    device: torch.device | str,
) -> nn.Module:
    """`model_cls(args)` holding `state_dict`'s tensors: built on meta and assigned them, so no memory goes
    to a throwaway init; then moved to `device` and `dtype`."""
    with torch.device("meta"):
        model = model_cls(args)
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model.to(device=device, dtype=dtype)
