"""FLUX parallelism: double- and single-stream blocks are the FSDP/AC/compile units; embedders and the head ride with the root."""

from __future__ import annotations

import torch.nn as nn

from titan_flow.config import JobConfig
from titan_flow.distributed.parallelize import parallelize_blocks
from titan_flow.distributed.utils import ParallelDims


def parallelize_flux(model: nn.Module, dims: ParallelDims, cfg: JobConfig, trainable: bool = True) -> nn.Module:
    return parallelize_blocks(model, [model.transformer_blocks, model.single_transformer_blocks], dims, cfg, trainable)
