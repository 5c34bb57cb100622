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

from titan_flow.models.common.state_dict import check_keys


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


@torch.no_grad()
def load_full_into_shards(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str = "state dict") -> None:
    """Copy full tensors into `model`'s (possibly sharded) parameters and buffers, casting to their dtype.

    Every key of the model must be present with its full shape; only each rank's slice of each
    tensor is read.
    """
    targets = model.state_dict(keep_vars=True)
    check_keys(state_dict, {k: t.shape for k, t in targets.items()}, f"{source} does not fit the model")
    for key, target in targets.items():
        full = state_dict[key]
        if isinstance(target, DTensor):
            local = target.to_local()
            local.copy_(full[local_slices(target)])
        else:
            target.copy_(full)
