"""Qwen-Image parallelism: the 60 dual-stream blocks are the FSDP / AC / compile units; the embedders,
the text norm and the output head ride with the root."""

from __future__ import annotations

import torch.nn as nn

from titan_flow.config import JobConfig
from titan_flow.distributed.parallelize import parallelize_blocks
from titan_flow.distributed.utils import ParallelDims


def parallelize_qwen_image(model: nn.Module, dims: ParallelDims, cfg: JobConfig, trainable: bool = True) -> nn.Module:
    return parallelize_blocks(model, [model.transformer_blocks], dims, cfg, trainable)
