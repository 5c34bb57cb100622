"""Activation checkpointing -> torch.compile -> FSDP2, applied from outside to any block list.

Each model family's parallelize.py only says which module list holds its blocks; the order and the
policies live here once.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

from titan_flow.config import ConfigError, JobConfig
from titan_flow.distributed.utils import ParallelDims

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def apply_activation_checkpointing(blocks: nn.ModuleList, mode: str, every_n: int) -> None:
    """Wrap blocks in place; 'selective' wraps every n-th block (trading memory for recompute)."""
    if mode == "none":
        return
    for i, block in enumerate(blocks):
        if mode == "full" or (mode == "selective" and i % every_n == 0):
            blocks[i] = checkpoint_wrapper(block, preserve_rng_state=False)


def apply_compile(blocks: nn.ModuleList) -> None:
    """Compile each block in place: identical blocks share one graph, FSDP hooks stay outside, and
    state-dict keys keep their names (a torch.compile wrapper would add `_orig_mod.`)."""
    for block in blocks:
        block.compile(fullgraph=True)


def apply_fsdp(
    model: nn.Module,
    block_lists: list[nn.ModuleList],
    dims: ParallelDims,
    param_dtype: torch.dtype,
    reduce_dtype: torch.dtype = torch.float32,
    reshard_after_forward: str = "default",
    cpu_offload: bool = False,
) -> None:
    """fully_shard every block, then the root (embedders and final layers go with the root).

    The root does not cast its inputs: models cast what they need themselves, and keep inputs such
    as the timestep in full precision.
    """
    mp_policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    kwargs = dict(mesh=dims.fsdp_mesh, mp_policy=mp_policy)
    if cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    root_kwargs = dict(kwargs, mp_policy=MixedPrecisionPolicy(param_dtype, reduce_dtype, cast_forward_inputs=False))
    for blocks in block_lists:
        for i, block in enumerate(blocks):
            if reshard_after_forward == "default":
                # The last block's params are needed again right away by backward.
                reshard = i < len(blocks) - 1
            else:
                reshard = reshard_after_forward == "always"
            fully_shard(block, reshard_after_forward=reshard, **kwargs)
    fully_shard(model, reshard_after_forward=reshard_after_forward == "always", **root_kwargs)


def fsdp_is_a_no_op(dims: ParallelDims, cfg: JobConfig) -> bool:
    """One process, no mixed precision, no offload: FSDP2 would shard nothing and cast nothing.

    Its hooks, copy-in/copy-out and DTensor parameters then only cost time (about a third of a training
    step of the debug model on the CPU), so the model stays a plain module, as TorchTitan does at shard
    degree 1. The forward and every block's gradient are bit for bit FSDP2's; only the root's
    conditioning gradients are summed in another order (fp32 rounding; tests/test_parallel.py). A bf16
    gradient reduce of fp32 weights does round, so it keeps FSDP2, as does any compute dtype other than
    the weights' (FSDP2 is what casts them). Checkpoints stay interchangeable: DCP stores global tensors
    under the same keys, so a plain module's loads into FSDP2 shards at any world size and back.
    """
    p, master = cfg.parallelism, DTYPES[cfg.model.dtype]
    reduce_rounds = DTYPES[p.mixed_precision_reduce].itemsize < master.itemsize
    return (dims.world_size == 1 and DTYPES[cfg.model.compute_dtype] == master and not reduce_rounds
            and not p.fsdp_cpu_offload)


def parallelize_blocks(
    model: nn.Module, block_lists: list[nn.ModuleList], dims: ParallelDims, cfg: JobConfig, trainable: bool
) -> nn.Module:
    """The TorchTitan order: AC (trained models only) -> compile -> fully_shard per block -> root.

    A frozen model (the reference policy) with `parallelism.reference_placement = "replicate"` is
    not sharded: every rank keeps it whole in the compute dtype. A single process without mixed
    precision is not wrapped at all (`fsdp_is_a_no_op`).
    """
    p = cfg.parallelism
    if p.fsdp_cpu_offload and dims.device.type != "cuda":
        raise ConfigError(
            f"parallelism.fsdp_cpu_offload moves FSDP2 shards between CPU and GPU memory; on {dims.device.type} "
            "there is nothing to offload to, set it to false"
        )
    for blocks in block_lists:
        if trainable:
            apply_activation_checkpointing(
                blocks, cfg.activation_checkpoint.mode, cfg.activation_checkpoint.selective_every_n_blocks
            )
        if cfg.compile.enable:
            apply_compile(blocks)
    if not trainable and p.reference_placement == "replicate":
        return model.to(DTYPES[cfg.model.compute_dtype])
    if fsdp_is_a_no_op(dims, cfg):
        return model
    apply_fsdp(
        model,
        block_lists,
        dims,
        param_dtype=DTYPES[cfg.model.compute_dtype],
        reduce_dtype=DTYPES[p.mixed_precision_reduce],
        reshard_after_forward=p.fsdp_reshard_after_forward,
        cpu_offload=p.fsdp_cpu_offload,
    )
    return model


def shard_frozen_module(module: nn.Module, dims: ParallelDims) -> None:
    """FSDP2 over a frozen module: every element of its outermost repeated layer lists, then the root.

    Weights stay in the module's dtype and are freed again after each layer's forward.
    """
    lists = []
    for name, child in module.named_modules():
        if isinstance(child, nn.ModuleList) and len(child) > 1 and not any(name.startswith(f"{n}.") for n, _ in lists):
            lists.append((name, child))
    for _, layers in lists:
        for layer in layers:
            fully_shard(layer, mesh=dims.fsdp_mesh, reshard_after_forward=True)
    fully_shard(module, mesh=dims.fsdp_mesh, reshard_after_forward=True)


def shard_frozen_encoders(policy, dims: ParallelDims) -> list[str]:
    """Shard the frozen text encoders a pipeline holds: its attributes that are transformers models
    (alone or in a list), which pipelines call through `forward`. Returns the attribute names."""
    from transformers import PreTrainedModel

    sharded = []
    for name, value in vars(policy).items():
        for module in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(module, PreTrainedModel):
                shard_frozen_module(module, dims)
                sharded.append(name)
    return sharded
