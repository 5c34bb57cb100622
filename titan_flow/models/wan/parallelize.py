"""Wan parallelism: the transformer blocks are the FSDP/AC/compile units; the patch embedding, the
condition embedders, the output head and the modulation tables ride with the root.

FSDP2's mixed precision gathers every parameter in model.compute_dtype, so under bf16 the modulation
tables and the affine cross-attention norm are rounded to bf16 (diffusers keeps them fp32); the model
still forms the modulation sums, norms, residuals, time sinusoid and RoPE in fp32.
"""

from __future__ import annotations

import torch.nn as nn

from titan_flow.config import JobConfig
from titan_flow.distributed.parallelize import parallelize_blocks
from titan_flow.distributed.utils import ParallelDims


def parallelize_wan(model: nn.Module, dims: ParallelDims, cfg: JobConfig, trainable: bool = True) -> nn.Module:
    return parallelize_blocks(model, [model.blocks], dims, cfg, trainable)
