"""Pretrained weights straight into a sharded model: every rank reads only the rows of its own shards.

The model is built on the meta device and parallelized there, then materialised empty; the family's
`load_checkpoint` hands back our-key tensors that safetensors memory-maps, and each rank copies
the slice of every tensor that its DTensor shard holds. No rank ever holds a full copy of the
weights, so a 7-20B backbone loads in about (its size / shard degree) of memory per rank.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor


def local_slices(t: DTensor) -> tuple[slice, ...]:
    """The index of this rank's local shard in the full tensor (torch.chunk layout, as DTensor's Shard)."""
    starts, lengths = [0] * t.ndim, list(t.shape)
    coordinate = t.device_mesh.get_coordinate()
    for mesh_dim, placement in enumerate(t.placements):
        if placement.is_shard():
            dim, parts = placement.dim, t.device_mesh.size(mesh_dim)
            chunk = math.ceil(lengths[dim] / parts)
            begin = min(coordinate[mesh_dim] * chunk, lengths[dim])
            starts[dim] += begin
            lengths[dim] = min(chunk, lengths[dim] - begin)
        elif not placement.is_replicate():
            raise NotImplementedError(f"cannot load into a DTensor placed as {placement}")
    return tuple(slice(s, s + n) for s, n in zip(starts, lengths))


def _listing(keys, limit: int = 10) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:limit]) + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


@torch.no_grad()
def load_full_into_shards(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str = "state dict") -> None:
    """Copy full tensors into `model`'s (possibly sharded) parameters and buffers, casting to their dtype.

    Every key of the model must be present with its full shape; only each rank's slice of each
    tensor is read.
    """
    targets = model.state_dict(keep_vars=True)
    missing, unexpected = set(targets) - set(state_dict), set(state_dict) - set(targets)
    wrong = [
        f"{k} {tuple(state_dict[k].shape)} (model: {tuple(targets[k].shape)})"
        for k in targets.keys() & state_dict.keys()
        if tuple(state_dict[k].shape) != tuple(targets[k].shape)
    ]
    if missing or unexpected or wrong:
        problems = [
            f"{what}: {_listing(keys)}"
            for what, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong))
            if keys
        ]
        raise ValueError(f"{source} does not fit the model: " + "; ".join(problems))
    for key, target in targets.items():
        full = state_dict[key]
        if isinstance(target, DTensor):
            local = target.to_local()
            local.copy_(full[local_slices(target)])
        else:
            target.copy_(full)
