"""FLUX parallelism: double- and single-stream blocks are the FSDP/AC/compile units; embedders and the head ride with the root."""

from __future__ import annotations

import torch.nn as nn

from titan_flow.config import ConfigError, JobConfig
from titan_flow.distributed.parallelize import parallelize_blocks
from titan_flow.distributed.utils import ParallelDims


def parallelize_flux(model: nn.Module, dims: ParallelDims, cfg: JobConfig, trainable: bool = True) -> nn.Module:
    if cfg.model.compute_dtype == "float16":
        raise ConfigError(
            "model.compute_dtype: FLUX overflows in float16 and gives invalid images (the reference runs it in "
            "bf16 only); use bfloat16 (or float32)"
        )
    return parallelize_blocks(model, [model.transformer_blocks, model.single_transformer_blocks], dims, cfg, trainable)
