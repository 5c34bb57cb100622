"""Bagel parallelism: each MoT decoder layer (and each ViT layer) is one FSDP / AC / compile unit.

Embeddings, the time embedder, vae2llm / llm2vae, the connector and the ViT embeddings ride with
the root, as in Bagel's own FSDP wrap policy. FSDP2 shards a layer whose und weights are frozen and
gen weights train as one group. Besides `forward`, the model is entered through `extend` (prompt
prefill) and `denoise` (the RL hot path), so those are registered as FSDP forward methods: the
root's parameters are then gathered for them too.
"""

from __future__ import annotations

import torch.nn as nn
from torch.distributed.fsdp import register_fsdp_forward_method

from titan_flow.config import ConfigError, JobConfig
from titan_flow.distributed.parallelize import parallelize_blocks
from titan_flow.distributed.utils import ParallelDims


def select_trainable(model: nn.Module, trainable: str) -> None:
    """Freeze everything but the part `model.trainable` names.

    Only the generation expert may train: the prompt KV cache is computed once per prompt, without
    grad, by the understanding expert, so und weights that change would leave every cache stale.
    """
    if trainable != "gen_expert":
        raise ConfigError(
            f"model.trainable: {trainable!r} cannot train Bagel, whose prompt KV cache comes from the frozen "
            "understanding expert; set model.trainable = 'gen_expert' (what the reference trains)"
        )
    model.requires_grad_(False)
    for param in model.gen_expert_parameters():
        param.requires_grad_(True)


def parallelize_bagel(model: nn.Module, dims: ParallelDims, cfg: JobConfig, trainable: bool = True) -> nn.Module:
    if trainable:
        select_trainable(model, cfg.model.trainable)
    block_lists = [model.layers] + ([model.vit.layers] if model.vit is not None else [])
    parallelize_blocks(model, block_lists, dims, cfg, trainable)
    for method in ("extend", "denoise"):
        register_fsdp_forward_method(model, method)
    return model
